"""pangu::grouped_gemm — one GEMM per expert over its rows of the sorted activations.

Kernels: `reference.grouped_gemm`, `csrc/grouped_gemm.cpp`. Backward: dX is a grouped GEMM with
the other `trans_b`; dW is `pangu::grouped_gemm_wgrad` (a grouped GEMM over the token dimension).
"""
from __future__ import annotations

from torch import Tensor

from .. import checks
from ._define import define


def _check_sizes(group_sizes: Tensor, num_groups: int) -> None:
    checks.tensor("group_sizes", group_sizes, 1, "[E]", checks.INDEX_DTYPES)
    checks.size("group_sizes", group_sizes.shape[0], num_groups, "length (E = w.shape[0])")


def _check(x: Tensor, w: Tensor, group_sizes: Tensor, trans_b: bool) -> None:
    checks.tensor("x", x, 2, "[S, K]", checks.FLOAT_DTYPES)
    layout = "[E, N, K]" if trans_b else "[E, K, N]"
    checks.tensor("w", w, 3, layout, checks.FLOAT_DTYPES)
    checks.same_dtype("x", x, "w", w)
    checks.size(f"w {layout}", w.shape[2] if trans_b else w.shape[1], x.shape[1], "K (x.shape[1])")
    _check_sizes(group_sizes, w.shape[0])
    checks.same_device(x=x, w=w, group_sizes=group_sizes)


def _fake(x, w, group_sizes, trans_b):
    _check(x, w, group_sizes, trans_b)
    return x.new_empty(x.shape[0], w.shape[1] if trans_b else w.shape[2])


def _check_wgrad(x: Tensor, dy: Tensor, group_sizes: Tensor) -> None:
    checks.tensor("x", x, 2, "[S, K]", checks.FLOAT_DTYPES)
    checks.tensor("dy", dy, 2, "[S, N]", checks.FLOAT_DTYPES)
    checks.same_dtype("x", x, "dy", dy)
    checks.size("dy", dy.shape[0], x.shape[0], "rows (S = x.shape[0])")
    checks.tensor("group_sizes", group_sizes, 1, "[E]", checks.INDEX_DTYPES)
    checks.same_device(x=x, dy=dy, group_sizes=group_sizes)


def _fake_wgrad(x, dy, group_sizes):
    _check_wgrad(x, dy, group_sizes)
    return x.new_empty(group_sizes.shape[0], x.shape[1], dy.shape[1])


@define("grouped_gemm_wgrad", fake=_fake_wgrad)
def grouped_gemm_wgrad_op(x: Tensor, dy: Tensor, group_sizes: Tensor) -> Tensor:
    """dw [E, K, N] with dw[e] = x_e^T @ dy_e (fp32 accumulation, x's dtype)."""


def _setup_context(ctx, inputs, output) -> None:
    x, w, group_sizes, trans_b = inputs
    ctx.trans_b = trans_b
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                          w if ctx.needs_input_grad[0] else None, group_sizes)


def _backward(ctx, dy):
    x, w, group_sizes = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = grouped_gemm_op(dy, w, group_sizes, not ctx.trans_b)
    if ctx.needs_input_grad[1]:
        # y = x @ w[e] -> dw[e] = x^T dy; with trans_b y = x @ w[e]^T -> dw[e] = dy^T x.
        dw = grouped_gemm_wgrad_op(dy, x, group_sizes) if ctx.trans_b else grouped_gemm_wgrad_op(x, dy, group_sizes)
    return dx, dw, None, None


@define("grouped_gemm", fake=_fake, setup_context=_setup_context, backward=_backward)
def grouped_gemm_op(x: Tensor, w: Tensor, group_sizes: Tensor, trans_b: bool) -> Tensor:
    """y [S, N]: see `grouped_gemm`."""


def grouped_gemm(x: Tensor, w: Tensor, group_sizes: Tensor, trans_b: bool = False) -> Tensor:
    """Multiply each expert's rows by its weight: `y[rows of e] = x[rows of e] @ w[e]`.

    Args:
        x: `[S, K]` rows grouped by expert (as `permute` returns them).
        w: `[E, K, N]`, or `[E, N, K]` with `trans_b=True` (then `w[e]^T` is used).
        group_sizes: `[E]` int64/int32 rows per expert, summing to S, on x's device.

    Accumulates in fp32; returns `[S, N]` in x's dtype. Differentiable in `x` and `w`.
    Interop: torch's `F.grouped_mm` takes `offs = group_sizes.cumsum(0).int()`.
    """
    _check(x, w, group_sizes, trans_b)
    return grouped_gemm_op(x, w, group_sizes, trans_b)
