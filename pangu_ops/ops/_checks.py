"""Argument checks shared by the ops: clear ValueError/TypeError naming the argument.

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


def dynamic_rows(at_most: int) -> torch.SymInt:
    """The data-dependent row count of a fake kernel's output, bounded by what the op knows
    (0 <= rows <= at_most), so that later ops can reason about it under torch.compile."""
    if isinstance(at_most, torch.SymInt):
        rows = torch.library.get_ctx().new_dynamic_size()
        torch._check(rows <= at_most)
        return rows
    return torch.library.get_ctx().new_dynamic_size(max=at_most)


def same_device(**tensors: torch.Tensor | None) -> None:
    given = {n: t for n, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in given.items())
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


def sorted_index_values(sorted_index: torch.Tensor, slots: int) -> None:
    bad = (sorted_index < 0) | (sorted_index >= slots)
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise ValueError(f"unpermute: sorted_index[{r}] = {int(sorted_index[r])} is out of range "
                         f"[0, num_tokens * topk = {slots})")
    if sorted_index.unique().numel() != sorted_index.numel():
        raise ValueError("unpermute: sorted_index holds a slot twice")


def rre_lookup(token_ids: torch.Tensor, domain_ids: torch.Tensor, table: torch.Tensor,
               num_experts: int | None = None) -> torch.Tensor:
    """`table[domain_ids[b], token_ids[b, s]]` ([B, S] for a [D, V] table, [B, S, k] for a
    [D, V, k] one) after checking the domain and token ids, and that every expert found is in
    [0, num_experts) (only >= 0 when num_experts is None)."""
    num_domains, vocab = table.shape[:2]
    bad = (domain_ids < 0) | (domain_ids >= num_domains)
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise ValueError(f"domain_ids[{b}] = {int(domain_ids[b])} is out of range [0, num_domains={num_domains})")
    bad = (token_ids < 0) | (token_ids >= vocab)
    if bool(bad.any()):
        b, s = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"token_ids[{b}, {s}] = {int(token_ids[b, s])} is out of range [0, vocab_size={vocab})")
    experts = table[domain_ids.long()[:, None], token_ids.long()]
    bad = experts < 0 if num_experts is None else (experts < 0) | (experts >= num_experts)
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        b, s = where[:2]
        slot = "".join(f", {j}" for j in where[2:])
        bound = "a non-negative expert id" if num_experts is None else f"an expert id in [0, num_experts={num_experts})"
        raise ValueError(f"table[{int(domain_ids[b])}, {int(token_ids[b, s])}{slot}] = {int(experts[tuple(where)])} "
                         f"is not {bound}")
    return experts
