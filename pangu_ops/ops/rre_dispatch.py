"""pangu::rre_dispatch — a route-table lookup fused into permute: Random Routed Experts' [D, V]
table (k = 1), or a [D, V, k] one (hash routing by token id, k experts per token).

Kernels: `reference.rre_dispatch`, `csrc/rre_dispatch.cpp`, `triton_kernels/permute.py` (LOOKUP
mode). Returns what `permute` returns; the combine is `unpermute` with that k (RRE: no weights).
Backward: `unpermute` of the gradient, as for permute.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from ._define import define
from .unpermute import unpermute_op


def _check(x: Tensor, token_ids: Tensor, domain_ids: Tensor, table: Tensor, num_experts: int) -> None:
    checks.tensor("x", x, 2, "[B * S, H]", checks.FLOAT_DTYPES)
    checks.tensor("token_ids", token_ids, 2, "[B, S]", checks.INDEX_DTYPES)
    checks.tensor("domain_ids", domain_ids, 1, "[B]", checks.INDEX_DTYPES)
    if table.dim() == 3:
        checks.tensor("table", table, 3, "[num_domains, vocab_size, k]", checks.INDEX_DTYPES)
        checks.positive_int("table's k (table.shape[2])", table.shape[2])
    else:
        checks.tensor("table", table, 2, "[num_domains, vocab_size] or [num_domains, vocab_size, k]",
                       checks.INDEX_DTYPES)
    checks.size("domain_ids", domain_ids.shape[0], token_ids.shape[0], "length (B = token_ids.shape[0])")
    checks.size("x", x.shape[0], token_ids.shape[0] * token_ids.shape[1], "rows (B * S of token_ids)")
    checks.same_device(x=x, token_ids=token_ids, domain_ids=domain_ids, table=table)
    checks.positive_int("num_experts", num_experts)


def _fake(x, token_ids, domain_ids, table, num_experts):
    _check(x, token_ids, domain_ids, table, num_experts)
    rows = checks.dynamic_rows(x.shape[0] * _topk(table), x)
    return (x.new_empty(rows, x.shape[1]), token_ids.new_empty(num_experts, dtype=torch.int64),
            token_ids.new_empty(rows, dtype=torch.int64))


def _topk(table: Tensor) -> int:
    return table.shape[2] if table.dim() == 3 else 1


def _setup_context(ctx, inputs, output) -> None:
    ctx.num_tokens, ctx.topk = inputs[0].shape[0], _topk(inputs[3])
    ctx.save_for_backward(output[2])


def _backward(ctx, grad_x_sorted, _grad_sizes, _grad_index):
    (sorted_index,) = ctx.saved_tensors
    return unpermute_op(grad_x_sorted, sorted_index, None, ctx.num_tokens, ctx.topk), None, None, None, None


@define("rre_dispatch", fake=_fake, setup_context=_setup_context, backward=_backward)
def rre_dispatch_op(x: Tensor, token_ids: Tensor, domain_ids: Tensor, table: Tensor,
                    num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """(x_sorted, group_sizes, sorted_index): see `rre_dispatch`."""


def rre_dispatch(x: Tensor, token_ids: Tensor, domain_ids: Tensor, table: Tensor,
                 num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Route tokens with a frozen table and group them by expert, in one pass.

    Args:
        x: `[B * S, H]` token rows (batch-major).
        token_ids: `[B, S]` vocabulary ids.
        domain_ids: `[B]` the domain of each sample (zeros for a single table).
        table: `[num_domains, vocab_size]` global expert ids (RRE: `routing.rre_route_table`), or
            `[num_domains, vocab_size, k]`: k experts per token (hash routing: `routing.hash_table`).
        num_experts: E.

    Returns `permute`'s `(x_sorted, group_sizes, sorted_index)` with slot `t*k + j` for expert
    `table[d, token, j]`; combine with `unpermute(y_sorted, sorted_index, weights, B * S, topk=k)`
    (RRE: no weights, k = 1). Differentiable in x.
    """
    _check(x, token_ids, domain_ids, table, num_experts)
    return rre_dispatch_op(x, token_ids, domain_ids, table, num_experts)
