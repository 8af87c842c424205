"""Wall-clock timing that is honest on CPU and GPU: warm-up, device sync, median of repeats."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, *, min_time: float = 0.25,
                   max_repeats: int = 50) -> float:
    """Median time of `fn()` over repeats filling about `min_time` seconds (after one warm-up)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    repeats = max(3, min(max_repeats, int(min_time / max(first, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
