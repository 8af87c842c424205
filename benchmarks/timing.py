"""Wall-clock timing that is honest on a shared, noisy machine and on a GPU: candidates and
baselines measured interleaved (round-robin rounds), device sync, min / median / spread.

A busy machine slows whatever runs while it is busy. Timing each implementation in one block
lets a burst of load land on one of them and fake a ratio; interleaving spreads it over all of
them, and the min over rounds (the run least disturbed) is the most repeatable estimate of what
the code can do. The spread (max - min) / median over rounds says how disturbed the run was.
Ratios between them are taken within each round (`per_round`): where the machine's speed swings
(this one's memory read 55-220 GB/s from one minute to the next) it moves both alike, while each
one's own minimum can come from another round.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds per call of `repeats` back-to-back calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


@dataclass
class Timing:
    samples: list[float]  # seconds per call, one per round

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median over the rounds: 0 on a quiet machine; above 1 the machine was busy."""
        return (max(self.samples) - self.min) / self.median


def in_round(samples: float | list[float], i: int) -> float:
    """Round i's value of per-round samples (one value, or a list of one: every round's)."""
    if isinstance(samples, (int, float)):
        return samples
    return samples[i] if len(samples) > 1 else samples[0]


def rounds_of(*samples: float | list[float]) -> int:
    """How many rounds per-round samples span (the longest; single values span any)."""
    return max(1 if isinstance(s, (int, float)) else len(s) for s in samples)


def per_round(numerator: float | list[float], denominator: float | list[float]) -> float:
    """The median over the interleaved rounds of numerator / denominator within a round (each a
    value per round, or one value for every round)."""
    return statistics.median(in_round(numerator, i) / in_round(denominator, i)
                             for i in range(rounds_of(numerator, denominator)))


def interleaved(fns: list[Callable[[], object]], device: torch.device, *, rounds: int = 5,
                min_time: float = 0.25, progress: Callable[[int, int], None] | None = None,
                settle: list[float] | None = None) -> list[Timing]:
    """Times every fn in `rounds` round-robin rounds (each round visits every fn, starting one
    further along each time); in each round a fn runs back to back for about min_time / rounds
    seconds (at least once). One warm-up call each first, which also sizes the repeats.
    `settle[i]`: seconds to wait, untimed, after each run of fn i, for a fn whose worker threads
    keep spinning after it returns (they would slow the fn timed next).
    `progress(done, total)` after each fn's warm-up and each round."""
    settle = settle or [0.0] * len(fns)

    def timed(i: int, repeats: int) -> float:
        t = _time(fns[i], device, repeats)
        if settle[i]:
            time.sleep(settle[i])
        return t

    repeats = []
    for i in range(len(fns)):
        first = timed(i, 1)
        repeats.append(max(1, int(min_time / rounds / max(first, 1e-7))))
        if progress:
            progress(i + 1, len(fns) + rounds)
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for j in range(len(fns)):
            i = (r + j) % len(fns)
            samples[i].append(timed(i, repeats[i]))
        if progress:
            progress(len(fns) + r + 1, len(fns) + rounds)
    return [Timing(s) for s in samples]
