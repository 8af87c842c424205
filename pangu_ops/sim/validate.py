"""Validation of the cost model: a grid of configurations, none of them used by `calibrate`,
measured here and predicted from the profile.

Single-process MoE layers (permute -> expert_mlp -> unpermute) of several shapes, forward and
forward + backward; expert-parallel steps (dispatch -> experts -> combine, forward) on 2 and 4
local gloo ranks as 2 nodes, flat and hierarchical, 1 / 2 / 4 chunks, with and without an
emulated slow inter-node link. Reports per configuration predicted vs measured, the mean absolute
percentage error, Spearman's rank correlation, and per problem (one rank count and link) whether
the predicted best (strategy, chunks) is within 5% of the measured best.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from .model import Layer, best_chunks, candidates, predict
from .profile import Profile

SINGLE_SHAPES = ((512, 256, 128, 8, 2), (1024, 512, 256, 16, 4), (256, 1024, 512, 32, 8), (2048, 128, 64, 64, 2))
EP_SHAPE = dict(tokens=128, hidden=256, ffn=128, experts=8, topk=2)


@dataclass
class Point:
    config: dict
    problem: str
    predicted_ms: float
    measured_ms: float

    @property
    def error(self) -> float:
        return abs(self.predicted_ms - self.measured_ms) / self.measured_ms




def measure_single(c: Layer, iters: int = 5) -> float:
    """Seconds of permute -> expert_mlp -> unpermute (and its backward) on this process: the best
    of `iters` (as calibration measures: on a shared machine the minimum is the stable figure)."""
    import pangu_ops

    from .calibrate import best_time

    dt = getattr(torch, c.dtype)
    gen = torch.Generator().manual_seed(c.tokens + c.experts)
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


def _ep_rank(rank: int, setup: tuple) -> dict:
    import pangu_ops
    from ..distributed import ExpertParallelDispatcher, Topology
    from .calibrate import synchronized_median

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


def grid(quick: bool, link_mbit: float | None) -> list[tuple[str, list[Layer]]]:
    """(problem name, its configurations) of the validation grid."""
    shapes = SINGLE_SHAPES[:2] if quick else SINGLE_SHAPES
    problems = [(f"single T={t} H={h} F={f} E={e} k={k}" + (" fwd+bwd" if b else " fwd"),
                 [Layer(t, h, f, e, k, backward=b)]) for t, h, f, e, k in shapes for b in (False, True)]
    for ranks in ((4,) if quick else (2, 4)):
        for link in ((None,) if quick or not link_mbit else (None, link_mbit)):
            base = Layer(**EP_SHAPE, ranks=ranks, nodes=2)
            configs = [c for c in candidates(base, 4)]
            name = f"EP {ranks} ranks (2 nodes)" + (f", {link:g} Mbit/s link" if link else "")
            problems.append((name, [replace(c) for c in configs]))
    return problems


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 1 else 1.0


def run(profiles: dict, *, quick: bool = False, link_mbit: float | None = None, iters: int = 9,
        progress=None) -> dict:
    """Measures the grid and compares with the model. `profiles`: {link_mbit or None: Profile}
    (a link's own calibration where one was made)."""
    from ..benchmarks.distributed import launch

    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    points: list[Point] = []
    decisions, autos = [], []
    for name, configs in grid(quick, link_mbit):
        link = link_mbit if "Mbit/s" in name else None
        profile: Profile = profiles.get(link) or profiles[None]
        say(f"[validate] {name}: {len(configs)} configuration(s)")
        if configs[0].ranks == 1:
            measured = [measure_single(c, iters) for c in configs]
        else:
            measured = launch(_ep_rank, (configs, iters), 2, configs[0].ranks // 2, link)
        predicted = [predict(profile, c)["total"] for c in configs]
        for c, m, p in zip(configs, measured, predicted):
            points.append(Point({**asdict(c), "link_mbit": link}, name, 1e3 * p, 1e3 * m))
        if len(configs) > 1:
            pick = int(np.argmin(predicted))
            decisions.append({"problem": name, "picked": f"{configs[pick].strategy} x{configs[pick].chunks}",
                              "measured_best_ms": 1e3 * min(measured), "picked_ms": 1e3 * measured[pick],
                              "within_5pct": measured[pick] <= 1.05 * min(measured)})
            for strategy in ("flat", "hierarchical"):  # chunks="auto" against every fixed chunk count
                mine = [(c, m) for c, m in zip(configs, measured) if c.strategy == strategy]
                auto = best_chunks(profile, mine[0][0], max(c.chunks for c, _ in mine))
                got = next(m for c, m in mine if c.chunks == auto)
                best = min(m for _, m in mine)
                one = next(m for c, m in mine if c.chunks == 1)
                autos.append({"problem": name, "strategy": strategy, "auto_chunks": auto, "auto_ms": 1e3 * got,
                              "best_fixed_ms": 1e3 * best, "chunks1_ms": 1e3 * one,
                              "within_5pct": got <= 1.05 * best})
    errors = [pt.error for pt in points]
    return {"mape": float(np.mean(errors)), "spearman": spearman([p.predicted_ms for p in points],
                                                                 [p.measured_ms for p in points]),
            "pick_within_5pct": float(np.mean([d["within_5pct"] for d in decisions])) if decisions else 1.0,
            "auto_within_5pct": float(np.mean([a["within_5pct"] for a in autos])) if autos else 1.0,
            "configs": [dict(asdict(pt), error=pt.error) for pt in points], "decisions": decisions, "auto": autos}


def table(result: dict) -> str:
    head = f"{'configuration':<58} {'predicted':>10} {'measured':>10} {'error':>7}"
    lines = [head, "-" * len(head)]
    for pt in result["configs"]:
        c = pt["config"]
        what = pt["problem"] if c["ranks"] == 1 else f"{pt['problem']}: {c['strategy']} x{c['chunks']}"
        lines.append(f"{what:<58} {pt['predicted_ms']:>8.2f}ms {pt['measured_ms']:>8.2f}ms {100 * pt['error']:>6.1f}%")
    for d in result["decisions"]:
        lines.append(f"decision {d['problem']}: picked {d['picked']} ({d['picked_ms']:.2f} ms, measured best "
                     f"{d['measured_best_ms']:.2f} ms): {'within 5%' if d['within_5pct'] else 'MISSED'}")
    for a in result["auto"]:
        lines.append(f"chunks='auto' {a['problem']}, {a['strategy']}: {a['auto_chunks']} chunk(s), {a['auto_ms']:.2f} ms "
                     f"(best fixed {a['best_fixed_ms']:.2f} ms, 1 chunk {a['chunks1_ms']:.2f} ms)")
    lines.append(f"MAPE {100 * result['mape']:.1f}% over {len(result['configs'])} configurations, Spearman "
                 f"{result['spearman']:.3f}, predicted best within 5% of the measured best in "
                 f"{100 * result['pick_within_5pct']:.0f}% of {len(result['decisions'])} decisions; chunks='auto' within "
                 f"5% of the best fixed count in {100 * result['auto_within_5pct']:.0f}% of {len(result['auto'])}")
    return "\n".join(lines)
