"""Grouped GEMM on Triton: forward/dX (one persistent launch over all experts) and dW.

Forward: the tile schedule is computed on the device. Every program walks the experts in order,
reading each expert's row count from `group_sizes` (already on the device: no host sync), and takes
the expert's (M-tile, N-tile) pairs whose global tile number is congruent to its program id. An
expert with no rows costs one scalar load. `trans_b` is only a different pair of strides for w.

dW: dw[e] = x_e^T @ dy_e. Its tile grid (E x K-tiles x N-tiles) is known on the host; each program
reduces over its expert's rows, whose range comes from a device-side cumsum of `group_sizes`.
Empty experts get zeros.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..ops import _checks
from ._common import INTERPRET, check_values, gemm_configs, load_tile, num_programs, to_dtype, upcast_operands

# fp32 GEMMs stay IEEE fp32 (torch's default), not TF32; Triton ignores it for 16-bit operands.
# Always given: triton-ascend 3.2 fails on a dot without one when it arrives through a constexpr.
DOT_PRECISION: tl.constexpr = tl.constexpr("ieee")

# Blocks used under the interpreter (its cost is per program and K-step, not per element).
INTERPRET_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}

_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 3), (128, 128, 32, 4, 4), (256, 128, 64, 8, 3),
    ]
]


# expert_mlp's activations (reference.ACTIVATIONS) as the kernel's ACT code
ACT_CODES = {"swiglu": 0, "geglu": 1, "geglu_tanh": 2}


@triton.jit
def _gate(gate, up, limit, ACT: tl.constexpr, CLAMP: tl.constexpr):
    """act(gate) * up in fp32 (reference.gated): ACT 0 silu, 1 erf GELU, 2 tanh GELU
    (= x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)); CLAMP: gate <= limit, |up| <= limit."""
    if CLAMP:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    if ACT == 0:
        act = gate * tl.sigmoid(gate)
    elif ACT == 1:
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:
        act = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
    return act * up


@gemm_configs(_CONFIGS, key=["N", "K", "GATED"])
@triton.jit
def _grouped_gemm_kernel(
    x_ptr, w_ptr, y_ptr, h_ptr, sizes_ptr, S, E, N, K, limit,
    s_xm, s_xk, s_we, s_wk, s_wn, s_ym, s_yn, s_hm,
    GATED: tl.constexpr, ACT: tl.constexpr, CLAMP: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = x_e @ w[e] per expert. GATED (the expert MLP's gate/up GEMM): w[e] is [K, 2N], gate
    columns then up columns; each tile computes both halves, stores them to y ([S, 2N]) and
    h = act(gate) * up to h ([S, N]), computed in fp32 from the gate/up values as stored (rounded
    to the output dtype), as every backend does."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    row0 = 0
    first_tile = 0
    for e in range(E):
        m = tl.load(sizes_ptr + e).to(tl.int32)
        tiles = tl.cdiv(m, BLOCK_M) * tiles_n
        t = (pid - first_tile % nprog + nprog) % nprog  # my first tile inside this expert
        while t < tiles:
            rm = (t // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = (t % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            rk = tl.arange(0, BLOCK_K)
            rows = (row0 + rm).to(tl.int64)
            row_ok = (rm < m) & (rows < S)  # rows < S: memory-safe even if sizes overshoot
            x_ptrs = x_ptr + rows[:, None] * s_xm + rk[None, :] * s_xk
            w_ptrs = w_ptr + tl.cast(e, tl.int64) * s_we + rk[:, None] * s_wk + rn[None, :] * s_wn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if GATED:
                acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                a = load_tile(x_ptrs, row_ok[:, None] & (rk[None, :] + k0 < K), UPCAST)
                w_mask = (rk[:, None] + k0 < K) & (rn[None, :] < N)
                acc = tl.dot(a, load_tile(w_ptrs, w_mask, UPCAST), acc, input_precision=DOT_PRECISION)
                if GATED:
                    b_up = load_tile(w_ptrs + N * s_wn, w_mask, UPCAST)
                    acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
                x_ptrs += BLOCK_K * s_xk
                w_ptrs += BLOCK_K * s_wk
            out_mask = row_ok[:, None] & (rn[None, :] < N)
            y_ptrs = y_ptr + rows[:, None] * s_ym + rn[None, :] * s_yn
            tl.store(y_ptrs, to_dtype(acc, y_ptr.dtype.element_ty), mask=out_mask)
            if GATED:
                tl.store(y_ptrs + N * s_yn, to_dtype(acc_up, y_ptr.dtype.element_ty), mask=out_mask)
                gate = to_dtype(acc, y_ptr.dtype.element_ty).to(tl.float32)
                h = _gate(gate, to_dtype(acc_up, y_ptr.dtype.element_ty).to(tl.float32), limit, ACT, CLAMP)
                tl.store(h_ptr + rows[:, None] * s_hm + rn[None, :], to_dtype(h, h_ptr.dtype.element_ty), mask=out_mask)
            t += nprog
        first_tile += tiles
        row0 += m


def _launch(x, w, y, h, group_sizes, n: int, s_wk: int, s_wn: int, gated: bool, activation: str = "swiglu",
            limit: float = math.inf) -> None:
    S, K = x.shape
    E = w.shape[0]

    def grid(meta):
        upper = (triton.cdiv(S, meta["BLOCK_M"]) + E) * triton.cdiv(n, meta["BLOCK_N"])
        return (num_programs(x.device, upper),)

    _grouped_gemm_kernel[grid](
        x, w, y, h, group_sizes, S, E, n, K, limit if limit != math.inf else 0.0,
        x.stride(0), x.stride(1), w.stride(0), s_wk, s_wn, y.stride(0), y.stride(1), h.stride(0),
        GATED=gated, ACT=ACT_CODES[activation], CLAMP=limit != math.inf, UPCAST=upcast_operands(x.dtype),
        **(INTERPRET_BLOCKS if INTERPRET else {}),
    )


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, trans_b: bool) -> torch.Tensor:
    if check_values(x):
        _checks.group_sizes_values("grouped_gemm", group_sizes, x.shape[0])
    S, K = x.shape
    N = w.shape[1] if trans_b else w.shape[2]
    y = torch.empty(S, N, dtype=x.dtype, device=x.device)
    if S == 0 or N == 0 or K == 0:
        return y.zero_()
    s_wk, s_wn = (w.stride(2), w.stride(1)) if trans_b else (w.stride(1), w.stride(2))
    _launch(x, w, y, y, group_sizes, N, s_wk, s_wn, gated=False)
    return y


def gated_grouped_gemm(x: torch.Tensor, w_gate_up: torch.Tensor, group_sizes: torch.Tensor, activation: str,
                       trans_b: bool, limit: float):
    """(gate_up [S, 2F], h = act(gate) * up [S, F]) in x's dtype, from one fused GEMM."""
    if check_values(x):
        _checks.group_sizes_values("expert_mlp", group_sizes, x.shape[0])
    S, K = x.shape
    F = w_gate_up.shape[1 if trans_b else 2] // 2
    gate_up = torch.empty(S, 2 * F, dtype=x.dtype, device=x.device)
    h = torch.empty(S, F, dtype=x.dtype, device=x.device)
    if S == 0 or F == 0 or K == 0:
        return gate_up.zero_(), h.zero_()
    s_wk, s_wn = (w_gate_up.stride(2), w_gate_up.stride(1)) if trans_b else (w_gate_up.stride(1), w_gate_up.stride(2))
    _launch(x, w_gate_up, gate_up, h, group_sizes, F, s_wk, s_wn, gated=True, activation=activation, limit=limit)
    return gate_up, h


@gemm_configs(_CONFIGS, key=["K", "N"])
@triton.jit
def _grouped_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, sizes_ptr, ends_ptr, K, N,
    s_xm, s_xk, s_dm, s_dn, s_we, s_wk, s_wn,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    tiles_n = tl.cdiv(N, BLOCK_N)
    e = pid // (tiles_k * tiles_n)
    tile = pid % (tiles_k * tiles_n)
    rk = (tile // tiles_n) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    end = tl.load(ends_ptr + e)
    start = end - tl.load(sizes_ptr + e)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rm < end
        a = load_tile(x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk, row_ok[:, None] & (rk[None, :] < K), UPCAST)
        b = load_tile(dy_ptr + rm[:, None] * s_dm + rn[None, :] * s_dn, row_ok[:, None] & (rn[None, :] < N), UPCAST)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
    dw_ptrs = dw_ptr + e.to(tl.int64) * s_we + rk[:, None] * s_wk + rn[None, :] * s_wn
    tl.store(dw_ptrs, to_dtype(acc, dw_ptr.dtype.element_ty), mask=(rk[:, None] < K) & (rn[None, :] < N))


def grouped_gemm_wgrad(x: torch.Tensor, dy: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    if check_values(x):
        _checks.group_sizes_values("grouped_gemm_wgrad", group_sizes, x.shape[0])
    E, (S, K), N = group_sizes.shape[0], x.shape, dy.shape[1]
    dw = torch.empty(E, K, N, dtype=x.dtype, device=x.device)
    if E == 0 or K == 0 or N == 0:
        return dw
    if S == 0:
        return dw.zero_()
    # Unchecked sizes (GPU) summing past S must read no further than row S - 1: clamp the ends.
    ends = torch.cumsum(group_sizes, 0).clamp_(max=S)
    sizes = ends - torch.cat([ends.new_zeros(1), ends[:-1]])

    def grid(meta):
        return (E * triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _grouped_wgrad_kernel[grid](
        x, dy, dw, sizes, ends, K, N,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        UPCAST=upcast_operands(x.dtype),
        **(INTERPRET_BLOCKS if INTERPRET else {}),
    )
    return dw
