"""Calibration: short microbenchmarks on the machine at hand, fitted to the profile's terms.

- experts: `expert_mlp` forward (and forward + backward) at several rows per expert and widths,
  in each dtype; least squares of `t = E c + flops / peak + flops h / (m peak)` (linear in
  c, 1/peak, h/peak) gives per_expert_s, peak_flops and half_rows; the backward's flop factor
  from the forward + backward times.
- local moves: permute + unpermute at two sizes (a line through the points).
- a decoder block's dense GEMMs and causal attention (torch's SDPA), forward and forward +
  backward, at two or three sizes each: per-call cost, rate and backward factor (`_fit_rate`).
- links: `all_to_all_single` on the real process groups of 2 x 1 and 2 x 2 local gloo ranks (an
  emulated slow inter-node link with `link_mbit`), within a node and across nodes, at two sizes;
  a tiny all-gather for the control collectives; and one chunked expert-parallel step, of a shape
  the validation grid does not use, for the overlap factor.
None of the validation configurations (`sim.validate`) is measured here.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from .measure import best_time, ep_step, speed_probe, synchronized_median
from .profile import Experts, Link, Profile, Rate, this_machine


def _fit_experts(dtype: torch.dtype, quick: bool) -> Experts:
    import pangu_ops

    rows_per_expert = (2, 8, 32, 128) if quick else (1, 4, 16, 64, 256)
    shapes = ((128, 64, 8), (512, 256, 8), (1024, 768, 4)) if quick else \
        ((128, 64, 8), (384, 192, 16), (512, 256, 8), (1024, 768, 4))
    A, y, bwd = [], [], []
    for H, F, E in shapes:
        w1 = (torch.randn(E, H, 2 * F) * H ** -0.5).to(dtype)
        w2 = (torch.randn(E, F, H) * F ** -0.5).to(dtype)
        for m in rows_per_expert:
            if H >= 1024 and m > 64:  # (long enough already)
                continue
            rows = m * E
            x = torch.randn(rows, H).to(dtype)
            sizes = torch.full((E,), m, dtype=torch.int64)
            flops = 6.0 * rows * H * F
            with torch.no_grad():
                t = best_time(lambda: pangu_ops.expert_mlp(x, w1, w2, sizes), 7)
            A.append([E, flops, flops / m, flops / min(H, F)])
            y.append(t)
            if m >= 16:
                xg, w1g, w2g = x.clone().requires_grad_(), w1.clone().requires_grad_(), w2.clone().requires_grad_()
                tb = best_time(lambda: pangu_ops.expert_mlp(xg, w1g, w2g, sizes).sum().backward(), 5)
                bwd.append((tb, t, flops, E, m))
    per_expert, inv_peak, rows_over_peak, width_over_peak = _nonnegative_fit(np.array(A), np.array(y))
    peak = 1.0 / max(inv_peak, 1e-15)
    e = Experts(peak, rows_over_peak * peak, per_expert, half_width=width_over_peak * peak)
    # forward + backward: the backward's extra time (tb - t), minus its own per-expert calls, is
    # bwd_factor times the forward's flop term (least squares over the points)
    return replace(e, bwd_factor=_bwd_factor([tb - t - E_ * e.per_expert_s for tb, t, _, E_, _ in bwd],
                                             [t - E_ * e.per_expert_s for _, t, _, E_, _ in bwd]))


def _bwd_factor(extra: list[float], flop_term: list[float]) -> float:
    """The backward's extra time over the forward's flop term, least squares over the points, >= 0."""
    extra, flop_term = np.array(extra), np.array(flop_term)
    return max(float(np.dot(extra, flop_term) / max(np.dot(flop_term, flop_term), 1e-30)), 0.0)


def _fit_rate(problems) -> Rate:
    """A `Rate` from problems `(flops, make)`: `make()` returns (forward fn, forward + backward fn),
    each timed; forward `t = per_call + flops / peak`, the backward's extra time over the forward's
    flop term gives bwd_factor."""
    points = []
    for flops, make in problems:
        fwd, both = make()
        points.append((flops, best_time(fwd, 3), best_time(both, 3)))
    per_call, inv_peak = _nonnegative_fit(np.array([[1.0, f] for f, _, _ in points]), np.array([t for _, t, _ in points]))
    factor = _bwd_factor([tb - t - per_call for _, t, tb in points], [f * inv_peak for f, _, _ in points])
    return Rate(1.0 / max(inv_peak, 1e-15), per_call, factor)


def _dense_problems(dtype: torch.dtype):
    """Three GEMM shapes with as many rows as make a forward call ~3 ms here (a CPU's half-precision
    matmul may be an emulation 100x slower than fp32: fixed shapes would be noise or minutes)."""
    import torch.nn.functional as F

    def operands(rows, K, N):  # as nn.Linear holds its weight: [N, K]
        return torch.randn(rows, K).to(dtype), (torch.randn(N, K) * K ** -0.5).to(dtype)

    def make(rows, K, N):
        x, w = operands(rows, K, N)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        return (lambda: F.linear(x, w)), (lambda: F.linear(xg, wg).sum().backward())
    x, w = operands(64, 512, 512)
    rows = int(min(2048, max(16, 64 * 3e-3 / best_time(lambda: F.linear(x, w), 2))))
    return [(2.0 * r * k * n, functools.partial(make, r, k, n))
            for r, k, n in ((max(1, rows // 8), 512, 512), (rows, 384, 1152), (4 * rows, 256, 768))]


def _attention_problems(dtype: torch.dtype):
    import torch.nn.functional as F

    def make(batch, heads, seq):
        q, k, v = (torch.randn(batch, heads, seq, 64).to(dtype) for _ in range(3))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).sum().backward())
    return [(2.0 * b * s * s * h * 64, functools.partial(make, b, h, s)) for b, h, s in ((4, 4, 256), (2, 6, 384))]


def _nonnegative_fit(A: np.ndarray, y: np.ndarray) -> list[float]:
    """Least squares with every coefficient >= 0: columns whose coefficient comes out negative
    are dropped (set to 0) and the rest refitted. Relative errors weigh every point alike."""
    w = 1.0 / y
    keep = list(range(A.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(A[:, keep] * w[:, None], y * w, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            out = [0.0] * A.shape[1]
            for i, c in zip(keep, coef):
                out[i] = float(max(c, 0.0))
            return out
        keep.pop(int(np.argmin(coef)))


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept >= 0, rate > 0) of t = intercept + bytes / rate through (bytes, t) points."""
    b, t = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    intercept, inv_rate = _nonnegative_fit(np.stack([np.ones_like(b), b], 1), t)
    if inv_rate <= 0:  # flat in bytes (noise): the largest point's average rate
        inv_rate = float(t[-1] / b[-1])
    return intercept, 1.0 / inv_rate


def _fit_moves(quick: bool) -> tuple[float, float]:
    import pangu_ops

    points = []
    for T in ((512, 4096) if quick else (256, 2048, 8192)):
        x = torch.randn(T, 512)
        ids = torch.randint(0, 16, (T, 2))
        def once():
            xs, _, idx = pangu_ops.permute(x, ids, 16)
            pangu_ops.unpermute(xs, idx, None, T, topk=2)
        points.append((2 * 2 * T * 2 * 512 * 4, best_time(once)))  # two passes over 2T rows, read + write
    intercept, rate = _line(points)
    return intercept / 2, rate


def _links_rank(rank: int, setup: tuple) -> dict:
    import torch.distributed as dist

    from ..distributed import Topology

    quick, nodes, per_node = setup
    torch.set_num_threads(1)
    topo = Topology(ranks_per_node=per_node)
    out = {}
    sizes = (16 << 10, 1 << 20, 4 << 20) if quick else (16 << 10, 256 << 10, 1 << 20, 4 << 20)
    for level, group, members in (("intra", topo.intra_group, per_node), ("inter", topo.inter_group, nodes)):
        if members < 2:
            continue
        points = []
        for size in sizes:
            x = torch.empty(size // 4 * members, dtype=torch.float32)
            y = torch.empty_like(x)
            dist.barrier()
            t = best_time(lambda: dist.all_to_all_single(y, x, group=group), 5)
            t = torch.tensor([t], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            points.append((size * (members - 1), float(t)))  # bytes this rank sends to the others
        out[level] = _line(points)
    # the fixed cost of a dispatch + combine among these ranks (all its collectives): tiny steps
    # of both strategies; and of one collective (flat: 5 of them, hierarchical: 8 or 10)
    from ..distributed import ExpertParallelDispatcher

    x, ids = torch.randn(4, 16), torch.randint(0, 2 * topo.world_size, (4, 2))
    counts = {"flat": 5, "hierarchical": 8 if per_node == 1 else 10}
    for strategy in counts:
        ep = ExpertParallelDispatcher(topo, 2 * topo.world_size, strategy)
        out[strategy] = synchronized_median(lambda: ep.run(x, ids, None, lambda xs, sizes: xs), 31)
    out["collective"] = sum(out[s] for s in counts) / sum(counts.values())
    return out


def calibrate(*, quick: bool = False, link_mbit: float | None = None, dtypes=("float32", "bfloat16"),
              progress=None) -> Profile:
    """Measures this machine (about 20-50 s) and returns its profile."""
    from ..benchmarks.distributed import launch
    from .model import Layer, predict

    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    experts = {}
    for name in dtypes:
        say(f"[calibrate] expert_mlp rate, {name}")
        experts[name] = _fit_experts(getattr(torch, name), quick)
    probe = speed_probe()  # beside the compute rates (and again at the end: the faster of the two)
    experts.setdefault("float16", experts.get("bfloat16", next(iter(experts.values()))))
    dense, attention = {}, {}
    for name in dict.fromkeys(("float32", *dtypes)):  # the router is fp32 whatever the experts' dtype
        say(f"[calibrate] dense GEMM and attention rate, {name}")
        dense[name] = _fit_rate(_dense_problems(getattr(torch, name)))
        attention[name] = _fit_rate(_attention_problems(getattr(torch, name)))
    for kinds in (dense, attention):
        kinds.setdefault("float16", kinds.get("bfloat16", kinds["float32"]))
    say("[calibrate] permute / unpermute bandwidth")
    move_call, move_bw = _fit_moves(quick)
    links_by_ranks, step_fixed = {}, {}
    for nodes, per_node in ((2, 1), (2, 2)):
        say(f"[calibrate] all-to-all on {nodes} x {per_node} gloo ranks" + (f", {link_mbit:g} Mbit/s" if link_mbit else ""))
        r = launch(_links_rank, (quick, nodes, per_node), nodes, per_node, link_mbit)
        intra = r.get("intra", r["inter"])
        # an all-to-all's fixed cost is that of any collective among these ranks
        links_by_ranks[str(nodes * per_node)] = {"intra": Link(r["collective"], intra[1]),
                                                 "inter": Link(r["collective"], r["inter"][1])}
        step_fixed[str(nodes * per_node)] = {"flat": r["flat"], "hierarchical": r["hierarchical"]}
    cores = os.cpu_count() or 1
    profile = Profile("this machine", "measured", {**this_machine(), "cores": cores, "link_mbit": link_mbit},
                      experts, move_call, move_bw, dict(links_by_ranks["4"]), links_by_ranks["4"]["intra"].latency_s, cores=cores,
                      ranks_share_cores=True, overlap=0.0, links_by_ranks=links_by_ranks,
                      step_fixed_by_ranks=step_fixed, dense=dense, attention=attention, probe_s=min(probe, speed_probe()))
    say("[calibrate] overlap of a chunked step")
    # one expert-parallel step shape, not in the validation grid, at 1 and 4 chunks: the overlap
    # factor that makes the model's 4-chunk / 1-chunk ratio the measured one
    base = Layer(96, 192, 96, 8, 2, dtype="bfloat16" if "bfloat16" in experts else dtypes[0], ranks=4, nodes=2)
    measured = dict(zip((1, 4), launch(ep_step, ([base, replace(base, chunks=4)], 7), 2, 2, link_mbit)))
    one, four = predict(profile, base)["total"], None
    best, best_err = 0.0, float("inf")
    for ov in np.linspace(0.0, 1.0, 21):
        four = predict(replace(profile, overlap=float(ov)), replace(base, chunks=4))["total"]
        err = abs(four / one - measured[4] / measured[1])
        if err < best_err:
            best, best_err = float(ov), err
    profile.overlap = best
    profile.machine["calibration_s"] = round(time.perf_counter() - start, 1)
    say(f"[calibrate] done in {profile.machine['calibration_s']} s")
    return profile
