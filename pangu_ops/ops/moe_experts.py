"""moe_experts — a MoE layer's routed experts in one call: permute, expert_mlp, unpermute.

Kernels: those of the three ops. It is their composite (differentiable, any backend,
torch.compile), except in plain eager inference on the CPU backend, where one C++ call
(`csrc/moe_experts.cpp`) runs the same three kernels: at a decode step the two extra crossings from
Python and the ops' front ends cost more than permute's and unpermute's kernels (each op ~50 us
after a layer's weights had streamed through the caches, against ~5 for its kernel). In plain eager
mode with a gradient wanted the three kernels run as one autograd node (`_MoEExperts`), its
backward the three ops' backward formulas in turn: the same values and gradients, bit for bit, as
three nodes, with one node's Python and checks (the three ops' each checked their arguments again).
transformers' blocks through the integration, bf16 forward + backward (2-core Zen 5, median of
per-round ratios over 11 interleaved rounds): one-token steps 0.90-0.98x the time, 4-16 tokens
0.95-1.01x.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends, checks
from ._define import _plain_eager, _wants_grad
from .expert_mlp import _check_weights, check_trainable, expert_mlp, input_grads
from .permute import _check as _check_permute
from .permute import permute, permute_grad
from .unpermute import _check_routing_weights, unpermute, unpermute_backward_op, unpermute_op


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


# torch.ops.pangu_cpu.moe_experts.default, looked up on the first single call (each lookup through
# torch.ops took ~5 us of a decode step's cold caches)
_cpu_op = None


def run_one_call(args: tuple) -> tuple[Tensor, Tensor]:
    """The single C++ call on args = (x, expert_ids, weights, w_gate_up, w_down, activation,
    trans_b, limit), where `_one_call` says it runs (and limit > 0). The C++ kernels check every
    argument; on failure the Python checks name them."""
    global _cpu_op
    if _cpu_op is None:
        _cpu_op = torch.ops.pangu_cpu.moe_experts.default
    try:
        return _cpu_op(*args)
    except (ValueError, TypeError, RuntimeError):
        _check(*args)
        raise


def one_call(x: Tensor, expert_ids: Tensor, weights: Tensor | None, w_gate_up: Tensor, w_down: Tensor, activation: str,
             trans_b: bool, limit: float) -> tuple[Tensor, Tensor] | None:
    """moe_experts' result from the single C++ call where that runs it (`_one_call`), else None (the
    composite runs)."""
    args = (x, expert_ids, weights, w_gate_up, w_down, activation, trans_b, limit)
    if not (limit > 0 and _one_call(x, args[:5])):
        return None
    return run_one_call(args)


class _MoEExperts(torch.autograd.Function):
    """permute -> expert_mlp -> unpermute as one autograd node, on the backend's kernels (plain
    eager only: the composite of the three custom ops is what tracing sees)."""

    @staticmethod
    def forward(ctx, kernels, x, expert_ids, weights, w_gate_up, w_down, activation, trans_b, limit, num_experts):
        permute_kernel, expert_mlp_kernel, unpermute_kernel, _ = kernels
        ctx.needs_input_grad = ctx.needs_input_grad[1:]  # as the inputs after `kernels`
        x_sorted, sizes, index = permute_kernel(x, expert_ids, num_experts)
        y_sorted, gate_up = expert_mlp_kernel(x_sorted, w_gate_up, w_down, sizes, activation, trans_b, limit)
        num_tokens, topk = expert_ids.shape
        y = unpermute_kernel(y_sorted, index, weights, num_tokens, topk)
        ctx.weights_grad = weights is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(x_sorted, w_gate_up, w_down, sizes, gate_up, index, weights,
                              y_sorted if ctx.weights_grad else None)
        ctx.gate, ctx.shape, ctx.kernels = (activation, trans_b, limit), (num_tokens, topk), kernels
        ctx.mark_non_differentiable(sizes)
        return y, sizes

    @staticmethod
    def backward(ctx, dy, _d_sizes):
        x_sorted, w_gate_up, w_down, sizes, gate_up, index, weights, y_sorted = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: the ops, as three nodes' backward
            unpermute_kernel, unpermute_backward_kernel = unpermute_op, unpermute_backward_op
        else:  # the kernels the forward took, without the ops' front ends (~10-15 us each, cold)
            unpermute_kernel, unpermute_backward_kernel = ctx.kernels[2:]
        dy_sorted, d_weights = unpermute_backward_kernel(dy, index, weights, y_sorted, ctx.shape[1])
        expert_needs = (needs[0], needs[3], needs[4])
        dx_sorted, d_gate_up, d_down = input_grads(x_sorted, w_gate_up, w_down, sizes, gate_up, dy_sorted,
                                                   expert_needs, *ctx.gate) if any(expert_needs) else (None,) * 3
        dx = permute_grad(dx_sorted, index, *ctx.shape, unpermute_kernel) if needs[0] else None
        return None, dx, None, d_weights if ctx.weights_grad else None, d_gate_up, d_down, None, None, None, None


def _one_node_kernels(args: tuple) -> tuple | None:
    """The device's permute, expert_mlp, unpermute and unpermute_backward kernels where _MoEExperts
    takes the call (plain eager, a gradient wanted, the backend has them all), else None."""
    if not (_wants_grad(args) and _plain_eager(args)):
        return None
    try:
        return backends.kernels(("permute", "expert_mlp", "unpermute", "unpermute_backward"), args[0].device)
    except backends.BackendUnavailable:
        return None


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
    args = (x, expert_ids, weights, w_gate_up, w_down)
    kernels = _one_node_kernels(args)
    if kernels is not None:
        # the CPU backend's kernels check every argument (as in the single call): the Python checks
        # only name a failure there (before them, ~35 us of a decode step's cold caches)
        if not (limit > 0 and x.is_cpu and backends.cpu_takes("moe_experts")):
            _check(*args, activation, trans_b, limit)
        try:
            check_trainable("moe_experts", x, w_gate_up, w_down)
            return _MoEExperts.apply(kernels, *args, activation, trans_b, limit, w_gate_up.shape[0])
        except (ValueError, TypeError, RuntimeError, AttributeError, IndexError):
            _check(*args, activation, trans_b, limit)
            raise
    E = _check_weights(x, w_gate_up, w_down, activation, trans_b, limit, "x", "[T, K]")  # the ops check the rest
    x_sorted, sizes, index = permute(x, expert_ids, E)
    y = expert_mlp(x_sorted, w_gate_up, w_down, sizes, activation, trans_b=trans_b, limit=limit)
    return unpermute(y, index, weights, x.shape[0], topk=expert_ids.shape[1]), sizes
