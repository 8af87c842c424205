"""pangu_ops' Triton kernels through Huawei's Ascend Triton compiler, run on the CPU.

With PyPI's `triton-ascend` (Triton for Ascend NPUs, installed as `triton`) and `ascendnpu-ir`
(`bishengir-compile` / `bishengir-opt`), every launch of a kernel in `triton_kernels/` goes:

1. Triton source -> TTIR -> linalg, by triton-ascend's own stages (its `triton-adapter-opt`): the
   exact IR an Ascend NPU build hands to `bishengir-compile`;
2. `bishengir-compile --target=<Ascend arch>` over that IR, the full HFusion + HIVM pipeline
   (tiling, UB memory planning, synchronisation), which must accept the kernel; only its last step,
   CANN's external `hivmc`, is absent without CANN, and the compiler says so;
3. the linalg IR lowered to the LLVM dialect with `bishengir-opt` (the passes of its CPU-runner
   pipeline), translated to an object file by triton-ascend's own LLVM, linked with g++, and run
   program by program over the launch grid on CPU tensors.

So the kernels' indexing, masking and arithmetic are checked as the Ascend compiler's front end
lowers them, and step 2 checks that its back end accepts them. Not covered: the post-HIVM IR is not
executed (the CPU runner wants a host entry with tensor arguments only, and its runner binary is not
shipped), nor anything NPU-side (hivmc's code, timing).

The backend `triton_ascend` (CPU tensors) loads only where both wheels are installed; they replace
upstream Triton, so use a separate environment (README: Ascend NPUs).

Modules: this one (the backend: what is installed, the stand-in driver, attaching the compiler to
every kernel), `compile` (steps 1-3), `run` (launching a compiled kernel over the grid).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from typing import Any

from .. import BackendUnavailable

ARCH = os.environ.get("PANGU_OPS_ASCEND_ARCH", "Ascend910B3")


class Unavailable(RuntimeError):
    """triton-ascend or ascendnpu-ir is missing (or unusable) here."""


class CompileError(RuntimeError):
    """A step of the Ascend compiler rejected a kernel."""


def installed() -> bool:
    """Whether the installed `triton` is triton-ascend."""
    spec = importlib.util.find_spec("triton")
    return spec is not None and importlib.util.find_spec("triton.backends.ascend") is not None


class _Driver:
    """The active Triton driver where no NPU is: it names the Ascend target and never benchmarks
    (load_kernels leaves each autotuner one config)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("npu", ARCH, 0)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        return lambda kernel_call, quantiles=None, **kw: [1.0] * len(quantiles or [0])


def smallest_tile(configs: list) -> Any:
    return min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])


@functools.cache
def load_kernels() -> Any:
    """`pangu_ops.triton_kernels`, its launches compiled as the module doc says. Raises Unavailable
    where triton-ascend or ascendnpu-ir is missing."""
    from .compile import Compiler, tools as find_tools

    tools = find_tools()
    import triton.language.standard
    from triton.runtime import autotuner, jit
    from triton.runtime.driver import driver

    if not isinstance(triton.language.standard._sum_combine, jit.JITFunction):
        raise Unavailable("TRITON_INTERPRET=1 was set when triton was imported: Triton's own helpers (tl.sum, "
                          "tl.cumsum) are then interpreted and cannot be compiled; unset it")
    if importlib.util.find_spec("torch_npu") is None:
        driver.set_active(_Driver())  # before the kernels' autotuners ask it for a benchmarker
    module = importlib.import_module("pangu_ops.triton_kernels")
    compiler = Compiler(tools)
    for sub in list(sys.modules.values()):
        if getattr(sub, "__name__", "").startswith(module.__name__ + "."):
            for obj in vars(sub).values():
                if isinstance(obj, autotuner.Autotuner):
                    # CPU runs are no place to time configs, and the GPU's larger tiles overflow an
                    # AI core's 192 KiB unified buffer (bishengir refuses the gated 128 x 128 one)
                    obj.configs = [smallest_tile(obj.configs)]
                    obj = obj.fn
                if isinstance(obj, jit.JITFunction):
                    compiler.attach(obj)
    module.compiler = compiler
    return module


def jit(fn) -> Any:
    """`fn` as a Triton kernel compiled and run like the library's (for tests of this path)."""
    from triton.runtime.jit import JITFunction

    return load_kernels().compiler.attach(JITFunction(fn))


def load() -> Any:
    """The `triton_ascend` backend's kernels (BackendUnavailable: why not)."""
    try:
        return load_kernels()
    except Unavailable as e:
        raise BackendUnavailable(str(e)) from e
