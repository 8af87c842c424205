"""What this CPU does fast, measured once per process (cheap probes, cached).

Half-precision matmul on CPUs ranges from pathological (AVX2 only: torch's bf16 mm ~0.3 GFLOP/s,
200x slower than fp32) to the fastest path there is (AMX-BF16: several times fp32). Flags in
/proc/cpuinfo and oneDNN's "supported" answers do not say which (oneDNN reports bf16 support on
AVX-512 machines that emulate it), so the probe times a small matmul in the dtype against fp32.
"""
from __future__ import annotations

import functools
import time

import torch


def _seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def native_half_matmul(dtype: torch.dtype) -> bool:
    """True when torch's CPU matmul in `dtype` (bfloat16/float16) is at least as fast as in float32
    here: a 128 x 512 x 512 probe (a few ms where it is; where it is not, one call, up to ~0.2 s)."""
    if dtype == torch.float32:
        return True
    a, b = torch.randn(128, 512), torch.randn(512, 512)
    ah, bh = a.to(dtype), b.to(dtype)
    fp32 = _seconds(a, b, 4)
    if _seconds(ah, bh, 1) > 20 * fp32:  # (the first call sets up oneDNN's kernel for the shape)
        return False
    return _seconds(ah, bh, 3) <= fp32
