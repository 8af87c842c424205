"""Pure-PyTorch references: the oracle every backend is checked against.

Written for clarity, not speed; accumulation in fp32. Each function has the signature of the
internal op of the same name (`torch.ops.pangu.<name>`), so this module is also the "reference"
backend. Differentiable through torch autograd in the float inputs, which gives the gradient
oracle for the ops' hand-written backward passes.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import checks, packed_weights, routing


def permute(x: Tensor, expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of x grouped by expert: (x_sorted [S, H], group_sizes [E] int64, sorted_index [S] int64).

    Slot `t*k + j` routes token t to expert `expert_ids[t, j]` (-1: dropped). Rows are grouped by
    expert ascending and keep slot order (token, then j) inside an expert.
    """
    checks.expert_ids_values(expert_ids, num_experts)
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1).long()
    kept_slots = torch.nonzero(flat >= 0).squeeze(1)  # ascending slot order
    kept_experts = flat[kept_slots]
    sorted_index = kept_slots[torch.argsort(kept_experts, stable=True)]
    group_sizes = torch.bincount(kept_experts, minlength=num_experts)
    # The fp32 round trip is exact; it makes the gradient (a sum over each token's slots)
    # accumulate in fp32 like the kernels do.
    return x.float()[sorted_index // k].to(x.dtype), group_sizes, sorted_index


def unpermute(y_sorted: Tensor, sorted_index: Tensor, weights: Tensor | None, num_tokens: int,
              topk: int) -> Tensor:
    """y[t] = sum_j weights[t, j] * y_sorted[row of slot (t, j)] in fp32, cast to y_sorted's dtype."""
    checks.sorted_index_values(sorted_index, num_tokens * topk)
    rows = y_sorted.float()
    if weights is not None:
        rows = rows * weights.reshape(-1)[sorted_index].float().unsqueeze(1)
    # each row to its slot (dropped slots stay 0), then each token's k slots summed in slot order:
    # deterministic on every device (index_add's atomics on a GPU add in a different order each call)
    slots = torch.zeros(num_tokens * topk, y_sorted.shape[1], dtype=torch.float32, device=y_sorted.device)
    slots[sorted_index] = rows
    return slots.view(num_tokens, topk, y_sorted.shape[1]).sum(1).to(y_sorted.dtype)


def unpermute_backward(grad_y: Tensor, sorted_index: Tensor, weights: Tensor | None,
                       y_sorted: Tensor | None, topk: int) -> tuple[Tensor, Tensor]:
    """Gradients of `unpermute`: (grad_y_sorted [S, N], grad_weights [T, k], or [0] when
    y_sorted is None and no weight gradient is wanted)."""
    checks.sorted_index_values(sorted_index, grad_y.shape[0] * topk)
    g = grad_y.float()[sorted_index // topk]  # [S, N]: the gradient reaching each sorted row
    w = (weights.reshape(-1)[sorted_index].float().unsqueeze(1) if weights is not None else 1.0)
    grad_y_sorted = (g * w).to(grad_y.dtype)
    if y_sorted is None:
        return grad_y_sorted, grad_y.new_empty(0, dtype=torch.float32)
    return grad_y_sorted, unpermute_weights_grad(grad_y, sorted_index, weights, y_sorted, topk)


def unpermute_weights_grad(grad_y: Tensor, sorted_index: Tensor, weights: Tensor, y_sorted: Tensor,
                           topk: int) -> Tensor:
    """grad_weights [T, k] of `unpermute`: <grad_y[token], y_sorted[row]> for each slot's row, in fp32."""
    assert weights is not None, "the weights' gradient needs weights"
    num_tokens = grad_y.shape[0]
    grad_w = torch.zeros(num_tokens * topk, dtype=torch.float32, device=grad_y.device)
    grad_w[sorted_index] = (grad_y.float()[sorted_index // topk] * y_sorted.float()).sum(1)
    return grad_w.view(num_tokens, topk).to(weights.dtype)


def grouped_gemm(x: Tensor, w: Tensor, group_sizes: Tensor, trans_b: bool) -> Tensor:
    """y [S, N]: rows of group e times w[e] ([E, K, N]; w[e]^T for [E, N, K] with trans_b)."""
    checks.group_sizes_values("grouped_gemm", group_sizes, x.shape[0])
    parts = []
    for e, x_e in enumerate(x.split(group_sizes.tolist())):
        w_e = w[e].t() if trans_b else w[e]
        parts.append(x_e.float() @ w_e.float())
    n = w.shape[1] if trans_b else w.shape[2]
    y = torch.cat(parts) if parts else x.new_empty(0, n, dtype=torch.float32)
    return y.to(x.dtype)


def grouped_gemm_wgrad(x: Tensor, dy: Tensor, group_sizes: Tensor) -> Tensor:
    """dw [E, K, N] with dw[e] = x_e^T @ dy_e in fp32 (zeros for an empty group)."""
    checks.group_sizes_values("grouped_gemm_wgrad", group_sizes, x.shape[0])
    sizes = group_sizes.tolist()
    dw = [x_e.float().t() @ dy_e.float() for x_e, dy_e in zip(x.split(sizes), dy.split(sizes))]
    if not dw:
        return x.new_empty(0, x.shape[1], dy.shape[1])
    return torch.stack(dw).to(x.dtype)


# Gated activations of expert_mlp (`checks.ACTIVATIONS`): act(gate) * up with act = silu (SwiGLU),
# erf GELU (GeGLU) or tanh-approximated GELU; `limit` (finite) clamps gate to <= limit and up to
# [-limit, limit] first (the clamped SwiGLU of DeepSeek-V4 / GLM-5, `swiglu_limit`).


def gated(gate_up: Tensor, activation: str = "swiglu", limit: float = math.inf) -> Tensor:
    """act(gate) * up in fp32, for gate_up = [gate | up] along the last dimension."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    if limit != math.inf:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    if activation == "swiglu":
        return torch.nn.functional.silu(gate) * up
    return torch.nn.functional.gelu(gate, approximate="tanh" if activation == "geglu_tanh" else "none") * up


def gated_backward(gate_up: Tensor, dh: Tensor, activation: str, limit: float) -> tuple[Tensor, Tensor]:
    """The backward of `gated`: (d_gate_up [S, 2F] in dh's dtype: the gradient of act(gate) * up
    through the clamps applied to dh, in fp32; h = gated(gate_up) [S, F] in gate_up's dtype,
    recomputed for the down weights' gradient)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    dhf = dh.float()
    if limit != math.inf:  # clamp's gradient: 1 inside [min, max] (bounds included, as torch's)
        pass_gate, pass_up = gate <= limit, (up >= -limit) & (up <= limit)
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    if activation == "swiglu":
        sig = torch.sigmoid(gate)
        act, d_act = gate * sig, sig * (1 + gate * (1 - sig))
    elif activation == "geglu":
        cdf = 0.5 * (1 + torch.erf(gate * math.sqrt(0.5)))
        act, d_act = gate * cdf, cdf + gate * torch.exp(-0.5 * gate * gate) * (0.5 * math.sqrt(2 / math.pi))
    else:  # geglu_tanh: x * sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3)
        c = math.sqrt(2 / math.pi)
        sig = torch.sigmoid(2 * c * (gate + 0.044715 * gate ** 3))
        act, d_act = gate * sig, sig + gate * sig * (1 - sig) * 2 * c * (1 + 3 * 0.044715 * gate * gate)
    d_gate, d_up = dhf * up * d_act, dhf * act
    if limit != math.inf:
        d_gate, d_up = d_gate * pass_gate, d_up * pass_up
    return torch.cat([d_gate, d_up], dim=-1).to(dh.dtype), (act * up).to(gate_up.dtype)


def expert_mlp(x: Tensor, w_gate_up: Tensor, w_down: Tensor, group_sizes: Tensor, activation: str,
               trans_b: bool, limit: float) -> tuple[Tensor, Tensor]:
    """gate_up = grouped_gemm(x, w_gate_up, trans_b) (rounded to x's dtype), h = gated(gate_up)
    (fp32 from the rounded gate_up, rounded), y = grouped_gemm(h, w_down, trans_b).
    Returns (y [S, N], gate_up [S, 2F]).

    Every backend activates the *rounded* gate_up, fused or not: the backward pass recomputes h
    from the saved gate_up, so forward and backward see the same h. Autograd through this
    function rounds the gradients where the op's backward does (dh, d_gate_up in x's dtype)."""
    if packed_weights.is_packed(w_gate_up):  # prepacked weights: the same values in tile order
        w_gate_up, w_down = packed_weights.unpack(w_gate_up), packed_weights.unpack(w_down)
    gate_up = grouped_gemm(x, w_gate_up, group_sizes, trans_b)
    h = gated(gate_up, activation, limit).to(x.dtype)
    return grouped_gemm(h, w_down, group_sizes, trans_b), gate_up


def rre_dispatch(x: Tensor, token_ids: Tensor, domain_ids: Tensor, table: Tensor,
                 num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Table-routed dispatch: the experts of token (b, s) are table[domain_ids[b], token_ids[b, s]]
    (RRE: a [D, V] table, top-1; hash routing: a [D, V, k] table, k experts); then `permute` of
    x [B*S, H] with those k = table.shape[2] (or 1) experts per token."""
    expert_ids = routing.rre_lookup(token_ids, domain_ids, table, num_experts)
    return permute(x, expert_ids.reshape(x.shape[0], table.shape[2] if table.dim() == 3 else 1), num_experts)


def adamw_experts(master: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, steps: Tensor, grads: Tensor,
                  expert_ids: Tensor, compute: Tensor | None, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float) -> None:
    """In place, for each listed expert e (rows of the [E, n] state) with gradient row g:
    torch.optim.AdamW's update with e's own step count (bias correction in fp64, the rest in fp32),
    and its new weights written to `compute` in compute's dtype when given."""
    checks.expert_list_values("adamw_experts", expert_ids, master.shape[0])
    ids = expert_ids.long()
    steps[ids] += 1
    t = steps[ids].double()
    step_size = (lr / (1 - beta1 ** t)).float()[:, None]
    bc2_sqrt = (1 - beta2 ** t).sqrt().float()[:, None]
    g = grads.float()
    p, m, v = master[ids], exp_avg[ids], exp_avg_sq[ids]
    p.mul_(1 - lr * weight_decay)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    p.sub_(step_size * m / (v.sqrt() / bc2_sqrt + eps))
    master[ids], exp_avg[ids], exp_avg_sq[ids] = p, m, v
    if compute is not None:
        compute[ids] = p.to(compute.dtype)


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """A learned router's logits in fp32: x [T, H] @ weight [E, H]^T on fp32 copies of both."""
    return torch.nn.functional.linear(x.float(), weight.float())


def router_logits_backward(grad: Tensor, x: Tensor, weight: Tensor, x_grad: bool,
                           weight_grad: bool) -> tuple[Tensor, Tensor]:
    """Gradients of `router_logits` for grad [T, E] fp32: (grad @ weight in x's dtype, grad^T @ x in
    weight's dtype), each computed in fp32 and rounded once; empty where not asked for."""
    dx = (grad @ weight.float()).to(x.dtype) if x_grad else x.new_empty(0)
    dw = (grad.t() @ x.float()).to(weight.dtype) if weight_grad else weight.new_empty(0)
    return dx, dw
