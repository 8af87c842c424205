"""pangu::expert_mlp — every expert's gated MLP over its rows: y_e = swiglu(x_e @ w_gate_up[e]) @ w_down[e].

Kernels: `reference.expert_mlp`, `csrc/expert_mlp.cpp`, `triton_kernels/expert_mlp.py` (SwiGLU fused
into the gate/up GEMM's epilogue). The forward also returns gate_up (in x's dtype), saved for the
backward, which is built from the grouped GEMM ops: dh = dy @ w_down^T, dW_down = h^T dy, the
SwiGLU derivative (elementwise, fp32), dx = d_gate_up @ w_gate_up^T, dW_gate_up = x^T d_gate_up.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..reference import ACTIVATIONS, swiglu
from . import _checks
from .grouped_gemm import grouped_gemm_op, grouped_gemm_wgrad_op


def _check(x: Tensor, w_gate_up: Tensor, w_down: Tensor, group_sizes: Tensor, activation: str) -> None:
    _checks.tensor("x_sorted", x, 2, "[S, K]", _checks.FLOAT_DTYPES)
    _checks.tensor("w_gate_up", w_gate_up, 3, "[E, K, 2F]", _checks.FLOAT_DTYPES)
    _checks.tensor("w_down", w_down, 3, "[E, F, N]", _checks.FLOAT_DTYPES)
    _checks.same_dtype("x_sorted", x, "w_gate_up", w_gate_up)
    _checks.same_dtype("x_sorted", x, "w_down", w_down)
    E, K, two_f = w_gate_up.shape
    _checks.size("w_gate_up [E, K, 2F]", K, x.shape[1], "K (x_sorted.shape[1])")
    if two_f % 2:
        raise ValueError(f"w_gate_up [E, K, 2F]: the last dimension must be even (gate | up), got {two_f}")
    _checks.size("w_down [E, F, N]", w_down.shape[0], E, "E (w_gate_up.shape[0])")
    _checks.size("w_down [E, F, N]", w_down.shape[1], two_f // 2, "F (w_gate_up.shape[2] / 2)")
    _checks.tensor("group_sizes", group_sizes, 1, "[E]", _checks.INDEX_DTYPES)
    _checks.size("group_sizes", group_sizes.shape[0], E, "length (E = w_gate_up.shape[0])")
    _checks.same_device(x_sorted=x, w_gate_up=w_gate_up, w_down=w_down, group_sizes=group_sizes)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


@torch.library.custom_op("pangu::expert_mlp", mutates_args=())
def expert_mlp_op(x: Tensor, w_gate_up: Tensor, w_down: Tensor, group_sizes: Tensor,
                  activation: str) -> tuple[Tensor, Tensor]:
    """(y [S, N], gate_up [S, 2F])."""
    return backends.kernel("expert_mlp", x.device)(x, w_gate_up, w_down, group_sizes, activation)


@expert_mlp_op.register_fake
def _(x, w_gate_up, w_down, group_sizes, activation):
    _check(x, w_gate_up, w_down, group_sizes, activation)
    return x.new_empty(x.shape[0], w_down.shape[2]), x.new_empty(x.shape[0], w_gate_up.shape[2])


def _setup_context(ctx, inputs, output) -> None:
    x, w_gate_up, w_down, group_sizes, _ = inputs
    ctx.save_for_backward(x, w_gate_up, w_down, group_sizes, output[1])


def _swiglu_backward(gate_up: Tensor, dh: Tensor) -> Tensor:
    """d(silu(g) * u) / d[g | u] applied to dh, in fp32, in dh's dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    dhf = dh.float()
    d_gate = dhf * up * sig * (1 + gate * (1 - sig))
    return torch.cat([d_gate, dhf * gate * sig], dim=-1).to(dh.dtype)


def _backward(ctx, dy, _d_gate_up):
    x, w_gate_up, w_down, group_sizes, gate_up = ctx.saved_tensors
    h = swiglu(gate_up).to(x.dtype)
    dh = grouped_gemm_op(dy, w_down, group_sizes, True)
    d_gate_up = _swiglu_backward(gate_up, dh)
    dx = grouped_gemm_op(d_gate_up, w_gate_up, group_sizes, True) if ctx.needs_input_grad[0] else None
    dw_gate_up = grouped_gemm_wgrad_op(x, d_gate_up, group_sizes) if ctx.needs_input_grad[1] else None
    dw_down = grouped_gemm_wgrad_op(h, dy, group_sizes) if ctx.needs_input_grad[2] else None
    return dx, dw_gate_up, dw_down, None, None


expert_mlp_op.register_autograd(_backward, setup_context=_setup_context)


def expert_mlp(x_sorted: Tensor, w_gate_up: Tensor, w_down: Tensor, group_sizes: Tensor,
               activation: str = "swiglu") -> Tensor:
    """Every expert's SwiGLU MLP over its rows of `x_sorted` (rows grouped by expert, as `permute`
    returns them): `y_e = (silu(x_e @ Wg[e]) * (x_e @ Wu[e])) @ w_down[e]`.

    Args:
        x_sorted: `[S, K]`.
        w_gate_up: `[E, K, 2F]`, gate columns `[:F]` then up columns `[F:]`.
        w_down: `[E, F, N]`.
        group_sizes: `[E]` rows per expert, summing to S.
        activation: "swiglu".

    fp32 accumulation; the activation is applied to the fp32 gate/up values and rounded once.
    Returns `[S, N]` in x's dtype; differentiable in x_sorted, w_gate_up and w_down.
    """
    _check(x_sorted, w_gate_up, w_down, group_sizes, activation)
    return expert_mlp_op(x_sorted, w_gate_up, w_down, group_sizes, activation)[0]
