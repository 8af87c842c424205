"""unpermute and its fused backward on Triton. No host sync.

Forward: a slot -> row inverse map (one scatter kernel), then each program combines a block of
tokens x a block of columns: the token's k rows, weighted, summed in fp32, rounded once.
Backward: each program takes a block of sorted rows: grad_y_sorted = w * grad_y[token], and the
weights' gradient <grad_y[token], y_sorted[row]> reduced over all columns in fp32.
On a GPU, slot indices are validated only with PANGU_OPS_CHECK_VALUES=1 (a host sync; `permute`
produced them): indices outside [0, T*k) are ignored rather than read or written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import checks
from ._common import check_values, to_dtype

BLOCK_T = 16
BLOCK_N = 128
BLOCK_R = 32


@triton.jit
def _invert_kernel(index_ptr, row_of_ptr, S, slots, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(index_ptr + rows, mask=rows < S, other=-1)
    tl.store(row_of_ptr + s, rows.to(tl.int64), mask=(rows < S) & (s >= 0) & (s < slots))


@triton.jit
def _combine_kernel(ys_ptr, row_of_ptr, w_ptr, y_ptr, T, N, topk, s_ys, s_y,
                    HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(topk):
        slot = t.to(tl.int64) * topk + j
        r = tl.load(row_of_ptr + slot, mask=t < T, other=-1)
        v = tl.load(ys_ptr + r[:, None] * s_ys + n[None, :], mask=(r >= 0)[:, None] & (n[None, :] < N), other=0.0)
        v = v.to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + slot, mask=t < T, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(y_ptr + t.to(tl.int64)[:, None] * s_y + n[None, :], to_dtype(acc, y_ptr.dtype.element_ty),
             mask=(t[:, None] < T) & (n[None, :] < N))


def unpermute(y_sorted, sorted_index, weights, num_tokens: int, topk: int):
    if check_values(y_sorted):
        checks.sorted_index_values(sorted_index, num_tokens * topk)
    S, N = y_sorted.shape
    y = torch.empty(num_tokens, N, dtype=y_sorted.dtype, device=y_sorted.device)
    if num_tokens == 0 or N == 0:
        return y
    row_of = torch.full((num_tokens * topk,), -1, dtype=torch.int64, device=y_sorted.device)
    if S:
        _invert_kernel[(triton.cdiv(S, 256),)](sorted_index, row_of, S, num_tokens * topk, BLOCK=256)
    ys = y_sorted if y_sorted.stride(1) == 1 else y_sorted.contiguous()
    w = weights.contiguous() if weights is not None else ys  # ys: an unused placeholder pointer
    grid = (triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(N, BLOCK_N))
    _combine_kernel[grid](ys, row_of, w, y, num_tokens, N, topk, ys.stride(0), y.stride(0),
                          HAS_W=weights is not None, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N)
    return y


@triton.jit
def _backward_kernel(g_ptr, index_ptr, w_ptr, ys_ptr, gys_ptr, gw_ptr, S, N, slots, topk, s_g, s_ys, s_gys,
                     HAS_W: tl.constexpr, WGRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    s = tl.load(index_ptr + rows, mask=rows < S, other=-1)
    ok = (rows < S) & (s >= 0) & (s < slots)
    token = s // topk
    if HAS_W:
        w = tl.load(w_ptr + s, mask=ok, other=0.0).to(tl.float32)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = ok[:, None] & (n[None, :] < N)
        g = tl.load(g_ptr + token[:, None] * s_g + n[None, :], mask=mask, other=0.0).to(tl.float32)
        out = g
        if HAS_W:
            out = g * w[:, None]
        tl.store(gys_ptr + rows.to(tl.int64)[:, None] * s_gys + n[None, :], to_dtype(out, gys_ptr.dtype.element_ty),
                 mask=(rows[:, None] < S) & (n[None, :] < N))
        if WGRAD:
            y = tl.load(ys_ptr + rows.to(tl.int64)[:, None] * s_ys + n[None, :], mask=mask, other=0.0)
            dot += tl.sum(g * y.to(tl.float32), axis=1)
    if WGRAD:
        tl.store(gw_ptr + s, dot, mask=ok)


def unpermute_backward(grad_y, sorted_index, weights, y_sorted, topk: int):
    if check_values(grad_y):
        checks.sorted_index_values(sorted_index, grad_y.shape[0] * topk)
    T, N = grad_y.shape
    S = sorted_index.shape[0]
    g = grad_y if grad_y.stride(1) == 1 else grad_y.contiguous()
    grad_ys = torch.empty(S, N, dtype=grad_y.dtype, device=grad_y.device)
    wgrad = y_sorted is not None
    grad_w = torch.zeros(T * topk if wgrad else 0, dtype=torch.float32, device=grad_y.device)
    ys = (y_sorted if y_sorted.stride(1) == 1 else y_sorted.contiguous()) if wgrad else g
    w = weights.contiguous() if weights is not None else g
    if S:
        _backward_kernel[(triton.cdiv(S, BLOCK_R),)](
            g, sorted_index, w, ys, grad_ys, grad_w, S, N, T * topk, topk, g.stride(0), ys.stride(0),
            grad_ys.stride(0), HAS_W=weights is not None, WGRAD=wgrad, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N)
    if wgrad:
        grad_w = grad_w.view(T, topk).to(weights.dtype)
    return grad_ys, grad_w
