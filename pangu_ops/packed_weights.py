"""Prepacked expert weights: CPU inference on AMX tiles (or AVX512-BF16 products) without a second
copy of the experts.

The CPU backend's prefill kernels (csrc/amx_grouped.h) read a row-major expert weight
(`w[e]` as `[K, N]`: `MoEFeedForward`'s `w_gate_up [E, H, 2F]` and `w_down [E, F, H]`) as AMX B
tiles: pairs of rows interleaved (VNNI), 16 columns a tile. Made per call, that is a pass over the
weights that the tile work does not hide (30-40% of a Qwen3-MoE-shaped product); the packed-weight
cache (`pangu_ops.cpu_pack_cache`) keeps a second copy per weight version, capped. `prepack(model)`
instead rewrites each such weight's own storage into the tile order once, in place (a temporary of
one expert at a time), and holds it as a 4-D parameter of the packed shape:

    packed[e, c, p, 2j + h] = w[e, 2p + h, 16c + j]        packed: [E, N / 16, K / 2, 32]

The ops take such a weight wherever they take the `[E, K, N]` one, for inference: `expert_mlp`
runs the CPU backend's tile kernels for every group size (decode too) and the reference unpacks
it. Without AMX, where the CPU's few-row bf16 products are VDPBF16PS (`bf16_pair_dots`: AMD Zen
4), the same layout is VDPBF16PS's own operand (a 64-byte line: 16 columns x a pair of K), which
the CPU backend multiplies by each row's pair broadcast, no horizontal sums (`packed_pairs`).
Values are exact (a permutation of the same bf16 elements); `state_dict()` gives the usual
tensors and `load_state_dict` accepts them (packing on the way in); `unprepack(model)` restores
the layout in place (to train again). Transformers' experts modules served by the "pangu_ops"
experts backend are packed too: row-major operands (`is_transposed`: Aria's `[E, H, 2F]` /
`[E, F, H]`) as they are, and transformers' usual `[E, 2F, H]` / `[E, H, F]` (`[E, N, K]`) as the
packs of their transposes where the packed kernels are VDPBF16PS's (no AMX: the integration then
multiplies them as row-major ones; state_dict and unprepack give `[E, N, K]` back). On 2-core Zen 4,
Qwen3-MoE- and Mixtral-shaped `expert_mlp`: 0.71-1.0x the time of the unpacked `[E, N, K]` weights
at 1-2048 tokens (since the unpacked weights' prefill-sized groups run the same kernel on blocks
packed per call, packed_pairs.h: 0.65-1.0x at 64-2048 tokens, the same at 2048). With AMX they are
left as they are: at decode sizes the transposed kernels read their rows in place as A tiles
(packing their transposes measured on par: prefill 0.91-0.95x the time, decode 0.8-1.35x, 2-core
Xeon), and prefill-sized calls take their tiles from the packed-weight cache (a second copy,
capped).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .backends import cpu as cpu_backend

TILE_COLUMNS = 16  # columns of one packed block (a B tile's 16 columns x pairs of rows)
MULTIPLE = 32  # K and N of a packable weight (the tile kernels' step)
PACKED_NAMES = ("w_gate_up", "w_down")  # MoEFeedForward's row-major expert weights
HF_NAMES = ("gate_up_proj", "down_proj")  # transformers' experts modules' (row-major where is_transposed)
BACKENDS = ("auto", "cpu", "reference")  # the settings whose CPU kernels take packed weights


def is_packed(w: Tensor) -> bool:
    """A prepacked expert weight: 4-D `[E, N / 16, K / 2, 32]` (an expert weight is otherwise 3-D)."""
    return w.dim() == 4


def logical_shape(w: Tensor) -> tuple[int, int, int]:
    """(E, K, N) of a stacked row-major weight `[E, K, N]` or of its packed form."""
    if is_packed(w):
        return w.shape[0], 2 * w.shape[2], TILE_COLUMNS * w.shape[1]
    return tuple(w.shape)


def _check_shape(name: str, w: Tensor) -> None:
    if w.dim() != 4 or w.shape[3] != 2 * TILE_COLUMNS:
        raise ValueError(f"{name}: a prepacked weight is 4-D [E, N/16, K/2, 32], got shape {tuple(w.shape)}")
    _, k, n = logical_shape(w)
    if k % MULTIPLE or n % MULTIPLE:
        raise ValueError(f"{name}: a prepacked weight's K and N are multiples of {MULTIPLE}, got K={k}, N={n}")


def check_packed(name: str, w: Tensor) -> None:
    """`w` must be a packed weight as `pack` makes it, where the kernels take it: bf16, contiguous,
    `[E, N / 16, K / 2, 32]` with K and N multiples of 32, on the CPU."""
    _check_shape(name, w)
    if w.dtype != torch.bfloat16:
        raise TypeError(f"{name}: a prepacked weight is bfloat16, got {w.dtype}")
    if w.device.type not in ("cpu", "meta") or not w.is_contiguous():
        raise ValueError(f"{name}: a prepacked weight is a contiguous CPU tensor (the CPU backend's AMX form), "
                         f"got {'a non-contiguous one' if w.device.type == 'cpu' else w.device}; "
                         "pangu_ops.unprepack(model) gives the [E, K, N] weights back")


def packable(w: Tensor) -> str | None:
    """Why the stacked `[E, K, N]` weight `w` cannot be packed (None: it can)."""
    if w.dim() != 3:
        return f"not a stacked [E, K, N] weight (shape {tuple(w.shape)})"
    if w.dtype != torch.bfloat16:
        return f"dtype {w.dtype} (the AMX tiles take bfloat16)"
    if w.device.type != "cpu":
        return f"on {w.device} (the packed form is the CPU backend's)"
    if w.shape[1] % MULTIPLE or w.shape[2] % MULTIPLE:
        return f"K={w.shape[1]}, N={w.shape[2]}: not multiples of {MULTIPLE}"
    return None


def _packed_order(w: Tensor) -> Tensor:
    """[..., K, N] -> [..., N / 16, K / 2, 16, 2] (a view: w[..., 2p + h, 16c + j] at [..., c, p, j, h])."""
    *lead, k, n = w.shape
    d = len(lead)
    return w.view(*lead, k // 2, 2, n // TILE_COLUMNS, TILE_COLUMNS).permute(
        *range(d), d + 2, d, d + 3, d + 1)


def pack(w: Tensor) -> Tensor:
    """The packed form of a stacked `[E, K, N]` weight, as a new tensor."""
    reason = packable(w)
    if reason is not None:
        raise ValueError(f"pack: {reason}")
    e, k, n = w.shape
    return _packed_order(w).reshape(e, n // TILE_COLUMNS, k // 2, 2 * TILE_COLUMNS)


def unpack(p: Tensor) -> Tensor:
    """The `[E, K, N]` weight of a packed one (any dtype or device it was moved to), as a new tensor."""
    _check_shape("unpack", p)
    e, k, n = logical_shape(p)
    return p.view(e, n // TILE_COLUMNS, k // 2, TILE_COLUMNS, 2).permute(0, 2, 4, 1, 3).reshape(e, k, n)


def _row_major(w: Tensor, transposed: bool) -> Tensor:
    """The `[E, K, N]` view of a stacked weight (of its `[E, N, K]` form's transpose where
    `transposed`)."""
    return w.transpose(1, 2) if transposed else w


@torch.no_grad()
def _pack_(w: Tensor, transposed: bool) -> Tensor:
    """Packs a contiguous `[E, K, N]` weight (`[E, N, K]` as its transpose's pack where `transposed`)
    in its own storage, one expert's temporary at a time; returns the packed view of that storage."""
    e, k, n = _row_major(w, transposed).shape
    out = w.view(e, n // TILE_COLUMNS, k // 2, 2 * TILE_COLUMNS)
    for i in range(e):
        out[i].copy_(pack(_row_major(w[i:i + 1], transposed))[0])  # expert i copied, then written
    return out


@torch.no_grad()
def _unpack_(p: Tensor, transposed: bool) -> Tensor:
    """The inverse of `_pack_`: the `[E, K, N]` (`[E, N, K]`) view of p's storage, unpacked in place."""
    e, k, n = logical_shape(p)
    out = p.view(e, n, k) if transposed else p.view(e, k, n)
    for i in range(e):
        out[i].copy_(_row_major(unpack(p[i:i + 1]), transposed)[0])
    return out


def _state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, _metadata) -> None:
    """state_dict() of a prepacked layer: its weights as `[E, K, N]` (new tensors)."""
    for name in _names(module):
        key = prefix + name
        if key in state_dict and is_packed(state_dict[key]):
            state_dict[key] = _row_major(unpack(state_dict[key]), transposes(module)).contiguous()


def _load_state_dict_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
    """load_state_dict() into a prepacked layer: `[E, K, N]` (`[E, N, K]`) weights packed on the way in
    (into the copy of the dict that load_state_dict works on)."""
    for name in _names(module):
        key = prefix + name
        if key in state_dict and is_packed(getattr(module, name)) and not is_packed(state_dict[key]):
            state_dict[key] = pack(_row_major(state_dict[key], transposes(module)))


def _hf_experts(module: nn.Module) -> bool:
    """A transformers experts module (stacked gate_up_proj / down_proj, read through the experts
    interface)."""
    return hasattr(module, "has_gate") and all(isinstance(getattr(module, n, None), Tensor) for n in HF_NAMES)


def _names(module: nn.Module) -> tuple[str, str]:
    """The names of a packable module's two expert weights."""
    return HF_NAMES if _hf_experts(module) else PACKED_NAMES


def transposes(module: nn.Module) -> bool:
    """Whether a packable module's weights are held as `[E, N, K]` (transformers' usual experts),
    packed as their transposes' packs."""
    return _hf_experts(module) and not getattr(module, "is_transposed", False)


def _layers(model: nn.Module):
    from .nn.moe import MoEFeedForward

    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFeedForward) or _hf_experts(m)]


def prepack(model: nn.Module) -> dict[str, str]:
    """Packs the expert weights of every `MoEFeedForward` of `model`, and of every transformers
    experts module served by the "pangu_ops" experts backend with its fused gate (its usual
    `[E, 2F, H]` / `[E, H, F]` weights as their transposes, and only where the packed kernels are
    VDPBF16PS's, not AMX tiles), in place for CPU inference (see the module's docstring): bf16 on
    the CPU, K and N multiples of 32, on a CPU with AMX-BF16 or AVX512-BF16 products
    (`cpu_backend.packed_kernels()`; else RuntimeError: the packed form is that of their kernels).
    Packed weights take no gradient (`expert_mlp` refuses them where one is wanted: run under
    `torch.inference_mode()` or `torch.no_grad()`); a packed transformers module runs on the
    "pangu_ops" experts backend only (`unprepack` before switching it).

    Returns what happened to each MoE layer by name: "packed", "already packed", or why it was left
    as it is (another dtype or device, an ECSS pool, sizes, transformers' usual layout with AMX,
    another experts backend, a gate or bias the fused kernel does not compute)."""
    if not cpu_backend.packed_kernels():
        raise RuntimeError("prepack: this CPU (or the C++ extension's build) has neither AMX-BF16 tiles nor "
                           "AVX512-BF16 products, which the packed form is made for; the weights are left as they are")
    return {name: _prepack_layer(layer) for name, layer in _layers(model)}


def _unservable(layer: nn.Module) -> str | None:
    """Why a layer's experts cannot run packed (None: they can)."""
    if not _hf_experts(layer):
        return "left: an ECSS pool's slots (the pool rewrites them)" if layer.expert_pool is not None else None
    from .integrations import transformers as hf

    if transposes(layer) and cpu_backend.has_amx():
        return ("left: transformers' [E, 2F, H] / [E, H, F] experts are read in place by the transposed kernels at "
                "decode sizes, and prefill-sized calls take their tiles from the kernels' cache of packed weights")
    backend = getattr(getattr(layer, "config", None), "_experts_implementation", None)
    if backend != hf.NAME:
        return f"left: experts backend {backend!r}, not {hf.NAME!r} (set_experts_implementation('{hf.NAME}') first)"
    if hf._fused_gate(layer) is None:
        return "left: its gate, biases or norm are not the fused expert_mlp's"
    return None


def _prepack_layer(layer: nn.Module) -> str:
    names = _names(layer)
    weights = [getattr(layer, name) for name in names]
    if all(is_packed(w) for w in weights):
        return "already packed"
    why = _unservable(layer)
    if why is not None:
        return why
    transposed = transposes(layer)
    for name, w in zip(names, weights):
        reason = packable(_row_major(w, transposed) if w.dim() == 3 else w)
        if reason is not None:
            return f"left: {name} {reason}"
    layer._pangu_prepack_requires_grad = {name: w.requires_grad for name, w in zip(names, weights)}
    for name, w in zip(names, weights):
        setattr(layer, name, nn.Parameter(_pack_(w.data.contiguous(), transposed), requires_grad=False))
    if not getattr(layer, "_pangu_prepack_hooks", False):
        layer._register_state_dict_hook(_state_dict_hook)
        layer._register_load_state_dict_pre_hook(_load_state_dict_pre_hook, with_module=True)
        layer._pangu_prepack_hooks = True
    return "packed"


def unprepack(model: nn.Module) -> list[str]:
    """Undoes `prepack` in place: the packed layers' weights back to `[E, K, N]` parameters, taking
    gradients as they did before. Returns the names of the layers unpacked."""
    done = []
    for name, layer in _layers(model):
        names = _names(layer)
        if any(is_packed(getattr(layer, w)) for w in names):
            grads = getattr(layer, "_pangu_prepack_requires_grad", {})
            for w in names:
                setattr(layer, w, nn.Parameter(_unpack_(getattr(layer, w).data, transposes(layer)),
                                               requires_grad=grads.get(w, True)))
            done.append(name)
    return done
