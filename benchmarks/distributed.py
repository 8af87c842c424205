"""Expert-parallel communication benchmark: flat vs hierarchical dispatch + combine on local gloo
ranks laid out as nodes, with MoE routing (default 64 experts, top-8, 2 nodes x 4 ranks).

For each strategy, measured in the same run:
- the bytes and messages each rank sends intra- and inter-node per dispatch + combine (the stats);
- the time of dispatch + combine alone (identity experts);
- the time of a whole expert-parallel MoE step (SwiGLU experts), unchunked and in `chunks`
  overlapped chunks (the communication of chunk i+1 runs while the experts compute chunk i).
Times are the slowest rank's, median over `iters`. All ranks share this machine's cores and its
loopback: on one host the bytes are the result that carries over to real clusters; `link_mbit`
puts the nodes in network namespaces joined by a rate-limited veth (root only) so that the
inter-node bytes cost what a slow link charges. Under torchrun (WORLD_SIZE set) the ranks are
the launcher's: `torchrun --nproc-per-node 4 --nnodes 2 ... -m pangu_ops.benchmarks.distributed`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import pangu_ops
from pangu_ops.distributed import STRATEGIES, ExpertParallelDispatcher, Topology
from pangu_ops.distributed.launch import spawn

@dataclass(frozen=True)
class Setup:
    nodes: int = 2
    ranks_per_node: int = 4
    experts: int = 64
    topk: int = 8
    tokens: int = 256  # per rank
    hidden: int = 1024
    ffn: int = 256
    dtype: str = "bfloat16"
    chunks: int = 4
    iters: int = 5
    link_mbit: float | None = None

    def __str__(self) -> str:
        link = f", inter-node link {self.link_mbit:g} Mbit/s" if self.link_mbit else ", loopback"
        return (f"{self.nodes} nodes x {self.ranks_per_node} ranks, E={self.experts} top-{self.topk}, "
                f"{self.tokens} tokens/rank, H={self.hidden} F={self.ffn} {self.dtype}{link}")


def slowest_median(fn, iters: int) -> float:
    """Median over iterations of the slowest rank's time (every rank starts together)."""
    fn()  # warm-up
    times = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
    return statistics.median(times)


def _rank(rank: int, s: Setup) -> dict:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    topo = Topology(ranks_per_node=s.ranks_per_node)
    dtype = getattr(torch, s.dtype)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(s.tokens, s.hidden, generator=gen).to(dtype)
    scores = torch.rand(s.tokens, s.experts, generator=gen)
    weights, expert_ids = scores.topk(s.topk, dim=1)
    weights = weights / weights.sum(1, keepdim=True)
    local = s.experts // topo.world_size
    w_gate_up = (torch.randn(local, s.hidden, 2 * s.ffn, generator=gen) * s.hidden ** -0.5).to(dtype)
    w_down = (torch.randn(local, s.ffn, s.hidden, generator=gen) * s.ffn ** -0.5).to(dtype)

    def experts(x_local, sizes):
        return pangu_ops.expert_mlp(x_local, w_gate_up, w_down, sizes)

    out = {}
    for strategy in STRATEGIES:
        ep = ExpertParallelDispatcher(topo, s.experts, strategy)
        ep.run(x, expert_ids, weights, lambda xs, sizes: xs)
        sent = {phase: dict(v) for phase, v in ep.stats.items()}
        totals = {}
        for key in ("inter_bytes", "intra_bytes", "inter_messages", "intra_messages"):
            t = torch.tensor([sum(v.get(key, 0) for v in sent.values())], dtype=torch.float64)
            dist.all_reduce(t)
            totals[key] = float(t) / topo.world_size  # per rank, dispatch + combine
        if rank == 0:
            print(f"  {strategy}: measuring ...", file=sys.stderr, flush=True)
        out[strategy] = dict(
            per_rank=totals,
            comm_s=slowest_median(lambda: ep.run(x, expert_ids, weights, lambda xs, sizes: xs), s.iters),
            step_s=slowest_median(lambda: ep.run(x, expert_ids, weights, experts), s.iters),
            step_chunked_s=slowest_median(lambda: ep.run(x, expert_ids, weights, experts, chunks=s.chunks), s.iters),
        )
    return out


def run(s: Setup) -> dict:
    if "WORLD_SIZE" in os.environ:  # launched by torchrun: this process is one of the ranks
        dist.init_process_group("gloo")
        try:
            return _rank(dist.get_rank(), s)
        finally:
            dist.destroy_process_group()
    return launch(_rank, s, s.nodes, s.ranks_per_node, s.link_mbit)


def launch(fn, s, nodes: int, ranks_per_node: int, link_mbit: float | None) -> dict:
    """fn(rank, s) on nodes x ranks_per_node local gloo ranks (over an emulated slow inter-node
    link with link_mbit); rank 0's result."""
    world = nodes * ranks_per_node
    if not link_mbit:
        return spawn(world, fn, s, env={"LOCAL_WORLD_SIZE": str(ranks_per_node)}, timeout_s=900)[0]
    from . import slow_link

    why = slow_link.available()
    if why:
        raise RuntimeError(f"link_mbit needs network namespaces: {why}")
    if nodes != 2:
        raise ValueError("the emulated slow link joins exactly 2 nodes")
    with slow_link.two_nodes(link_mbit) as (namespaces, addresses, interfaces):
        node_of = [r // ranks_per_node for r in range(world)]
        env = [{"GLOO_SOCKET_IFNAME": interfaces[n], "LOCAL_WORLD_SIZE": str(ranks_per_node)} for n in node_of]
        return spawn(world, fn, s, env=env, timeout_s=900, netns=[namespaces[n] for n in node_of],
                     master_addr=addresses[0])[0]


def table(s: Setup, result: dict) -> str:
    head = (f"{'strategy':<13} {'inter MB':>9} {'inter msgs':>10} {'intra MB':>9} {'comm ms':>9} "
            f"{'step ms':>9} {f'{s.chunks} chunks ms':>13} {'overlap gain':>12}")
    lines = [f"per rank, per dispatch + combine: {s}", head, "-" * len(head)]
    for strategy, r in result.items():
        p = r["per_rank"]
        lines.append(f"{strategy:<13} {p['inter_bytes'] / 1e6:>9.2f} {p['inter_messages']:>10.1f} "
                     f"{p['intra_bytes'] / 1e6:>9.2f} {1e3 * r['comm_s']:>9.1f} {1e3 * r['step_s']:>9.1f} "
                     f"{1e3 * r['step_chunked_s']:>13.1f} {r['step_s'] / r['step_chunked_s']:>11.2f}x")
    flat, hier = result["flat"], result["hierarchical"]
    lines.append(f"hierarchical vs flat: {flat['per_rank']['inter_bytes'] / max(hier['per_rank']['inter_bytes'], 1):.2f}x "
                 f"fewer inter-node bytes, dispatch + combine {flat['comm_s'] / hier['comm_s']:.2f}x the speed, "
                 f"MoE step {flat['step_s'] / hier['step_s']:.2f}x")
    return "\n".join(lines)


def draw(s: Setup, result: dict, fig, axes) -> None:
    strategies = list(result)
    ax_b, ax_t = axes
    for i, (key, label) in enumerate([("inter_bytes", "inter-node"), ("intra_bytes", "intra-node")]):
        ax_b.bar([j + 0.4 * i for j in range(len(strategies))],
                 [result[st]["per_rank"][key] / 1e6 for st in strategies], 0.4, label=label)
    ax_b.set_xticks([j + 0.2 for j in range(len(strategies))], strategies)
    ax_b.set_ylabel("MB sent per rank (dispatch + combine)")
    ax_b.legend()
    kinds = [("comm_s", "dispatch + combine"), ("step_s", "MoE step"), ("step_chunked_s", f"step, {s.chunks} chunks")]
    for i, (key, label) in enumerate(kinds):
        ax_t.bar([j + 0.27 * i for j in range(len(strategies))], [1e3 * result[st][key] for st in strategies], 0.27,
                 label=label)
    ax_t.set_xticks([j + 0.27 for j in range(len(strategies))], strategies)
    ax_t.set_ylabel("ms (slowest rank, median)")
    ax_t.legend(fontsize=8)
    fig.suptitle(str(s), fontsize=9)


def save(out_dir: Path, name: str, text: str, payload: dict, draw_into) -> None:
    """Prints the table and writes <name>.txt, <name>.json and <name>.png (two panels that
    `draw_into(fig, axes)` fills)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.txt").write_text(text + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps({"torch": torch.__version__, **payload}, indent=2))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    draw_into(fig, axes)
    fig.tight_layout()
    fig.savefig(out_dir / f"{name}.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out_dir}/{name}.{{txt,json,png}}", file=sys.stderr)


def main(s: Setup, out_dir: Path) -> dict:
    print(f"pangu_ops distributed bench: {s}", file=sys.stderr, flush=True)
    result = run(s)
    save(out_dir, "bench_distributed", table(s, result), {"setup": dataclasses.asdict(s), "results": result},
         lambda fig, axes: draw(s, result, fig, axes))
    return result


if __name__ == "__main__":
    main(Setup(), Path(os.environ.get("PANGU_OPS_BENCH_OUT", "bench_out")))
