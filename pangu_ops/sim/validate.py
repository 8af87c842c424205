"""Validation of the cost model: a grid of configurations, none of them used by `calibrate`,
measured here and predicted from the profile.

Single-process MoE layers (permute -> expert_mlp -> unpermute) of several shapes, forward and
forward + backward; expert-parallel steps (dispatch -> experts -> combine, forward) on 2 and 4
local gloo ranks as 2 nodes, flat and hierarchical, 1 / 2 / 4 chunks, with and without an
emulated slow inter-node link. Reports per configuration predicted vs measured, the mean absolute
percentage error, Spearman's rank correlation, and per problem (one rank count and link) whether
the predicted best (strategy, chunks) is within 5% of the measured best.

This machine is shared: the same configuration's time drifts by up to ~1.5x over minutes. Beside
each problem the validation repeats the calibration's speed probe (`measure.speed_probe`); the
ratio (now / at calibration) is reported per configuration, and the error is given twice: raw, and
with that drift taken out (the prediction times the ratio: the profile as it would measure now).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace

import numpy as np

from .measure import ep_step, measure_single, speed_probe
from .model import Layer, best_chunks, candidates, predict
from .profile import Profile

SINGLE_SHAPES = ((512, 256, 128, 8, 2), (1024, 512, 256, 16, 4), (256, 1024, 512, 32, 8), (2048, 128, 64, 64, 2))
# decoder blocks (fp32: this CPU's bf16 Linear is an emulation), (tokens, seq, H, F, E, k)
BLOCK_SHAPES = ((512, 256, 256, 128, 8, 2), (1024, 512, 384, 192, 16, 4))
EP_SHAPE = dict(tokens=128, hidden=256, ffn=128, experts=8, topk=2)


@dataclass
class Point:
    config: dict
    problem: str
    predicted_ms: float
    measured_ms: float
    speed: float = 1.0  # the speed probe's time now / at calibration

    @property
    def error(self) -> float:
        return abs(self.predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def drift_corrected_error(self) -> float:
        return abs(self.predicted_ms * self.speed - self.measured_ms) / self.measured_ms




def grid(quick: bool, link_mbit: float | None) -> list[tuple[str, list[Layer]]]:
    """(problem name, its configurations) of the validation grid."""
    shapes = SINGLE_SHAPES[:2] if quick else SINGLE_SHAPES
    problems = [(f"single T={t} H={h} F={f} E={e} k={k}" + (" fwd+bwd" if b else " fwd"),
                 [Layer(t, h, f, e, k, backward=b)]) for t, h, f, e, k in shapes for b in (False, True)]
    problems += [(f"block T={t} seq={s} H={h} F={f} E={e} k={k} fp32" + (" fwd+bwd" if b else " fwd"),
                  [Layer(t, h, f, e, k, "float32", backward=b, block=True, seq=s)])
                 for t, s, h, f, e, k in BLOCK_SHAPES[:1 if quick else 2] for b in (False, True)]
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
        speed = speed_probe() / profile.probe_s if profile.probe_s else 1.0
        say(f"[validate] {name}: {len(configs)} configuration(s), machine at {1 / speed:.2f}x its calibration speed")
        if configs[0].ranks == 1:
            measured = [measure_single(c, iters) for c in configs]
        else:
            measured = launch(ep_step, (configs, iters), 2, configs[0].ranks // 2, link)
        predicted = [predict(profile, c)["total"] for c in configs]
        for c, m, p in zip(configs, measured, predicted):
            points.append(Point({**asdict(c), "link_mbit": link}, name, 1e3 * p, 1e3 * m, speed))
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
    return {"mape": float(np.mean([pt.error for pt in points])),
            "mape_drift_corrected": float(np.mean([pt.drift_corrected_error for pt in points])),
            "spearman": spearman([p.predicted_ms for p in points], [p.measured_ms for p in points]),
            "pick_within_5pct": float(np.mean([d["within_5pct"] for d in decisions])) if decisions else 1.0,
            "auto_within_5pct": float(np.mean([a["within_5pct"] for a in autos])) if autos else 1.0,
            "configs": [dict(asdict(pt), error=pt.error, drift_corrected_error=pt.drift_corrected_error)
                        for pt in points], "decisions": decisions, "auto": autos}


def table(result: dict) -> str:
    head = f"{'configuration':<64} {'predicted':>10} {'measured':>10} {'error':>7} {'drift':>6} {'corrected':>9}"
    lines = [head, "-" * len(head)]
    for pt in result["configs"]:
        c = pt["config"]
        what = pt["problem"] if c["ranks"] == 1 else f"{pt['problem']}: {c['strategy']} x{c['chunks']}"
        lines.append(f"{what:<64} {pt['predicted_ms']:>8.2f}ms {pt['measured_ms']:>8.2f}ms {100 * pt['error']:>6.1f}% "
                     f"{pt['speed']:>5.2f}x {100 * pt['drift_corrected_error']:>8.1f}%")
    for d in result["decisions"]:
        lines.append(f"decision {d['problem']}: picked {d['picked']} ({d['picked_ms']:.2f} ms, measured best "
                     f"{d['measured_best_ms']:.2f} ms): {'within 5%' if d['within_5pct'] else 'MISSED'}")
    for a in result["auto"]:
        lines.append(f"chunks='auto' {a['problem']}, {a['strategy']}: {a['auto_chunks']} chunk(s), {a['auto_ms']:.2f} ms "
                     f"(best fixed {a['best_fixed_ms']:.2f} ms, 1 chunk {a['chunks1_ms']:.2f} ms)")
    lines.append(f"MAPE {100 * result['mape']:.1f}% ({100 * result['mape_drift_corrected']:.1f}% with the machine's drift "
                 f"since calibration taken out) over {len(result['configs'])} configurations, Spearman "
                 f"{result['spearman']:.3f}, predicted best within 5% of the measured best in "
                 f"{100 * result['pick_within_5pct']:.0f}% of {len(result['decisions'])} decisions; chunks='auto' within "
                 f"5% of the best fixed count in {100 * result['auto_within_5pct']:.0f}% of {len(result['auto'])}")
    return "\n".join(lines)
