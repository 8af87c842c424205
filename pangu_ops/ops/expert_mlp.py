"""pangu::expert_mlp — every expert's gated MLP over its rows: y_e = act(x_e @ Wg[e]) * (x_e @ Wu[e]) @ w_down[e].

Kernels: `reference.expert_mlp`, `csrc/expert_mlp.cpp`, `triton_kernels/expert_mlp.py` (the gate
fused into the gate/up GEMM's epilogue). Gates: SwiGLU, GeGLU (erf or tanh GELU), each optionally
clamped (`limit`); weights `[E, K, 2F]` / `[E, F, N]`, or transposed (`trans_b`: HF's `[E, 2F, K]` /
`[E, N, F]`). The forward also returns gate_up (in x's dtype), saved for the backward, which is
built from the grouped GEMM ops: dh = dy @ w_down^T, dW_down = h^T dy, the gate's derivative
(elementwise, fp32), dx = d_gate_up @ w_gate_up^T, dW_gate_up = x^T d_gate_up. On the CPU backend in
plain eager one C++ call makes them (`expert_mlp_backward`): the same kernels, but for a bf16 or fp32
decode step in transformers' layout, where each weight's input and weight gradients come from one
pass over its rows (reading the weight while its gradient streams out).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends, checks, packed_weights
from ._define import _plain_eager, define
from .grouped_gemm import grouped_gemm_op, grouped_gemm_wgrad_op


def _prepacked(w_gate_up: Tensor, w_down: Tensor, trans_b: bool) -> bool:
    """Whether the weights are prepacked (`pangu_ops.prepack`), checked as such."""
    tensors = isinstance(w_gate_up, Tensor) and isinstance(w_down, Tensor)
    if not tensors or not (packed_weights.is_packed(w_gate_up) or packed_weights.is_packed(w_down)):
        return False
    if trans_b:
        raise ValueError("expert_mlp: prepacked weights are row-major [E, K, 2F] / [E, F, N] packed; trans_b must be False")
    packed_weights.check_packed("w_gate_up", w_gate_up)
    packed_weights.check_packed("w_down", w_down)
    if w_gate_up.device.type == "cpu" and backends.current_backend() not in packed_weights.BACKENDS:
        raise ValueError(f"expert_mlp: prepacked weights run on the {' or '.join(packed_weights.BACKENDS)} backend, not "
                         f"{backends.current_backend()!r}; pangu_ops.unprepack(model) restores the [E, K, N] weights")
    return True


def _check_weights(x: Tensor, w_gate_up: Tensor, w_down: Tensor, activation: str, trans_b: bool, limit: float,
                   x_name: str = "x_sorted", x_layout: str = "[S, K]") -> int:
    """The checks of x (its rows' width), the weights and the gate; returns E."""
    up_layout, down_layout = ("[E, 2F, K]", "[E, N, F]") if trans_b else ("[E, K, 2F]", "[E, F, N]")
    checks.tensor(x_name, x, 2, x_layout, checks.FLOAT_DTYPES)
    weights = w_gate_up, w_down
    if _prepacked(w_gate_up, w_down, trans_b):  # checked as their [E, K, N] shapes from here on
        w_gate_up, w_down = (torch.empty(packed_weights.logical_shape(w), dtype=w.dtype, device="meta") for w in weights)
    checks.tensor("w_gate_up", w_gate_up, 3, up_layout, checks.FLOAT_DTYPES)
    checks.tensor("w_down", w_down, 3, down_layout, checks.FLOAT_DTYPES)
    checks.same_dtype(x_name, x, "w_gate_up", w_gate_up)
    checks.same_dtype(x_name, x, "w_down", w_down)
    E = w_gate_up.shape[0]
    K, two_f = (w_gate_up.shape[2], w_gate_up.shape[1]) if trans_b else (w_gate_up.shape[1], w_gate_up.shape[2])
    checks.size(f"w_gate_up {up_layout}", K, x.shape[1], f"K ({x_name}.shape[1])")
    if two_f % 2:
        raise ValueError(f"w_gate_up {up_layout}: 2F must be even (gate | up), got {two_f}")
    checks.size(f"w_down {down_layout}", w_down.shape[0], E, "E (w_gate_up.shape[0])")
    checks.size(f"w_down {down_layout}", w_down.shape[2 if trans_b else 1], two_f // 2, "F (half of w_gate_up's 2F)")
    checks.same_device(**{x_name: x}, w_gate_up=weights[0], w_down=weights[1])
    if activation not in checks.ACTIVATIONS:
        raise ValueError(f"activation must be one of {checks.ACTIVATIONS}, got {activation!r}")
    if not limit > 0:  # also rejects NaN
        raise ValueError(f"limit must be positive (math.inf or None: no clamp), got {limit}")
    return E


def check_trainable(op: str, x: Tensor, w_gate_up: Tensor, w_down: Tensor) -> None:
    """Prepacked weights take no gradient: an error where one is wanted."""
    if packed_weights.is_packed(w_gate_up) and torch.is_grad_enabled() and (
            x.requires_grad or w_gate_up.requires_grad or w_down.requires_grad):
        raise RuntimeError(f"{op}: prepacked weights are for inference and take no gradient: run under "
                           "torch.inference_mode() / torch.no_grad(), or pangu_ops.unprepack(model) to train")


def _check(x: Tensor, w_gate_up: Tensor, w_down: Tensor, group_sizes: Tensor, activation: str, trans_b: bool,
           limit: float) -> None:
    E = _check_weights(x, w_gate_up, w_down, activation, trans_b, limit)
    checks.tensor("group_sizes", group_sizes, 1, "[E]", checks.INDEX_DTYPES)
    checks.size("group_sizes", group_sizes.shape[0], E, "length (E = w_gate_up.shape[0])")
    checks.same_device(x_sorted=x, group_sizes=group_sizes)


def _fake(x, w_gate_up, w_down, group_sizes, activation, trans_b, limit):
    _check(x, w_gate_up, w_down, group_sizes, activation, trans_b, limit)
    if trans_b:
        n, two_f = w_down.shape[1], w_gate_up.shape[1]
    else:
        n, two_f = packed_weights.logical_shape(w_down)[2], packed_weights.logical_shape(w_gate_up)[2]
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape[0], two_f)


def _setup_context(ctx, inputs, output) -> None:
    x, w_gate_up, w_down, group_sizes, ctx.activation, ctx.trans_b, ctx.limit = inputs
    ctx.save_for_backward(x, w_gate_up, w_down, group_sizes, output[1])
    # gate_up is kept for the backward pass, not differentiated through; and autograd must not fill
    # a zero [S, 2F] gradient for it on every backward (12 ms of a 330 ms Mixtral-shaped step)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _fake_gated_backward(gate_up, dh, activation, limit):
    return gate_up.new_empty(gate_up.shape, dtype=dh.dtype), gate_up.new_empty(dh.shape)


@define("gated_backward", fake=_fake_gated_backward)
def gated_backward_op(gate_up: Tensor, dh: Tensor, activation: str, limit: float) -> tuple[Tensor, Tensor]:
    """(d_gate_up [S, 2F], h [S, F]): `reference.gated_backward`, one fused pass on CPU."""


def _grads(x, w_gate_up, w_down, group_sizes, gate_up, dy, needs, wgrad, activation, trans_b, limit):
    """(dx, dw_gate_up, dw_down) where `needs` says which; `wgrad(a, b, sizes)` makes the weight
    gradients (the op's own: in x's dtype; fp32 for gradients accumulated over several calls)."""
    dh = grouped_gemm_op(dy, w_down, group_sizes, not trans_b)
    d_gate_up, h = gated_backward_op(gate_up, dh, activation, limit)
    dx = grouped_gemm_op(d_gate_up, w_gate_up, group_sizes, not trans_b) if needs[0] else None
    # w[e] = [K, N]: dw = a^T b; transposed w[e] = [N, K]: dw = b^T a
    dw_gate_up = (wgrad(d_gate_up, x, group_sizes) if trans_b else wgrad(x, d_gate_up, group_sizes)) if needs[1] else None
    dw_down = (wgrad(dy, h, group_sizes) if trans_b else wgrad(h, dy, group_sizes)) if needs[2] else None
    return dx, dw_gate_up, dw_down


def _one_backward_call(needs: tuple, tensors: tuple) -> bool:
    """Whether the CPU backend's single call (`csrc/expert_mlp.cpp`: expert_mlp_backward) makes the
    gradients: both weights' wanted, CPU tensors in plain eager (not traced: it has no fake kernel)."""
    return needs[1] and needs[2] and tensors[0].is_cpu and _plain_eager(tensors) \
        and backends.cpu_takes("expert_mlp_backward")


def input_grads(x, w_gate_up, w_down, group_sizes, gate_up, dy, needs, activation, trans_b, limit):
    """(dx, dw_gate_up, dw_down) of expert_mlp's output gradient dy where `needs` says which (the
    others None), from its inputs and the gate_up it kept: its backward, also moe_experts'."""
    if _one_backward_call(needs, (x, w_gate_up, w_down, group_sizes, gate_up, dy)):
        dx, dw_gate_up, dw_down = torch.ops.pangu_cpu.expert_mlp_backward(
            x, w_gate_up, w_down, group_sizes, gate_up, dy, activation, trans_b, limit)
        return dx if needs[0] else None, dw_gate_up, dw_down
    return _grads(x, w_gate_up, w_down, group_sizes, gate_up, dy, needs, grouped_gemm_wgrad_op, activation, trans_b,
                  limit)


def _backward(ctx, dy, _d_gate_up):
    return *input_grads(*ctx.saved_tensors, dy, ctx.needs_input_grad, ctx.activation, ctx.trans_b, ctx.limit), \
        None, None, None, None


@define("expert_mlp", fake=_fake, setup_context=_setup_context, backward=_backward)
def expert_mlp_op(x: Tensor, w_gate_up: Tensor, w_down: Tensor, group_sizes: Tensor, activation: str, trans_b: bool,
                  limit: float) -> tuple[Tensor, Tensor]:
    """(y [S, N], gate_up [S, 2F]): see `expert_mlp`."""


def _wgrad_fp32(a: Tensor, b: Tensor, group_sizes: Tensor) -> Tensor:
    # fp32 operands hold 16-bit values exactly: the products and their fp32 sums are those of the
    # 16-bit kernel, without its final rounding
    return grouped_gemm_wgrad_op(a.float(), b.float(), group_sizes)


class _Fp32Grad(torch.autograd.Function):
    """An fp32 stand-in for a weight: a free zero tensor of its shape (0-stride) whose gradient
    autograd sums in fp32 over every use, then hands to the weight rounded once."""

    @staticmethod
    def forward(ctx, w):
        ctx.dtype = w.dtype
        return torch.zeros((), dtype=torch.float32, device=w.device).expand(w.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype)


class _ExpertMLPFp32Grads(torch.autograd.Function):
    """expert_mlp whose weight gradients go, in fp32, to the `_Fp32Grad` stand-ins."""

    @staticmethod
    def forward(ctx, x, w_gate_up, w_down, group_sizes, activation, trans_b, limit, g_gate_up, g_down):
        y, gate_up = expert_mlp_op(x, w_gate_up, w_down, group_sizes, activation, trans_b, limit)
        ctx.save_for_backward(x, w_gate_up, w_down, group_sizes, gate_up)
        ctx.gate = (activation, trans_b, limit)
        ctx.mark_non_differentiable(gate_up)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_gate_up, w_down, group_sizes, gate_up = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dw_gate_up, dw_down = _grads(x, w_gate_up, w_down, group_sizes, gate_up, dy,
                                         (needs[0], needs[7], needs[8]), _wgrad_fp32, *ctx.gate)
        return dx, None, None, None, None, None, None, dw_gate_up, dw_down


def fp32_weight_grads(w_gate_up: Tensor, w_down: Tensor) -> tuple[Tensor, Tensor]:
    """For `expert_mlp(..., fp32_grads=...)` called several times with the same 16-bit weights
    (chunks of a batch, micro-batches): their gradients are summed in fp32 over the calls and
    rounded once, as one call over all the rows would give, instead of rounded per call and summed
    in 16 bits. Make it once per forward pass."""
    return _Fp32Grad.apply(w_gate_up), _Fp32Grad.apply(w_down)


def expert_mlp(x_sorted: Tensor, w_gate_up: Tensor, w_down: Tensor, group_sizes: Tensor,
               activation: str = "swiglu", *, trans_b: bool = False, limit: float | None = None,
               fp32_grads: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Every expert's gated MLP over its rows of `x_sorted` (rows grouped by expert, as `permute`
    returns them): `y_e = (act(x_e @ Wg[e]) * (x_e @ Wu[e])) @ w_down[e]`.

    Args:
        x_sorted: `[S, K]`.
        w_gate_up: `[E, K, 2F]`, gate columns `[:F]` then up columns `[F:]`; with `trans_b`,
            `[E, 2F, K]` (gate rows, then up rows: transformers' `gate_up_proj`); or, both weights
            prepacked for CPU inference (`pangu_ops.prepack`), `[E, 2F/16, K/2, 32]`.
        w_down: `[E, F, N]`; with `trans_b`, `[E, N, F]` (transformers' `down_proj`); prepacked,
            `[E, N/16, F/2, 32]`.
        group_sizes: `[E]` rows per expert, summing to S.
        activation: "swiglu" (silu), "geglu" (erf GELU) or "geglu_tanh" (tanh-approximated GELU).
        limit: clamps gate to `<= limit` and up to `[-limit, limit]` before the activation (the
            clamped SwiGLU of DeepSeek-V4, `swiglu_limit`); None: no clamp.
        fp32_grads: `fp32_weight_grads(w_gate_up, w_down)`, shared by several calls whose weight
            gradients must add up in fp32 (see there).

    fp32 accumulation; the activation is applied to the fp32 gate/up values and rounded once.
    Returns `[S, N]` in x's dtype; differentiable in x_sorted, w_gate_up and w_down.
    """
    limit = math.inf if limit is None else float(limit)
    _check(x_sorted, w_gate_up, w_down, group_sizes, activation, trans_b, limit)
    check_trainable("expert_mlp", x_sorted, w_gate_up, w_down)
    if fp32_grads is not None and torch.is_grad_enabled():
        return _ExpertMLPFp32Grads.apply(x_sorted, w_gate_up, w_down, group_sizes, activation, trans_b, limit,
                                         *fp32_grads)
    return expert_mlp_op(x_sorted, w_gate_up, w_down, group_sizes, activation, trans_b, limit)[0]
