"""Expert load balancing benchmark: a skewed expert-parallel MoE step before and after
`placement.rebalance_experts` + `placement.rebalance` (redundant experts), on local gloo ranks laid
out as nodes (default 2 nodes x 4 ranks, 64 experts, top-8, Zipf-skewed routing).

Measured in the same run, before and after interleaved (two copies of each layer: one on the
contiguous placement, one moved to the planned one):
- per layer, max / mean rows each rank's experts compute (1.0: balanced);
- the critical path: the slowest rank's expert compute per step, each rank timing its own expert
  calls with its thread CPU time (the ranks share this machine's cores, so wall-clock time hides
  which rank waits for which);
- the wall-clock step time (slowest rank, median), and the bytes that cross nodes per step;
- the planner's time, and the bytes and time of the executor's move (weights + AdamW moments).
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pangu_ops.distributed import ExpertParallelDispatcher, Topology
from pangu_ops.distributed import placement as pl
from pangu_ops.nn import MoEFeedForward

from .distributed import launch, save, slowest_median


@dataclass(frozen=True)
class Setup:
    nodes: int = 2
    ranks_per_node: int = 4
    layers: int = 2
    experts: int = 64
    physical: int = 72  # physical experts per layer after rebalancing (redundant: physical - experts)
    topk: int = 8
    tokens: int = 256  # per rank
    hidden: int = 512
    ffn: int = 256
    skew: float = 1.2  # Zipf exponent of the experts' popularity
    strategy: str = "hierarchical"
    dtype: str = "bfloat16"
    iters: int = 5
    link_mbit: float | None = None

    def __str__(self) -> str:
        link = f", inter-node link {self.link_mbit:g} Mbit/s" if self.link_mbit else ""
        return (f"{self.nodes} nodes x {self.ranks_per_node} ranks, {self.layers} layers, E={self.experts} -> "
                f"{self.physical} physical, top-{self.topk}, Zipf {self.skew:g}, {self.tokens} tokens/rank, "
                f"H={self.hidden} F={self.ffn} {self.dtype}, {self.strategy}{link}")


def skewed_routing(s: Setup, layer: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert_ids [T, k], weights [T, k]): k distinct experts per token drawn with Zipf(skew)
    popularity over a per-layer random order of the experts (the same order on every rank)."""
    order = torch.randperm(s.experts, generator=torch.Generator().manual_seed(1000 + layer))
    popularity = torch.empty(s.experts)
    popularity[order] = 1.0 / torch.arange(1, s.experts + 1, dtype=torch.float64).pow(s.skew).float()
    gen = torch.Generator().manual_seed(97 * layer + rank)
    ids = torch.multinomial(popularity.expand(s.tokens, -1), s.topk, replacement=False, generator=gen)
    weights = torch.rand(s.tokens, s.topk, generator=gen)
    return ids, weights / weights.sum(1, keepdim=True)


class _Timed:
    """The layer's experts, timed with this thread's CPU time and counted in rows."""

    def __init__(self, layer: MoEFeedForward):
        self.layer, self.cpu, self.rows = layer, 0.0, 0

    def __call__(self, x_local, sizes):
        start = time.thread_time()
        y = self.layer._experts(x_local, sizes)
        self.cpu += time.thread_time() - start
        self.rows += x_local.shape[0]
        return y


def _rank(rank: int, s: Setup) -> dict:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    topo = Topology(ranks_per_node=s.ranks_per_node)
    W = topo.world_size
    dtype = getattr(torch, s.dtype)
    routes = [skewed_routing(s, l, rank) for l in range(s.layers)]
    x = torch.randn(s.tokens, s.hidden, generator=torch.Generator().manual_seed(rank)).to(dtype)

    def make():
        torch.manual_seed(0)
        return [MoEFeedForward(s.hidden, s.ffn, s.experts, topk=s.topk, aux_loss_alpha=0.0, dtype=dtype,
                               dispatcher=ExpertParallelDispatcher(topo, s.experts, s.strategy))
                for _ in range(s.layers)]

    before, after = make(), make()
    opt = torch.optim.AdamW([p for layer in after for p in (layer.w_gate_up, layer.w_down)], lr=1e-4)
    for layer, (ids, w) in zip(after, routes):  # one step: AdamW moments exist and move with the experts
        layer._count(ids)
        layer.dispatcher.run(x, ids, w, layer._experts).float().square().mean().backward()
    opt.step()
    opt.zero_grad()

    # plan from the counted load (all ranks' counts), then move
    start = time.perf_counter()
    load = pl.layer_loads(after, group=topo.group)
    plan_start = time.perf_counter()
    # no group-limited routing here: every expert its own group, the finest packing onto nodes
    phy2log, _, _ = pl.rebalance_experts(load, s.physical, s.experts, s.nodes, W)
    plan_s = time.perf_counter() - plan_start
    dist.barrier()
    move_start = time.perf_counter()
    moved = pl.rebalance(after, list(phy2log), optimizer=opt)
    move_s = time.perf_counter() - move_start
    if rank == 0:
        print(f"  planned in {1e3 * plan_s:.1f} ms, moved in {1e3 * move_s:.0f} ms (stats {1e3 * (time.perf_counter() - start):.0f} ms)",
              file=sys.stderr, flush=True)

    timed = {"before": [_Timed(layer) for layer in before], "after": [_Timed(layer) for layer in after]}
    for layer in before + after:  # count the timed steps' exchanges only
        layer.dispatcher.stats.clear()
    layers = {"before": before, "after": after}

    def step(which: str):
        def run():
            for layer, (ids, w), experts in zip(layers[which], routes, timed[which]):
                with torch.no_grad():
                    layer.dispatcher.run(x, ids, w, experts)
        return run

    steps = {"before": [], "after": []}
    for _ in range(s.iters):  # interleaved: before, after, before, ...
        for which in ("before", "after"):
            steps[which].append(slowest_median(step(which), 1))
    out = {"plan_ms": 1e3 * plan_s, "move_ms": 1e3 * move_s}
    calls = 2 * s.iters  # each slowest_median: a warm-up call and a timed one
    for which in ("before", "after"):
        rows = torch.tensor([t.rows / calls for t in timed[which]], dtype=torch.float64)
        everyone = [torch.zeros_like(rows) for _ in range(W)]
        dist.all_gather(everyone, rows)
        per_layer = torch.stack(everyone)  # [W, L]
        cpu = torch.tensor([sum(t.cpu for t in timed[which]) / calls], dtype=torch.float64)
        dist.all_reduce(cpu, op=dist.ReduceOp.MAX)
        inter = torch.tensor([sum(v.get("inter_bytes", 0) for layer in layers[which]
                                  for v in layer.dispatcher.stats.values()) / calls], dtype=torch.float64)
        dist.all_reduce(inter)
        out[which] = {"max_over_mean": (per_layer.max(0).values / per_layer.mean(0)).tolist(),
                      "critical_ms": 1e3 * float(cpu), "step_ms": 1e3 * statistics.median(steps[which]),
                      "inter_node_bytes": float(inter)}
    moved_bytes = torch.tensor([moved.bytes_sent], dtype=torch.float64)
    dist.all_reduce(moved_bytes)
    out["bytes_moved"] = int(moved_bytes)
    out["planned_balancedness"] = pl.balancedness(load, phy2log, W).tolist()
    return out


def run(s: Setup) -> dict:
    return launch(_rank, s, s.nodes, s.ranks_per_node, s.link_mbit)


def summary(r: dict) -> dict:
    """The JSON's "rebalance" object."""
    b, a = r["before"], r["after"]
    return {"max_over_mean_before": float(np.mean(b["max_over_mean"])),
            "max_over_mean_after": float(np.mean(a["max_over_mean"])),
            "max_over_mean_before_per_layer": b["max_over_mean"], "max_over_mean_after_per_layer": a["max_over_mean"],
            "critical_ms_before": b["critical_ms"], "critical_ms_after": a["critical_ms"],
            "step_ms_before": b["step_ms"], "step_ms_after": a["step_ms"],
            "inter_node_bytes_before": b["inter_node_bytes"], "inter_node_bytes_after": a["inter_node_bytes"],
            "bytes_moved": r["bytes_moved"], "move_ms": r["move_ms"], "plan_ms": r["plan_ms"]}


def table(s: Setup, r: dict) -> str:
    m = summary(r)
    head = f"{'':<34} {'before':>10} {'after':>10} {'gain':>8}"
    lines = [f"expert load balancing: {s}", head, "-" * len(head)]
    for l, (b, a) in enumerate(zip(m["max_over_mean_before_per_layer"], m["max_over_mean_after_per_layer"])):
        lines.append(f"{f'layer {l}: max/mean rows per rank':<34} {b:>10.2f} {a:>10.2f} {b / a:>7.2f}x")
    for key, label in (("critical_ms", "critical path: slowest rank's"), ("step_ms", "wall-clock step, slowest rank")):
        b, a = m[f"{key}_before"], m[f"{key}_after"]
        lines.append(f"{label:<34} {b:>8.1f}ms {a:>8.1f}ms {b / a:>7.2f}x")
    lines.append(f"{'  (critical: expert compute, thread CPU time)':<34}")
    b, a = m["inter_node_bytes_before"] / 1e6, m["inter_node_bytes_after"] / 1e6
    lines.append(f"{'inter-node MB per step, all ranks':<34} {b:>10.2f} {a:>10.2f} {b / max(a, 1e-9):>7.2f}x")
    lines.append(f"planner {m['plan_ms']:.1f} ms; executor moved {m['bytes_moved'] / 1e6:.1f} MB (all ranks, weights + "
                 f"AdamW moments) in {m['move_ms']:.0f} ms")
    return "\n".join(lines)


def draw(s: Setup, r: dict, fig, axes) -> None:
    m = summary(r)
    ax_l, ax_t = axes
    L = len(m["max_over_mean_before_per_layer"])
    ax_l.bar([l - 0.2 for l in range(L)], m["max_over_mean_before_per_layer"], 0.4, label="before")
    ax_l.bar([l + 0.2 for l in range(L)], m["max_over_mean_after_per_layer"], 0.4, label="after")
    ax_l.axhline(1.0, color="k", lw=0.8)
    ax_l.set_xticks(range(L), [f"layer {l}" for l in range(L)])
    ax_l.set_ylabel("max / mean rows per rank")
    ax_l.legend()
    keys = [("critical_ms", "critical path (CPU)"), ("step_ms", "wall-clock step")]
    ax_t.bar([i - 0.2 for i in range(2)], [m[f"{k}_before"] for k, _ in keys], 0.4, label="before")
    ax_t.bar([i + 0.2 for i in range(2)], [m[f"{k}_after"] for k, _ in keys], 0.4, label="after")
    ax_t.set_xticks(range(2), [label for _, label in keys])
    ax_t.set_ylabel("ms (slowest rank)")
    ax_t.legend()
    fig.suptitle(str(s), fontsize=8)


def main(s: Setup, out_dir: Path) -> dict:
    print(f"pangu_ops rebalance bench: {s}", file=sys.stderr, flush=True)
    result = run(s)
    save(out_dir, "bench_rebalance", table(s, result),
         {"setup": dataclasses.asdict(s), "rebalance": summary(result), "raw": result}, lambda fig, axes: draw(s, result, fig, axes))
    return result
