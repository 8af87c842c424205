"""permute on Triton: stable counting sort of the T*k slots by expert, then row scatter.

1. histogram: each program counts its block of slots per expert (a one-hot sum), and the ids that
   are out of range;
2. scan (torch.cumsum on the device): each (block, expert) gets its first output row, blocks in
   order, so the sort is stable;
3. scatter: each program ranks its slots inside the block (a cumsum of the one-hot matrix), writes
   sorted_index and copies the token rows to their final place.
The output's row count S (slots not dropped) is data: it is read once on the host between steps 2
and 3 (with the count of bad ids), the one host sync of this op, which a data-dependent shape needs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops import _checks

BLOCK_SLOTS = 64
BLOCK_H = 128


@triton.jit
def _histogram_kernel(ids_ptr, counts_ptr, bad_ptr, slots, E, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < slots, other=-1).to(tl.int32)
    experts = tl.arange(0, E_PAD)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
    tl.store(counts_ptr + pid * E + experts, tl.sum(onehot, axis=0), mask=experts < E)
    bad = ((ids < -1) | (ids >= E)).to(tl.int32)
    tl.store(bad_ptr + pid, tl.sum(bad, axis=0))


@triton.jit
def _scatter_kernel(ids_ptr, x_ptr, out_ptr, index_ptr, base_ptr, slots, E, topk, H, s_x, s_out,
                    BLOCK: tl.constexpr, E_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < slots, other=-1).to(tl.int32)
    onehot = (ids[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # earlier slots, same expert
    keep = (offs < slots) & (ids >= 0)
    pos = (tl.load(base_ptr + pid * E + ids, mask=keep, other=0) + rank).to(tl.int64)
    tl.store(index_ptr + pos, offs.to(tl.int64), mask=keep)
    token = (offs // topk).to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = keep[:, None] & (cols[None, :] < H)
        rows = tl.load(x_ptr + token[:, None] * s_x + cols[None, :], mask=mask)
        tl.store(out_ptr + pos[:, None] * s_out + cols[None, :], rows, mask=mask)


def permute(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    T, k = expert_ids.shape
    H, E, slots = x.shape[1], num_experts, T * k
    ids = expert_ids.contiguous().view(-1)
    x = x if x.stride(1) == 1 else x.contiguous()
    blocks = max(1, triton.cdiv(slots, BLOCK_SLOTS))
    e_pad = triton.next_power_of_2(E)
    counts = torch.empty(blocks, E, dtype=torch.int64, device=x.device)
    bad = torch.empty(blocks, dtype=torch.int64, device=x.device)
    _histogram_kernel[(blocks,)](ids, counts, bad, slots, E, BLOCK=BLOCK_SLOTS, E_PAD=e_pad)
    group_sizes = counts.sum(0)
    expert_start = torch.cumsum(group_sizes, 0) - group_sizes
    base = torch.cumsum(counts, 0) - counts + expert_start
    rows, n_bad = torch.stack([group_sizes.sum(), bad.sum()]).tolist()  # the one host sync
    if n_bad:
        _checks.expert_ids_values(expert_ids, E)  # finds the first bad id and raises
    x_sorted = torch.empty(rows, H, dtype=x.dtype, device=x.device)
    sorted_index = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows:
        _scatter_kernel[(blocks,)](ids, x, x_sorted, sorted_index, base, slots, E, k, H, x.stride(0),
                                   x_sorted.stride(0), BLOCK=BLOCK_SLOTS, E_PAD=e_pad, BLOCK_H=BLOCK_H)
    return x_sorted, group_sizes, sorted_index
