"""Timing shared by calibration and validation: the best of repeated calls on this process, the
slowest rank's median over synchronized iterations on gloo ranks, and the two measured problems
(a single-process MoE layer, one expert-parallel step)."""
from __future__ import annotations

import statistics
import time

import torch

from .model import Layer


def best_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def synchronized_median(fn, iters: int) -> float:
    """The slowest rank's median time of fn over iterations that all ranks start together (the
    barrier outside the timed region), after one warm-up call."""
    import torch.distributed as dist

    fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def speed_probe() -> float:
    """Seconds of a fixed small workload (an fp32 expert_mlp and a permute / unpermute pass, a few
    ms): calibration records it, validation repeats it beside each problem, and the ratio says how
    much slower or faster this shared machine runs now than when it was calibrated."""
    import pangu_ops

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 256, generator=gen)
    ids = torch.randint(0, 8, (1024, 2), generator=gen)
    w1, w2 = torch.randn(8, 256, 256, generator=gen) / 16, torch.randn(8, 128, 256, generator=gen) / 16

    def once():
        with torch.no_grad():
            xs, sizes, idx = pangu_ops.permute(x, ids, 8)
            pangu_ops.unpermute(pangu_ops.expert_mlp(xs, w1, w2, sizes), idx, None, 1024, topk=2)
    return best_time(once, 7)


def measure_single(c: Layer, iters: int = 5) -> float:
    """Seconds of permute -> expert_mlp -> unpermute (a decoder block with `c.block`: `nn.DecoderBlock`
    around a `MoEFeedForward`), and its backward, on this process: the best of `iters` (as
    calibration measures: on a shared machine the minimum is the stable figure)."""
    import pangu_ops

    dt = getattr(torch, c.dtype)
    gen = torch.Generator().manual_seed(c.tokens + c.experts)
    if c.block:
        return best_time(_block_step(c, dt, gen), iters)
    x = torch.randn(c.tokens, c.hidden, generator=gen).to(dt).requires_grad_(c.backward)
    ids = torch.rand(c.tokens, c.experts, generator=gen).argsort(1)[:, :c.topk]
    w = torch.rand(c.tokens, c.topk, generator=gen)
    w1 = (torch.randn(c.experts, c.hidden, 2 * c.ffn, generator=gen) * c.hidden ** -0.5).to(dt).requires_grad_(c.backward)
    w2 = (torch.randn(c.experts, c.ffn, c.hidden, generator=gen) * c.ffn ** -0.5).to(dt).requires_grad_(c.backward)

    def step():
        with torch.set_grad_enabled(c.backward):
            xs, sizes, idx = pangu_ops.permute(x, ids, c.experts)
            y = pangu_ops.unpermute(pangu_ops.expert_mlp(xs, w1, w2, sizes), idx, w)
            if c.backward:
                y.float().sum().backward()
    return best_time(step, iters)


def _block_step(c: Layer, dt: torch.dtype, gen: torch.Generator):
    from ..nn import DecoderBlock, MoEFeedForward

    seq = min(c.seq or c.tokens, c.tokens)
    if c.tokens % seq:
        raise ValueError(f"tokens ({c.tokens}) must be whole sequences of {seq}")
    with torch.random.fork_rng():  # the block's initial weights from `gen`, the caller's RNG untouched
        torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
        block = DecoderBlock(c.hidden, max(1, c.hidden // 64),
                             MoEFeedForward(c.hidden, c.ffn, c.experts, topk=c.topk)).to(dt)
    block.requires_grad_(c.backward)
    x = torch.randn(c.tokens // seq, seq, c.hidden, generator=gen).to(dt).requires_grad_(c.backward)

    def step():
        with torch.set_grad_enabled(c.backward):
            y, aux = block(x)
            if c.backward:
                (y.float().sum() + aux).backward()
    return step


def ep_step(rank: int, setup: tuple) -> list[float]:
    """On a gloo rank: the slowest rank's median time of dispatch -> expert_mlp -> combine, forward,
    for each of `configs` (one problem: same ranks, shape and dtype; strategy and chunks vary)."""
    import pangu_ops
    from ..distributed import ExpertParallelDispatcher, Topology

    configs, iters = setup
    torch.set_num_threads(1)
    c0 = configs[0]
    topo = Topology(ranks_per_node=c0.ranks // c0.nodes)
    dt = getattr(torch, c0.dtype)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(c0.tokens, c0.hidden, generator=gen).to(dt)
    ids = torch.rand(c0.tokens, c0.experts, generator=gen).argsort(1)[:, :c0.topk]
    w = torch.rand(c0.tokens, c0.topk, generator=gen)
    local = c0.experts // c0.ranks
    w1 = (torch.randn(local, c0.hidden, 2 * c0.ffn, generator=gen) * c0.hidden ** -0.5).to(dt)
    w2 = (torch.randn(local, c0.ffn, c0.hidden, generator=gen) * c0.ffn ** -0.5).to(dt)
    dispatchers = {s: ExpertParallelDispatcher(topo, c0.experts, s) for s in ("flat", "hierarchical")}
    out = []
    with torch.no_grad():
        for c in configs:
            out.append(synchronized_median(lambda: dispatchers[c.strategy].run(
                x, ids, w, lambda xs, s: pangu_ops.expert_mlp(xs, w1, w2, s), chunks=c.chunks), iters))
    return out
