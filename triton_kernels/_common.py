"""Helpers shared by the Triton kernels."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when @triton.jit runs, i.e. when these modules are imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Value checks (expert ids, group sizes, slot indices) read data on the host: a device sync. On a GPU
# they run only with PANGU_OPS_CHECK_VALUES=1 (debugging); the kernels mask every access, so bad
# values give wrong numbers, never out-of-bounds memory. On CPU tensors (the interpreter) they
# are free and always run.
CHECK_VALUES = os.environ.get("PANGU_OPS_CHECK_VALUES") == "1"


def check_values(t: torch.Tensor) -> bool:
    return CHECK_VALUES or t.device.type != "cuda"


def upcast_operands(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot returns garbage on bf16/fp16 operands (and its elementwise half
    arithmetic is broken): kernels upcast operands to fp32 after loading when interpreting."""
    return INTERPRET and dtype != torch.float32


def num_programs(device: torch.device, upper_bound: int, blocks_per_sm: int | None = None) -> int:
    """Programs of a persistent kernel: one wave on a GPU (SMs x the blocks of this kernel that fit
    on one SM at once; 1 where not known yet); a handful in the interpreter."""
    if device.type != "cuda":
        return max(1, min(4, upper_bound))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(sms * (blocks_per_sm or 1), upper_bound))


def gemm_configs(configs: list[triton.Config], key: list[str], prune=None):
    """Autotune over `configs` (narrowed per launch by `prune`) on a GPU; under the interpreter
    (slow per program) the launch passes INTERPRET_BLOCKS instead."""
    def wrap(kernel):
        if INTERPRET:
            return kernel
        return triton.autotune(configs=configs, key=key,
                               prune_configs_by={"early_config_prune": prune} if prune else None)(kernel)
    return wrap


@triton.jit
def load_tile(ptrs, mask, UPCAST: tl.constexpr):
    """Loads a tile (zeros where masked); in fp32 when UPCAST, else in the tensor's dtype."""
    v = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    return v


_INTERPRETING = tl.constexpr(INTERPRET)


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """fp32 -> `dtype` rounding to nearest even. Triton's interpreter truncates fp32 -> bf16
    (measured: half of all values one ulp toward zero), so there the rounding is done by hand."""
    if _INTERPRETING:
        if dtype == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            x = u.to(tl.float32, bitcast=True)
    return x.to(dtype)
