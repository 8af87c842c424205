"""pangu::unpermute — weighted sum of each token's expert outputs (the combine after permute).

Kernels: `reference.unpermute`, `csrc/unpermute.cpp`. Backward: the fused op
`pangu::unpermute_backward` (scaled gather of the output gradient, plus the weights' gradient).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from ._define import define


def _check_routing_weights(weights: Tensor | None, num_tokens: int, topk: int) -> None:
    """weights: None or a float [num_tokens, topk] tensor."""
    if weights is not None:
        checks.tensor("weights", weights, 2, "[T, k]", checks.FLOAT_DTYPES)
        if tuple(weights.shape) != (num_tokens, topk):
            raise ValueError(f"weights must be [num_tokens, topk] = [{num_tokens}, {topk}], "
                             f"got {tuple(weights.shape)}")


def _check_index_weights(sorted_index: Tensor, rows: int, weights: Tensor | None, num_tokens: int,
                         topk: int, **tensors: Tensor | None) -> None:
    checks.tensor("sorted_index", sorted_index, 1, "[S]", (torch.int64,))
    checks.size("sorted_index", sorted_index.shape[0], rows, "length (S = rows of y_sorted)")
    checks.non_negative_int("num_tokens", num_tokens)
    checks.positive_int("topk", topk)
    _check_routing_weights(weights, num_tokens, topk)
    checks.same_device(sorted_index=sorted_index, weights=weights, **tensors)


def _check(y_sorted: Tensor, sorted_index: Tensor, weights: Tensor | None, num_tokens: int,
           topk: int) -> None:
    checks.tensor("y_sorted", y_sorted, 2, "[S, N]", checks.FLOAT_DTYPES)
    _check_index_weights(sorted_index, y_sorted.shape[0], weights, num_tokens, topk, y_sorted=y_sorted)


def _fake(y_sorted, sorted_index, weights, num_tokens, topk):
    _check(y_sorted, sorted_index, weights, num_tokens, topk)
    return y_sorted.new_empty(num_tokens, y_sorted.shape[1])


def _check_backward(grad_y: Tensor, sorted_index: Tensor, weights: Tensor | None,
                    y_sorted: Tensor | None, topk: int) -> None:
    checks.tensor("grad_y", grad_y, 2, "[T, N]", checks.FLOAT_DTYPES)
    rows = sorted_index.shape[0]
    if y_sorted is not None:
        checks.tensor("y_sorted", y_sorted, 2, "[S, N]", checks.FLOAT_DTYPES)
        checks.same_dtype("grad_y", grad_y, "y_sorted", y_sorted)
        if weights is None:
            raise ValueError("unpermute_backward: y_sorted is only needed for the weights' gradient")
        rows = y_sorted.shape[0]
    _check_index_weights(sorted_index, rows, weights, grad_y.shape[0], topk,
                         grad_y=grad_y, y_sorted=y_sorted)


def _fake_backward(grad_y, sorted_index, weights, y_sorted, topk):
    _check_backward(grad_y, sorted_index, weights, y_sorted, topk)
    grad_w = (weights.new_empty(weights.shape) if y_sorted is not None
              else grad_y.new_empty(0, dtype=torch.float32))
    return grad_y.new_empty(sorted_index.shape[0], grad_y.shape[1]), grad_w


@define("unpermute_backward", fake=_fake_backward)
def unpermute_backward_op(grad_y: Tensor, sorted_index: Tensor, weights: Tensor | None, y_sorted: Tensor | None,
                          topk: int) -> tuple[Tensor, Tensor]:
    """(grad_y_sorted, grad_weights); grad_weights is empty unless y_sorted is given."""


def _setup_context(ctx, inputs, output) -> None:
    y_sorted, sorted_index, weights, _, topk = inputs
    ctx.topk = topk
    ctx.weights_grad = weights is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(sorted_index, weights, y_sorted if ctx.weights_grad else None)


def _backward(ctx, grad_y):
    sorted_index, weights, y_sorted = ctx.saved_tensors
    grad_y_sorted, grad_w = unpermute_backward_op(grad_y, sorted_index, weights, y_sorted, ctx.topk)
    return grad_y_sorted, None, grad_w if ctx.weights_grad else None, None, None


@define("unpermute", fake=_fake, setup_context=_setup_context, backward=_backward)
def unpermute_op(y_sorted: Tensor, sorted_index: Tensor, weights: Tensor | None, num_tokens: int,
                 topk: int) -> Tensor:
    """y [T, N]: see `unpermute`."""


def unpermute(y_sorted: Tensor, sorted_index: Tensor, weights: Tensor | None = None,
              num_tokens: int | None = None, *, topk: int | None = None) -> Tensor:
    """Combine expert outputs back into token order: `y[t] = sum_j weights[t, j] * y_sorted[row
    of slot (t, j)]`, accumulated in fp32, in y_sorted's dtype.

    Args:
        y_sorted: `[S, N]` expert outputs in `permute`'s row order.
        sorted_index: `[S]` int64 from `permute`.
        weights: `[T, k]` gate weights (any float dtype), or None for all ones.
        num_tokens: T; defaults to `weights.shape[0]`.
        topk: k; defaults to `weights.shape[1]`. Required when `weights` is None.

    Dropped slots contribute nothing; a token with no kept slot gets zeros. Differentiable in
    `y_sorted` and `weights`.
    """
    if weights is not None and isinstance(weights, Tensor) and weights.dim() == 2:
        num_tokens = weights.shape[0] if num_tokens is None else num_tokens
        topk = weights.shape[1] if topk is None else topk
    if num_tokens is None or topk is None:
        raise ValueError("unpermute: pass num_tokens and topk= when weights is None")
    _check(y_sorted, sorted_index, weights, num_tokens, topk)
    return unpermute_op(y_sorted, sorted_index, weights, num_tokens, topk)
