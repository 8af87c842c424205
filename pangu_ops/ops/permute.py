"""pangu::permute — group routed token rows by expert.

Kernels: `reference.permute`, `csrc/permute.cpp`. Backward: `unpermute` of the gradient (each
token's row sums the gradients of its slots).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from ._define import define
from .unpermute import unpermute_op


def _check(x: Tensor, expert_ids: Tensor, num_experts: int) -> None:
    checks.tensor("x", x, 2, "[T, H]", checks.FLOAT_DTYPES)
    checks.tensor("expert_ids", expert_ids, 2, "[T, k]", checks.INDEX_DTYPES)
    checks.size("expert_ids", expert_ids.shape[0], x.shape[0], "rows (T = x.shape[0])")
    checks.same_device(x=x, expert_ids=expert_ids)
    checks.positive_int("num_experts", num_experts)


def _fake(x: Tensor, expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    _check(x, expert_ids, num_experts)
    rows = checks.dynamic_rows(expert_ids.shape[0] * expert_ids.shape[1], x)  # slots not dropped
    return (x.new_empty(rows, x.shape[1]),
            expert_ids.new_empty(num_experts, dtype=torch.int64),
            expert_ids.new_empty(rows, dtype=torch.int64))


def _setup_context(ctx, inputs, output) -> None:
    _, expert_ids, _ = inputs
    ctx.num_tokens, ctx.topk = expert_ids.shape
    ctx.save_for_backward(output[2])


def permute_grad(grad_x_sorted: Tensor, sorted_index: Tensor, num_tokens: int, topk: int, unpermute=unpermute_op
                 ) -> Tensor:
    """x's gradient from x_sorted's: each token's rows summed back (unpermute without weights; by
    `unpermute`: the op, or a backend's unpermute kernel)."""
    return unpermute(grad_x_sorted, sorted_index, None, num_tokens, topk)


def _backward(ctx, grad_x_sorted, _grad_sizes, _grad_index):
    (sorted_index,) = ctx.saved_tensors
    return permute_grad(grad_x_sorted, sorted_index, ctx.num_tokens, ctx.topk), None, None


@define("permute", fake=_fake, setup_context=_setup_context, backward=_backward)
def permute_op(x: Tensor, expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """(x_sorted, group_sizes, sorted_index): see `permute`."""


def permute(x: Tensor, expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group the rows of `x` by the experts they are routed to.

    Args:
        x: `[T, H]` float32/bfloat16/float16 token rows.
        expert_ids: `[T, k]` int32/int64; `expert_ids[t, j]` is the j-th expert of token t, or -1
            for a dropped slot.
        num_experts: E; every id must be -1 or in `[0, E)`.

    Returns:
        `x_sorted [S, H]` (S = slots not dropped; rows grouped by expert ascending, in token then
        slot order inside an expert), `group_sizes [E]` int64, and `sorted_index [S]` int64 holding
        the flat slot `t*k + j` of every sorted row. Differentiable in `x`.
    """
    _check(x, expert_ids, num_experts)
    return permute_op(x, expert_ids, num_experts)
