"""The cost model of MoE layers and their expert-parallel exchange: machine profiles (measured by
`calibrate`, or from public specs), the model (`predict`, `best_chunks`), the ranking of
configurations (`pangu-ops plan`) and its validation against measured runs (`sim.validate`)."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from .model import Layer, best_chunks, candidates, predict, rebalance_gain
from .profile import SPECS, Profile

__all__ = ["Layer", "Profile", "SPECS", "best_chunks", "cached_profile", "calibrate", "candidates", "default_profile",
           "predict", "rebalance_gain"]


def cached_profile(link_mbit: float | None = None) -> Path:
    """Where this machine's calibration is kept (`pangu-ops plan --calibrate`; one per emulated link)."""
    from ..backends.cache import cache_dir

    return cache_dir("sim") / (f"profile-{link_mbit:g}mbit.json" if link_mbit else "profile.json")


def default_profile(device: torch.device) -> Profile:
    """The profile `chunks="auto"` uses on `device`: this machine's cached calibration
    (`pangu-ops plan --calibrate`) on the CPU, else the spec profile of the accelerator (H200-class
    for NVIDIA H100/H200, A100, Ascend 910B for NPUs), else a cautious CPU profile."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else device.type
    return _default_profile(device.type, name)


@functools.lru_cache(maxsize=None)
def _default_profile(kind: str, name: str) -> Profile:
    if kind == "npu":
        return SPECS["ascend910b"]
    if kind == "cuda":
        return SPECS["a100"] if "A100" in name else SPECS["h200"]
    cached = cached_profile()
    return Profile.load(cached) if cached.exists() else SPECS["cpu"]


def calibrate(**kwargs) -> Profile:
    """Measures this machine: see `sim.calibration.calibrate`."""
    from .calibration import calibrate as run

    return run(**kwargs)
