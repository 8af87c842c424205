"""Ranks agreeing on what they are about to exchange, before they exchange it.

A collective whose ranks disagree on the row width, dtype or count does not fail cleanly: gloo
aborts the receiving processes ("Received data size doesn't match expected size") and the sender
sees a dead peer. So before the rows travel, every rank gathers a small fixed-size signature of
every other rank's side (one all-gather of a few int64) and all of them raise the same
`ValueError`, naming the field and the ranks that differ, or none does.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

# Values that are not non-negative ints travel as negative codes: -(index + 1) in this list.
_SYMBOLS: list = [None, True, False, "flat", "hierarchical", torch.float32, torch.bfloat16, torch.float16,
                  torch.float64, torch.int32, torch.int64, "input error"]


def _encode(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"agreement: negative ints are not encodable ({value})")
        return value
    return -(_SYMBOLS.index(value) + 1)


def _decode(code: int):
    value = code if code >= 0 else _SYMBOLS[-code - 1]
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else value


# torch 2.13 renamed all_gather_into_tensor to all_gather_single (2.11 has only the former)
all_gather_into_tensor = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def collective_device(group=None) -> torch.device:
    """The device a collective on `group` takes its tensors on (NCCL: CUDA, HCCL: NPU, else CPU)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "hccl" in backend:
        return torch.device("npu", torch.npu.current_device())  # type: ignore[attr-defined]
    return torch.device("cpu")


def agree(what: str, values: dict[str, object], group, ranks: list[int], device: torch.device,
          error: Exception | None = None) -> None:
    """Every rank of `group` (global ranks `ranks`, in group order) calls this with the same keys;
    raises ValueError on every rank unless all ranks passed equal values. `error`: this rank's own
    input was rejected (it is re-raised here, and the other ranks raise naming this rank), so that
    no rank goes on to an exchange the others will not join."""
    keys = list(values)
    mine = [_encode("input error" if error is not None else None)]
    mine += [0 if error is not None else _encode(values[k]) for k in keys]
    everyone = torch.empty(len(ranks) * len(mine), dtype=torch.int64, device=device)
    all_gather_into_tensor(everyone, torch.tensor(mine, dtype=torch.int64, device=device), group=group)
    table = everyone.view(len(ranks), len(mine)).tolist()
    if error is not None:
        raise error
    failed = [ranks[g] for g, row in enumerate(table) if row[0] != mine[0]]
    if failed:
        raise ValueError(f"{what}: rank {', '.join(map(str, failed))} rejected its input (its own error says why); "
                         "no rank exchanged anything")
    problems = []
    for i, key in enumerate(keys, start=1):
        column = [row[i] for row in table]
        if len(set(column)) == 1:
            continue
        common = Counter(column).most_common(1)[0][0]
        odd = ", ".join(f"rank {ranks[g]} has {_decode(v)}" for g, v in enumerate(column) if v != common)
        problems.append(f"{key}: {odd}, the other ranks {_decode(common)}")
    if problems:
        raise ValueError(f"{what}: the ranks disagree on " + "; ".join(problems))
