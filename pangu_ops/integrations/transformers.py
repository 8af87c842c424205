"""The "pangu_ops" experts backend for Hugging Face transformers (>= 5).

    import pangu_ops.integrations.transformers  # registers "pangu_ops" (also done by `register()`)
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="pangu_ops")
    model.set_experts_implementation("pangu_ops")  # or switch an existing model

transformers routes every MoE model's expert computation through `ExpertsInterface`: a function
`fn(experts, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] or [T, E]) -> [T, H]`
reading the experts module's stacked weights. This one runs it on pangu_ops' ops, on whatever
backend serves the tensors' device:
  permute (rows grouped by expert, EP sentinels ids >= E dropped) -> grouped GEMM with the gate/up
  weights -> the module's gate (`_apply_gate`, or `act_fn` without a gate) -> grouped GEMM with
  the down weights -> unpermute (the weighted sum of each token's rows in fp32).
The weights are read in transformers' layouts as they are (`[E, 2F, H]` and `[E, H, F]` through
`grouped_gemm(..., trans_b=True)`, or `[E, H, 2F]` / `[E, F, H]` when `is_transposed`): no copy,
no transpose per call. Where the experts are transposed, carry no bias and use the default SwiGLU
gate, the fused `expert_mlp` op runs instead. Per-expert biases and `post_expert_norm` are applied
per row. What it cannot serve (an experts module without the weights it reads) goes to
transformers' own "grouped_mm" path with a one-time warning naming why.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .. import expert_mlp, grouped_gemm, permute, unpermute
from ..ops import _checks

NAME = "pangu_ops"

try:
    from transformers.integrations import moe as _moe
except ImportError as e:  # transformers is an optional extra
    raise ImportError("pangu_ops.integrations.transformers needs transformers >= 5 "
                      "(`pip install 'pangu_ops[transformers]'`)") from e

_warned: set[str] = set()


def _fallback(experts: nn.Module, why: str, *args) -> Tensor:
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"pangu_ops experts backend: {why}; {type(experts).__name__} runs transformers' "
                      "'grouped_mm' experts path instead", stacklevel=3)
    return _moe.grouped_mm_experts_forward(experts, *args)


def _unsupported(experts: nn.Module) -> str | None:
    """Why this experts module cannot be served, or None."""
    weight = "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"
    for name in (weight, "down_proj"):
        w = getattr(experts, name, None)
        if not isinstance(w, Tensor) or w.dim() != 3:
            return f"no stacked [E, ., .] `{name}` weight"
    return None


def _uses_fused_swiglu(experts: nn.Module) -> bool:
    """The fused expert_mlp computes exactly silu(gate) * up over [E, H, 2F] / [E, F, H] weights."""
    gate = getattr(type(experts), "_apply_gate", None)
    return (getattr(experts, "is_transposed", False) and getattr(experts, "has_gate", True)
            and getattr(experts, "is_concatenated", True) and not getattr(experts, "has_bias", False)
            and not getattr(experts, "has_post_expert_norm", False)
            and gate is _moe._default_apply_gate and isinstance(getattr(experts, "act_fn", None), nn.SiLU))


def experts_forward(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers' experts interface on pangu_ops ops (see the module docstring)."""
    why = _unsupported(experts)
    if why is not None:
        return _fallback(experts, why, hidden_states, top_k_index, top_k_weights)
    _checks.tensor("hidden_states", hidden_states, 2, "[T, H]", _checks.FLOAT_DTYPES)
    _checks.tensor("top_k_index", top_k_index, 2, "[T, k]", _checks.INDEX_DTYPES)
    num_experts = experts.gate_up_proj.shape[0] if getattr(experts, "has_gate", True) else experts.up_proj.shape[0]
    k = top_k_index.shape[1]
    if top_k_weights.dim() == 2 and top_k_weights.shape[1] != k:  # dense [T, E] routing weights
        _checks.size("top_k_weights [T, E]", top_k_weights.shape[1], num_experts, "E (experts)")
        top_k_weights = top_k_weights.gather(1, top_k_index.long().clamp(0, num_experts - 1))
    ids = top_k_index
    if getattr(experts, "_is_expert_parallel", False):  # ids >= E are other ranks' experts: drop them
        ids = torch.where(ids < num_experts, ids, -1)
    x_sorted, sizes, index = permute(hidden_states, ids, num_experts)
    trans_b = not getattr(experts, "is_transposed", False)
    if _uses_fused_swiglu(experts):
        y = expert_mlp(x_sorted, experts.gate_up_proj, experts.down_proj, sizes)
    else:
        rows_expert = None
        if getattr(experts, "has_bias", False):  # each row's expert, to add its expert's bias
            rows_expert = torch.repeat_interleave(torch.arange(num_experts, device=sizes.device), sizes,
                                                  output_size=x_sorted.shape[0])

        def bias(name: str) -> Tensor | float:
            b = getattr(experts, name, None) if rows_expert is not None else None
            return 0.0 if b is None else b[rows_expert]

        if getattr(experts, "has_gate", True):
            h = experts._apply_gate(grouped_gemm(x_sorted, experts.gate_up_proj, sizes, trans_b) + bias("gate_up_proj_bias"))
        else:
            h = experts.act_fn(grouped_gemm(x_sorted, experts.up_proj, sizes, trans_b) + bias("up_proj_bias"))
        y = grouped_gemm(h, experts.down_proj, sizes, trans_b) + bias("down_proj_bias")
        if getattr(experts, "has_post_expert_norm", False):
            y = experts.post_expert_norm(y)
    return unpermute(y, index, top_k_weights, hidden_states.shape[0], topk=k).to(hidden_states.dtype)


def register() -> None:
    """Registers the backend with transformers as "pangu_ops" (idempotent; done on import)."""
    _moe.ExpertsInterface.register(NAME, experts_forward)


register()

__all__ = ["NAME", "experts_forward", "register"]
