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
`trans_b=True`, or `[E, H, 2F]` / `[E, F, H]` when `is_transposed`): no copy, no transpose per
call. Where the experts carry no bias and use transformers' default gate with SiLU / GELU /
tanh-GELU, or DeepSeek-V4's clamped SwiGLU, `moe_experts` runs permute, the fused `expert_mlp` (gate
in the GEMM's epilogue on GPU) and unpermute in one call (one C++ call in CPU inference); other
gates (GPT-OSS's) go through the module's own `_apply_gate` between two grouped GEMMs. Per-expert
biases and `post_expert_norm` are applied per row. What it cannot serve (an experts module without
the weights it reads) goes to transformers' own "grouped_mm" path with a one-time warning naming why.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Callable

import torch
from torch import Tensor, nn

from .. import checks, grouped_gemm, moe_experts, packed_weights, permute, unpermute
from ..ops.moe_experts import _one_call, run_one_call

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
        if not isinstance(w, Tensor) or not (w.dim() == 3 or packed_weights.is_packed(w)):
            return f"no stacked [E, ., .] `{name}` weight"
    return None


_ACTIVATIONS: dict[type, str | None] = {}  # per class (a decode step asks every call)


def _activation(act_fn) -> str | None:
    """expert_mlp's name for a transformers activation module, or None."""
    cls = type(act_fn)
    if cls not in _ACTIVATIONS:
        from transformers import activations

        _ACTIVATIONS[cls] = ("swiglu" if issubclass(cls, (nn.SiLU, activations.SiLUActivation))
                             else "geglu" if issubclass(cls, activations.GELUActivation)  # erf GELU (its python variant too)
                             else "geglu_tanh" if issubclass(cls, (activations.GELUTanh, activations.NewGELUActivation))
                             else None)
    return _ACTIVATIONS[cls]


def _fused_gate(experts: nn.Module) -> tuple[str, float | None] | None:
    """(activation, limit) when the fused expert_mlp computes exactly this module's experts: gate |
    up concatenated, no biases, no post-expert norm, and transformers' default gate act(gate) * up
    or DeepSeek-V4's clamped one (`swiglu_limit`). None: run the module's own gate unfused."""
    if (not getattr(experts, "has_gate", True) or not getattr(experts, "is_concatenated", True)
            or getattr(experts, "has_bias", False) or getattr(experts, "has_post_expert_norm", False)):
        return None
    activation = _activation(getattr(experts, "act_fn", None))
    gate = getattr(type(experts), "_apply_gate", None)
    if activation is None:
        return None
    if gate is _moe._default_apply_gate:
        return activation, None
    if type(experts).__name__ == "DeepseekV4Experts" and isinstance(getattr(experts, "limit", None), (int, float)):
        return activation, float(experts.limit)
    return None


def _trans_b(experts: nn.Module, down: Tensor) -> bool:
    """Whether the weights are read transposed: transformers' usual [E, N, K] layout (prepacked
    weights hold the row-major operands, its usual ones packed as their transposes: pangu_ops.prepack)."""
    return not (getattr(experts, "is_transposed", False) or packed_weights.is_packed(down))


# experts module -> (weak references to the objects its plan read, its expert-parallel flag, the plan's
# (activation, trans_b, limit) or None): _kept_plan's; weakly keyed, and not on the module, which
# must stay picklable
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weak(obj) -> Callable[[], object]:
    """A weak reference to obj, or where obj takes none `_none` (always None): None itself matches
    it, any other such object never does (its plan is then made on every call)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return _none


def _none() -> None:
    return None


def _member(module: nn.Module, name: str):
    """getattr(module, name, None), for a parameter or submodule without nn.Module.__getattr__'s
    Python call (~0.5 us each; experts_forward and _kept_plan read three every call)."""
    d = module.__dict__
    found = d["_parameters"].get(name)
    if found is None:
        found = d["_modules"].get(name)
    return getattr(module, name, None) if found is None else found


def _plan(experts: nn.Module, down) -> tuple | None:
    """(activation, trans_b, limit) of moe_experts' single call where this module's experts are the
    fused expert_mlp's (served, fused gate, not expert-parallel; limit inf = no clamp), else None."""
    if _unsupported(experts) is not None or getattr(experts, "_is_expert_parallel", False):
        return None
    fused = _fused_gate(experts)
    return None if fused is None else (fused[0], _trans_b(experts, down), math.inf if fused[1] is None else fused[1])


def _kept_plan(experts: nn.Module, gate_up, down) -> tuple | None:
    """`_plan` in plain eager mode, kept: a decode step asks on every call and the checks took ~4 us
    (with warm caches; several times that after the layer's weight stream), so the answer is kept
    (_PLANS) with the objects it read that get replaced (the two weights, as prepack does, and
    `act_fn`) and the expert-parallel flag, and made again when any differs. (Dynamo traces no weak
    references: traced, `_plan` is asked once.)"""
    act_fn, parallel = _member(experts, "act_fn"), getattr(experts, "_is_expert_parallel", False)
    kept = _PLANS.get(experts)
    if kept is None or kept[0]() is not gate_up or kept[1]() is not down or kept[2]() is not act_fn \
            or kept[3] != parallel:
        kept = (_weak(gate_up), _weak(down), _weak(act_fn), parallel, _plan(experts, down))
        _PLANS[experts] = kept
    return kept[4]


def _check_inputs(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor) -> int:
    """The arguments' checks, named as the module's; returns E."""
    checks.tensor("hidden_states", hidden_states, 2, "[T, H]", checks.FLOAT_DTYPES)
    checks.tensor("top_k_index", top_k_index, 2, "[T, k]", checks.INDEX_DTYPES)
    weight = "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"
    checks.same_dtype("hidden_states", hidden_states, f"{type(experts).__name__}.{weight}", getattr(experts, weight))
    return getattr(experts, weight).shape[0]  # (also of a prepacked weight: pangu_ops.prepack)


def experts_forward(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers' experts interface on pangu_ops ops (see the module docstring)."""
    gate_up, down = _member(experts, "gate_up_proj"), _member(experts, "down_proj")
    if (isinstance(top_k_index, Tensor) and top_k_index.dim() == 2 and isinstance(top_k_weights, Tensor)
            and top_k_weights.shape == top_k_index.shape
            and _one_call(hidden_states, (hidden_states, top_k_index, top_k_weights, gate_up, down))):
        # a decode step's usual case first (plain eager CPU inference): one C++ call with no front
        # end before it, whose checks run only if it fails (at one token they cost ~30-50 us, the
        # caches cold after the layer's weight stream)
        plan = _kept_plan(experts, gate_up, down)
        if plan is not None and plan[2] > 0:
            try:
                return run_one_call((hidden_states, top_k_index, top_k_weights, gate_up, down, *plan))[0]
            except (ValueError, TypeError, RuntimeError):
                _check_inputs(experts, hidden_states, top_k_index)
                raise
    plan = _plan(experts, down) if torch.compiler.is_compiling() else _kept_plan(experts, gate_up, down)
    if plan is not None:  # (its checks passed: served, fused gate; limit inf = no clamp)
        trans_b, fused = plan[1], (plan[0], plan[2])
    else:
        why = _unsupported(experts)
        if why is not None:
            return _fallback(experts, why, hidden_states, top_k_index, top_k_weights)
        trans_b = _trans_b(experts, experts.down_proj)
        fused = _fused_gate(experts)
    num_experts = _check_inputs(experts, hidden_states, top_k_index)
    k = top_k_index.shape[1]
    if top_k_weights.dim() == 2 and top_k_weights.shape[1] != k:  # dense [T, E] routing weights
        checks.size("top_k_weights [T, E]", top_k_weights.shape[1], num_experts, "E (experts)")
        top_k_weights = top_k_weights.gather(1, top_k_index.long().clamp(0, num_experts - 1))
    ids = top_k_index
    if getattr(experts, "_is_expert_parallel", False):  # ids >= E are other ranks' experts: drop them
        ids = torch.where(ids < num_experts, ids, -1)
    if fused is not None:  # the whole of it in one call (one C++ call in CPU inference)
        activation, limit = fused
        return moe_experts(hidden_states, ids, top_k_weights, experts.gate_up_proj, experts.down_proj, activation,
                           trans_b=trans_b, limit=limit)[0]
    x_sorted, sizes, index = permute(hidden_states, ids, num_experts)
    rows_expert = None
    if getattr(experts, "has_bias", False):  # each row's expert, to add its expert's bias
        rows_expert = torch.repeat_interleave(torch.arange(num_experts, device=sizes.device), sizes,
                                              output_size=x_sorted.shape[0])

    def gemm(a: Tensor, weight: str) -> Tensor:
        out = grouped_gemm(a, getattr(experts, weight), sizes, trans_b)
        b = getattr(experts, f"{weight}_bias", None) if rows_expert is not None else None
        return out if b is None else out + b[rows_expert]

    if getattr(experts, "has_gate", True):
        h = experts._apply_gate(gemm(x_sorted, "gate_up_proj"))
    else:
        h = experts.act_fn(gemm(x_sorted, "up_proj"))
    y = gemm(h, "down_proj")
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    return unpermute(y, index, top_k_weights, hidden_states.shape[0], topk=k).to(hidden_states.dtype)


def register() -> None:
    """Registers the backend with transformers as "pangu_ops" (idempotent; done on import)."""
    _moe.ExpertsInterface.register(NAME, experts_forward)


register()

__all__ = ["NAME", "experts_forward", "register"]
