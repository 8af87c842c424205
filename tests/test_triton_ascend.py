"""The Triton kernels through Huawei's Ascend Triton compiler (pangu_ops.backends.triton_ascend), on the CPU.

Runs only where triton-ascend and ascendnpu-ir are installed, an environment of their own (README:
Ascend NPUs); there the reference checks of every op file also run on the triton_ascend backend
(conftest). This file holds what only that path has: the compiler's acceptance of each kernel, its
rejections, and the CPU definition of the scan the kernels call.
"""
import sys

import pytest
import torch
import triton.language as tl

from pangu_ops import backends, verify

WHY = backends.status()["triton_ascend"]
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"triton-ascend / ascendnpu-ir not installed: {WHY}")

KERNELS = {"_histogram_kernel", "_scatter_kernel", "_invert_kernel", "_combine_kernel", "_backward_kernel",
           "_grouped_gemm_kernel", "_grouped_wgrad_kernel"}


def kernels():
    from pangu_ops.backends import triton_ascend

    return triton_ascend.load_kernels()


def test_bishengir_accepts_every_kernel():
    """Every kernel the ops launch (forward and backward, 16-bit and fp32) passed bishengir-compile's
    whole HFusion + HIVM pipeline for the Ascend target: "hivm" up to CANN's external hivmc, or
    "binary" where hivmc is installed."""
    case = verify.CASES[1]
    for op in verify.CHECKS:
        for dtype in (torch.float32, torch.bfloat16):
            bad = [r for r in verify.check(op, "triton_ascend", dtype, case) if not r.ok]
            assert not bad, bad
    accepted = kernels().compiler.accepted
    assert {key.split()[0] for key in accepted} == KERNELS
    assert set(accepted.values()) <= {"hivm", "binary"}, accepted


def test_tile_over_the_unified_buffer_is_rejected():
    """The gated expert-MLP GEMM at a GPU tile (128 x 128 x 64, fp32, two accumulators) needs more
    than an AI core's 192 KiB unified buffer: bishengir-compile refuses it. (Why the library takes
    its smallest tile when not autotuning.)"""
    from pangu_ops.backends import triton_ascend

    kernel = sys.modules[kernels().grouped_gemm.__module__]._grouped_gemm_kernel.fn  # the autotuner's JIT function
    S, K, N, E = 8, 64, 64, 1
    x, w = torch.randn(S, K), torch.randn(E, K, 2 * N)
    y, h, sizes = torch.empty(S, 2 * N), torch.empty(S, N), torch.tensor([S])
    with pytest.raises(triton_ascend.CompileError, match="ub overflow"):
        kernel[(1,)](x, w, y, h, sizes, S, E, N, K, *x.stride(), *w.stride(), *y.stride(), h.stride(0),
                     GATED=True, UPCAST=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)


def _scan(x_ptr, y_ptr, R: tl.constexpr, C: tl.constexpr, AXIS: tl.constexpr, REVERSE: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    tl.store(y_ptr + offs, tl.cumsum(tl.load(x_ptr + offs), axis=AXIS, reverse=REVERSE))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float32], ids=str)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("reverse", [False, True])
def test_cumsum_definition(dtype, axis, reverse):
    """tl.cumsum reaches the CPU as triton-adapter's library call, defined by triton_ascend."""
    from pangu_ops.backends import triton_ascend

    x = torch.randint(-50, 50, (8, 16)).to(dtype)
    y = torch.empty_like(x)
    triton_ascend.jit(_scan)[(1,)](x, y, R=8, C=16, AXIS=axis, REVERSE=reverse)
    expect = x.flip(axis).cumsum(axis).flip(axis) if reverse else x.cumsum(axis)
    torch.testing.assert_close(y, expect.to(dtype), rtol=0, atol=0)
