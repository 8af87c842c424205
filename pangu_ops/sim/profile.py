"""A machine profile: the rates the cost model adds up, measured (`calibrate`) or written from
public specs (marked "from specs, not measured").

Terms (every time in seconds, every rate per second):
- experts: `expert_mlp` over E experts of m rows each, forward:
  `E * per_expert_s + flops * (1 + half_rows / m + half_width / min(H, F)) / peak_flops`,
  flops = 6 * rows * H * F (gate/up and down GEMMs): the rate falls with few rows per expert and
  with narrow matrices; forward + backward multiplies the flop term by `1 + bwd_factor`.
- local data movement (permute / unpermute passes): `per_call_s + bytes / bytes_per_s`.
- a decoder block's other work (`dense`, `attention`, per dtype): a dense GEMM (the attention's
  projections, the router) and causal attention (torch's SDPA) as `per_call_s + flops / peak_flops`,
  forward + backward multiplying the flop term by `1 + bwd_factor`.
- links: one all-to-all on a level ("intra" node, "inter" node): `latency_s + bytes / bytes_per_s`
  (bytes this rank sends on that level); `collective_s`: a small control collective (the split
  sizes, the ranks' agreement; spec profiles). Measured profiles hold the rates per number of local ranks
  (`links_by_ranks`) and, in place of the latencies, the measured fixed cost of a whole dispatch +
  combine without payload (`step_fixed_by_ranks`): ranks sharing cores pay more per collective,
  and more than a count of collectives says.
- `ranks_share_cores`: the ranks of a run share `cores` cores (local gloo ranks on this machine):
  their compute is stretched by ranks / cores, and exchanges overlap compute only by `overlap`
  (0: not at all, 1: fully, as on accelerators with their own copy engines).
"""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Experts:
    peak_flops: float
    half_rows: float
    per_expert_s: float
    bwd_factor: float = 2.0
    half_width: float = 0.0


@dataclass
class Rate:
    peak_flops: float
    per_call_s: float
    bwd_factor: float = 2.0

    def time(self, flops: float, calls: int, backward: bool) -> float:
        return calls * self.per_call_s * (2 if backward else 1) + flops * ((1 + self.bwd_factor) if backward else 1) \
            / self.peak_flops


@dataclass
class Link:
    latency_s: float
    bytes_per_s: float


@dataclass
class Profile:
    name: str
    source: str  # "measured" or "from specs, not measured"
    machine: dict
    experts: dict[str, Experts]  # by dtype name
    move_per_call_s: float
    move_bytes_per_s: float
    links: dict[str, Link]  # "intra", "inter"
    collective_s: float
    cores: int = 1
    ranks_share_cores: bool = False
    overlap: float = 1.0
    links_by_ranks: dict[str, dict[str, Link]] = field(default_factory=dict)  # measured at this many ranks
    # measured: the fixed cost of one dispatch + combine (all its collectives, no payload) by ranks
    # and strategy; where present it replaces the latency terms
    step_fixed_by_ranks: dict[str, dict[str, float]] = field(default_factory=dict)
    dense: dict[str, Rate] = field(default_factory=dict)  # by dtype name: a decoder block's GEMMs
    attention: dict[str, Rate] = field(default_factory=dict)  # by dtype name: causal SDPA
    # measured: seconds of `measure.speed_probe()` at calibration, to tell how much faster or
    # slower this shared machine runs at a later moment (validation reports both errors)
    probe_s: float = 0.0

    def _nearest(self, table: dict, ranks: int):
        """The entry of `table` (keyed by a measured rank count) nearest to `ranks`, and how much
        slower more ranks than measured make it where ranks share the machine's cores."""
        nearest = min(table, key=lambda r: abs(int(r) - ranks))
        stretch = max(1.0, ranks / int(nearest)) if self.ranks_share_cores else 1.0
        return table[nearest], stretch

    def step_fixed(self, strategy: str, ranks: int) -> float | None:
        if not self.step_fixed_by_ranks:
            return None
        fixed, stretch = self._nearest(self.step_fixed_by_ranks, ranks)
        return fixed[strategy] * stretch

    def link(self, level: str, ranks: int) -> Link:
        """The link of `level` as measured with the nearest number of ranks (local ranks share the
        machine: more of them, slower loopback)."""
        if not self.links_by_ranks:
            return self.links[level]
        levels, stretch = self._nearest(self.links_by_ranks, ranks)
        return Link(levels[level].latency_s * stretch, levels[level].bytes_per_s / stretch)

    def compute_scale(self, ranks: int) -> float:
        return max(1.0, ranks / self.cores) if self.ranks_share_cores else 1.0

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "Profile":
        d = json.loads(Path(path).read_text())
        d["experts"] = {k: Experts(**v) for k, v in d["experts"].items()}
        d["links"] = {k: Link(**v) for k, v in d["links"].items()}
        for kind in ("dense", "attention"):
            d[kind] = {k: Rate(**v) for k, v in d.get(kind, {}).items()}
        d["links_by_ranks"] = {r: {k: Link(**v) for k, v in levels.items()} for r, levels in d["links_by_ranks"].items()}
        return cls(**d)


def this_machine() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def _spec(name: str, bf16_flops: float, fp32_flops: float, hbm: float, intra: float, inter: float, lat_intra: float,
          lat_inter: float) -> Profile:
    """A profile from public peak numbers, derated the way measured runs usually are (GEMM at 70%
    of peak with half rate at 64 rows per expert, dense GEMMs at 70% and attention at 50% (its backward
2.5x its forward), links at 80% of their line rate)."""
    experts = {"bfloat16": Experts(0.7 * bf16_flops, 64.0, 5e-6), "float16": Experts(0.7 * bf16_flops, 64.0, 5e-6),
               "float32": Experts(0.7 * fp32_flops, 32.0, 5e-6)}
    peaks = {"bfloat16": bf16_flops, "float16": bf16_flops, "float32": fp32_flops}
    return Profile(name, "from specs, not measured", {"device": name}, experts, 10e-6, 0.6 * hbm,
                   {"intra": Link(lat_intra, 0.8 * intra), "inter": Link(lat_inter, 0.8 * inter)}, 20e-6,
                   dense={d: Rate(0.7 * f, 5e-6) for d, f in peaks.items()},
                   attention={d: Rate(0.5 * f, 10e-6, 2.5) for d, f in peaks.items()})


# Public figures: dense bf16 / fp32 (non-tensor-core-fp32 for A100: TF32 excluded) FLOP/s, HBM
# bytes/s, per-GPU intra-node (NVLink / HCCS) and inter-node (400 Gbit/s NIC per GPU; 200 Gbit/s
# RoCE for 910B) bytes/s.
SPECS = {
    # a cautious stand-in for an uncalibrated CPU whose local ranks share a few cores
    "cpu": Profile("CPU without calibration (assumed)", "from specs, not measured", {"device": "cpu"},
                   {d: Experts(50e9 if d == "float32" else 30e9, 8.0, 50e-6) for d in ("float32", "bfloat16", "float16")},
                   50e-6, 10e9, {"intra": Link(300e-6, 1e9), "inter": Link(300e-6, 1e9)}, 300e-6, cores=2,
                   ranks_share_cores=True, overlap=0.0,
                   dense={d: Rate(50e9 if d == "float32" else 30e9, 50e-6) for d in ("float32", "bfloat16", "float16")},
                   attention={d: Rate(20e9, 100e-6, 2.5) for d in ("float32", "bfloat16", "float16")}),
    "h200": _spec("NVIDIA H200 (specs)", 989e12, 67e12, 4.8e12, 450e9, 50e9, 3e-6, 10e-6),
    "a100": _spec("NVIDIA A100 SXM (specs)", 312e12, 19.5e12, 2.0e12, 300e9, 25e9, 3e-6, 10e-6),
    "ascend910b": _spec("Huawei Ascend 910B (specs)", 313e12, 75e12, 1.6e12, 196e9, 25e9, 5e-6, 15e-6),
}
