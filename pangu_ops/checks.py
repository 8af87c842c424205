"""The argument contract of pangu_ops, shared by the ops, the references, the backends, routing and
the layers.

Argument checks shared by the ops: clear ValueError/TypeError naming the argument.

Metadata checks (type, rank, shape, dtype, device) run in the public functions and in every op's
fake kernel (so also while torch.compile traces) and cost no device sync; the C++ kernels repeat
the ones that guard memory safety for direct torch.ops calls. Value checks (expert ids in range, group sizes summing to the rows, valid slot
indices) read tensor data: the C++ kernels do them inline while they work, and the pure-PyTorch
reference calls the `*_values` functions below.
"""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
# Gated activations of expert_mlp: act(gate) * up with act = silu (SwiGLU), erf GELU (GeGLU) or
# tanh-approximated GELU (`reference.gated` defines them).
ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name: str, t: object, rank: int, layout: str, dtypes: Sequence[torch.dtype]) -> torch.Tensor:
    """`t` must be a tensor of the given rank (`layout` like "[T, H]") and one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_names(dtypes)}; got {t.dtype}")
    return t


def size(name: str, actual: int, expected: int, what: str) -> None:
    # traced data-dependent sizes (e.g. two permutes' row counts): a runtime assertion, and the
    # equality the compiler may rely on from here on, instead of a guard it cannot make
    if torch.compiler.is_compiling():
        torch._check(actual == expected)  # dynamo (torch <= 2.11) takes no message closing over a variable
    elif isinstance(actual, torch.SymInt) or isinstance(expected, torch.SymInt):
        message = f"{name}: expected {what}, got another size"
        torch._check(actual == expected, lambda: message)
    elif actual != expected:
        raise ValueError(f"{name}: expected {what} = {expected}, got {actual}")


def dynamic_rows(at_most: int, like: torch.Tensor) -> int | torch.SymInt:
    """The data-dependent row count of a fake kernel's output, bounded by what the op knows
    (0 <= rows <= at_most), so that later ops can reason about it under torch.compile. On meta
    tensors (shape inference: no values, no tracing context) the bound itself: every slot kept,
    which is exact for dropless routing."""
    if type(like) is torch.Tensor and like.device.type == "meta":
        return at_most
    ctx = torch.library.get_ctx()
    env = getattr(ctx, "_shape_env", ctx)  # (private: where torch renames it, symbolic sizes as before)
    if env is None or not getattr(env, "allow_dynamic_output_shape_ops", True):
        return at_most  # a FakeTensorMode that cannot make symbolic sizes: the bound, as on meta tensors
    if isinstance(at_most, torch.SymInt):
        rows = ctx.new_dynamic_size()
        torch._check(rows <= at_most)
        return rows
    return ctx.new_dynamic_size(max=at_most)


def has_values(t: torch.Tensor) -> bool:
    """Whether value checks can read `t` on the host: not while compiling, not on meta or fake
    tensors (shape inference; the kernels check values when real tensors arrive)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    return not torch._subclasses.fake_tensor.is_fake(t)


def same_device(**tensors: torch.Tensor | None) -> None:
    first = None
    for t in tensors.values():
        if t is None:
            continue
        if first is None:
            first = t.device
        elif t.device != first:
            where = ", ".join(f"{n} on {t.device}" for n, t in tensors.items() if t is not None)
            raise ValueError(f"all tensors must be on one device; got {where}")


def same_dtype(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} ({a.dtype}) and {b_name} ({b.dtype}) must have the same dtype")


def _int(name: str, value: object, minimum: int, what: str) -> None:
    if isinstance(value, torch.SymInt):  # traced size: its value is checked when the op runs
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a {what} int, got {value!r}")


def positive_int(name: str, value: object) -> None:
    _int(name, value, 1, "positive")


def non_negative_int(name: str, value: object) -> None:
    _int(name, value, 0, "non-negative")


# ---- value checks (read data; used by the reference backend) ----

def expert_ids_values(expert_ids: torch.Tensor, num_experts: int, *, first: int = 0, op: str = "permute",
                      experts: str | None = None) -> None:
    """Every id is -1 (dropped) or in [first, first + num_experts); `experts` describes that range
    in the message (default: "an expert id in [0, num_experts=E)")."""
    bad = (expert_ids < -1) | ((expert_ids >= 0) & (expert_ids < first)) | (expert_ids >= first + num_experts)
    if bool(bad.any()):
        t, j = (int(i) for i in bad.nonzero()[0])
        experts = experts or f"an expert id in [0, num_experts={num_experts})"
        raise ValueError(
            f"{op}: expert_ids[{t}, {j}] = {int(expert_ids[t, j])} is out of range: expected -1 (dropped) or {experts}"
        )


def group_sizes_values(op: str, group_sizes: torch.Tensor, rows: int) -> None:
    if bool((group_sizes < 0).any()):
        e = int((group_sizes < 0).nonzero()[0])
        raise ValueError(f"{op}: group_sizes[{e}] = {int(group_sizes[e])} is negative")
    total = int(group_sizes.sum())
    if total != rows:
        raise ValueError(f"{op}: group_sizes sum to {total} but x has {rows} rows")


def _distinct_in_range(op: str, name: str, values: torch.Tensor, bound: int, bound_text: str, twice: str) -> None:
    """Every entry of the 1-D `values` in [0, bound) and none repeated; messages name the first bad one."""
    bad = (values < 0) | (values >= bound)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{op}: {name}[{i}] = {int(values[i])} is out of range [0, {bound_text})")
    if values.unique().numel() != values.numel():
        raise ValueError(f"{op}: {twice}")


def expert_list_values(op: str, expert_ids: torch.Tensor, num_experts: int) -> None:
    """A list of distinct experts, each in [0, num_experts)."""
    _distinct_in_range(op, "expert_ids", expert_ids, num_experts, f"E={num_experts}",
                       "an expert is listed twice in expert_ids")


def sorted_index_values(sorted_index: torch.Tensor, slots: int) -> None:
    _distinct_in_range("unpermute", "sorted_index", sorted_index, slots, f"num_tokens * topk = {slots}",
                       "sorted_index holds a slot twice")
