"""moe_experts — a MoE layer's routed experts in one call: permute, expert_mlp, unpermute.

Kernels: those of the three ops. It is their composite (differentiable, any backend,
torch.compile), except in plain eager inference on the CPU backend, where one C++ call
(`csrc/moe_experts.cpp`) runs the same three kernels: at a decode step the two extra crossings from
Python and the ops' front ends cost more than permute's and unpermute's kernels (each op ~50 us
after a layer's weights had streamed through the caches, against ~5 for its kernel).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends, checks
from ._define import _plain_eager, _wants_grad
from .expert_mlp import _check_weights, expert_mlp
from .permute import _check as _check_permute
from .permute import permute
from .unpermute import _check_routing_weights, unpermute


def _one_call(x: Tensor, args: tuple) -> bool:
    """Whether the single C++ call runs it: CPU tensors on the cpu backend, plain eager, no gradient
    (x's device decides; another device among the rest fails in the call and the checks name it).
    Kept cheap: in a decode step the interpreter runs from L3, its data pushed out of L2 by the
    layer's weight stream, and each microsecond of Python becomes ~5."""
    return isinstance(x, Tensor) and x.is_cpu and not _wants_grad(args) and _plain_eager(args) \
        and backends.cpu_takes("moe_experts")


def _check(x: Tensor, expert_ids: Tensor, weights: Tensor | None, w_gate_up: Tensor, w_down: Tensor, activation: str,
           trans_b: bool, limit: float) -> int:
    """The three ops' argument checks; returns E."""
    E = _check_weights(x, w_gate_up, w_down, activation, trans_b, limit, "x", "[T, K]")
    _check_permute(x, expert_ids, E)
    _check_routing_weights(weights, *expert_ids.shape)
    checks.same_device(x=x, weights=weights)
    return E


def one_call(x: Tensor, expert_ids: Tensor, weights: Tensor | None, w_gate_up: Tensor, w_down: Tensor, activation: str,
             trans_b: bool, limit: float) -> tuple[Tensor, Tensor] | None:
    """moe_experts' result from the single C++ call where that runs it (`_one_call`), else None (the
    composite runs). The C++ kernels check every argument; on failure the Python checks name them."""
    args = (x, expert_ids, weights, w_gate_up, w_down, activation, trans_b, limit)
    if not (limit > 0 and _one_call(x, args[:5])):
        return None
    try:
        return torch.ops.pangu_cpu.moe_experts(*args)
    except (ValueError, TypeError, RuntimeError):
        _check(*args)
        raise


def moe_experts(x: Tensor, expert_ids: Tensor, weights: Tensor | None, w_gate_up: Tensor, w_down: Tensor,
                activation: str = "swiglu", *, trans_b: bool = False, limit: float | None = None
                ) -> tuple[Tensor, Tensor]:
    """The routed experts of a MoE layer: each token's rows through its experts' gated MLPs, summed
    with its routing weights — `permute`, `expert_mlp`, `unpermute` in one call.

    Args:
        x: `[T, K]` token rows.
        expert_ids: `[T, k]` int32/int64 expert of each slot, -1 for a dropped slot.
        weights: `[T, k]` routing weights (any float dtype), or None for all ones.
        w_gate_up, w_down, activation, trans_b, limit: as `expert_mlp` (prepacked weights too).

    Returns `(y [T, N], group_sizes [E])`: y in x's dtype (each token's rows summed in fp32), and
    the rows each expert received (for load statistics). Differentiable in x, the weights and the
    routing weights; bit-identical to the three ops called one after the other.
    """
    limit = math.inf if limit is None else float(limit)
    out = one_call(x, expert_ids, weights, w_gate_up, w_down, activation, trans_b, limit)
    if out is not None:
        return out
    E = _check_weights(x, w_gate_up, w_down, activation, trans_b, limit, "x", "[T, K]")  # the ops check the rest
    x_sorted, sizes, index = permute(x, expert_ids, E)
    y = expert_mlp(x_sorted, w_gate_up, w_down, sizes, activation, trans_b=trans_b, limit=limit)
    return unpermute(y, index, weights, x.shape[0], topk=expert_ids.shape[1]), sizes
