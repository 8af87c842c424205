"""permute (and rre_dispatch) on Triton: stable counting sort of the T*k slots by expert, then
row scatter. In LOOKUP mode (rre_dispatch) slot j of a token has expert table[domain, token, j]
(k = 1 for RRE's [D, V] table), read inside both kernels, so no expert-id tensor is written.

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

from .. import checks, routing

BLOCK_SLOTS = 64
BLOCK_H = 128
# Fewest one-hot columns: Triton 3.6 fails to lower the scatter's cumsum over a [64, E_PAD] block
# for E_PAD <= 4 with 16-bit rows and <= 2 with fp32 ones (an assertion in ScanOpToLLVM, on sm_90;
# compile-check with 3.6, and the H100 run's bench test); Triton 3.8 compiles them. Padding costs nothing.
MIN_E_PAD = 16


def expert_columns(num_experts: int) -> int:
    """E_PAD: the one-hot block's expert columns, a power of two."""
    return max(MIN_E_PAD, triton.next_power_of_2(num_experts))


def block_slots(lookup: bool, e_pad: int) -> int:
    """Slots per program: 64, or 32 for table lookups over 128+ experts (whose address math with
    64 slots spills ~0.6-0.9 KB per thread on sm_90: compile-check)."""
    return 32 if lookup and e_pad >= 128 else BLOCK_SLOTS


def num_warps(e_pad: int) -> int:
    """Warps for a [BLOCK_SLOTS, E_PAD] one-hot block: 4 up to 64 experts, more beyond (with 4 warps
    at E = 256 the scatter spills ~2 KB per thread on sm_90: compile-check)."""
    return min(16, max(4, e_pad // 32))


@triton.jit
def _slot_experts(offs, slots, ids_ptr, dom_ptr, table_ptr, seq, D, V, topk, LOOKUP: tl.constexpr):
    """Expert of each slot: -1 dropped (or past the end), -2 bad (token or domain out of range)."""
    live = offs < slots
    if LOOKUP:
        token = offs // topk
        tok = tl.load(ids_ptr + token, mask=live, other=0).to(tl.int64)
        dom = tl.load(dom_ptr + token // seq, mask=live, other=0).to(tl.int64)
        ok = (tok >= 0) & (tok < V) & (dom >= 0) & (dom < D)
        ids = tl.load(table_ptr + (dom * V + tok) * topk + offs % topk, mask=live & ok, other=-2).to(tl.int32)
        ids = tl.where(live, ids, -1)
    else:
        ids = tl.load(ids_ptr + offs, mask=live, other=-1).to(tl.int32)
    return ids


# Sizes are not specialised (a size of 1 becomes a constant otherwise): on an H200 with Triton 3.6
# the scatter of one 16-bit token failed to compile (LLVM lowering) when they were.
_SIZES = ["seq", "D", "V", "slots", "E", "topk"]


@triton.jit(do_not_specialize=_SIZES)
def _histogram_kernel(ids_ptr, dom_ptr, table_ptr, seq, D, V, counts_ptr, bad_ptr, slots, E, topk,
                      LOOKUP: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ids = _slot_experts(offs, slots, ids_ptr, dom_ptr, table_ptr, seq, D, V, topk, LOOKUP)
    experts = tl.arange(0, E_PAD)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
    tl.store(counts_ptr + pid * E + experts, tl.sum(onehot, axis=0), mask=experts < E)
    bad = ((ids < -1) | (ids >= E)).to(tl.int32)
    tl.store(bad_ptr + pid, tl.sum(bad, axis=0))


@triton.jit(do_not_specialize=_SIZES + ["H"])
def _scatter_kernel(ids_ptr, dom_ptr, table_ptr, seq, D, V, x_ptr, out_ptr, index_ptr, base_ptr, slots, E,
                    topk, H, s_x, s_out, LOOKUP: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ids = _slot_experts(offs, slots, ids_ptr, dom_ptr, table_ptr, seq, D, V, topk, LOOKUP)
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


def _sort_rows(x, ids, lookup, k: int, num_experts: int, on_bad):
    """The three steps for `ids` (expert ids, or token ids when `lookup` = (domain_ids, table));
    `on_bad()` raises for the first bad slot."""
    slots, H, E = ids.numel() * (k if lookup is not None else 1), x.shape[1], num_experts
    x = x if x.stride(1) == 1 else x.contiguous()
    dom, table = lookup if lookup is not None else (ids, ids)  # unused placeholders when not looking up
    seq, D, V = (max(1, ids.shape[1]), table.shape[0], table.shape[1]) if lookup is not None else (1, 0, 0)
    ids, table = ids.contiguous().view(-1), table.contiguous()
    e_pad = expert_columns(E)
    block = block_slots(lookup is not None, e_pad)
    blocks = max(1, triton.cdiv(slots, block))
    counts = torch.empty(blocks, E, dtype=torch.int64, device=x.device)
    bad = torch.empty(blocks, dtype=torch.int64, device=x.device)
    common = dict(LOOKUP=lookup is not None, BLOCK=block, E_PAD=e_pad, num_warps=num_warps(e_pad))
    _histogram_kernel[(blocks,)](ids, dom, table, seq, D, V, counts, bad, slots, E, k, **common)
    group_sizes = counts.sum(0)
    expert_start = torch.cumsum(group_sizes, 0) - group_sizes
    base = torch.cumsum(counts, 0) - counts + expert_start
    rows, n_bad = torch.stack([group_sizes.sum(), bad.sum()]).tolist()  # the one host sync
    if n_bad:
        on_bad()
    x_sorted = torch.empty(rows, H, dtype=x.dtype, device=x.device)
    sorted_index = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows:
        _scatter_kernel[(blocks,)](ids, dom, table, seq, D, V, x, x_sorted, sorted_index, base, slots, E, k, H,
                                   x.stride(0), x_sorted.stride(0), BLOCK_H=BLOCK_H, **common)
    return x_sorted, group_sizes, sorted_index


def permute(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    # int64 ids: on an H200 with Triton 3.6 the scatter over int32 ids gave wrong 16-bit rows (the
    # interpreter and int64 ids were right); the [T, k] conversion costs next to nothing
    return _sort_rows(x, expert_ids.long(), None, expert_ids.shape[1], num_experts,
                      lambda: checks.expert_ids_values(expert_ids, num_experts))


def rre_dispatch(x: torch.Tensor, token_ids: torch.Tensor, domain_ids: torch.Tensor, table: torch.Tensor,
                 num_experts: int):
    def on_bad():  # the reference's lookup validates and raises with the offending position
        routing.rre_lookup(token_ids, domain_ids, table, num_experts)

    k = table.shape[2] if table.dim() == 3 else 1
    return _sort_rows(x, token_ids, (domain_ids, table), k, num_experts, on_bad)
