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
import os

import torch
import triton
import triton.language as tl

from .. import checks
from ._common import INTERPRET, check_values, gemm_configs, load_tile, num_programs, to_dtype, upcast_operands
from .targets import Target, occupancy

# PANGU_OPS_TRITON_AUTOTUNE=0: the first config that fits, no timing of the others on first call
# (first calls in seconds instead of tens of seconds: test suites, short jobs).
AUTOTUNE = os.environ.get("PANGU_OPS_TRITON_AUTOTUNE", "1") != "0"

# Blocks used under the interpreter (its cost is per program and K-step, not per element).
INTERPRET_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), chosen with `pangu-ops compile-check` (no
# config kept here spills on sm_90 / sm_80). 16-bit operands on the matrix units:
_MMA_CONFIGS = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 3),
                (128, 128, 32, 4, 4), (256, 128, 64, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 4, 4)]
# fp32 operands as TF32 on the matrix units (twice the bytes per element, more registers):
_TF32_CONFIGS = [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3)]
# IEEE fp32: plain multiply-adds, whose operands live in registers: small tiles, few stages.
_FMA_CONFIGS = [(64, 64, 32, 4, 2), (64, 128, 32, 8, 2), (32, 64, 32, 4, 2)]
# K or N not a multiple of 16: masked, unvectorised loads whose addresses take the registers.
_UNALIGNED_CONFIGS = [(32, 64, 16, 4, 2), (32, 32, 32, 4, 2), (64, 64, 16, 4, 2)]


def _registers_fit(config: triton.Config, dtype: torch.dtype, gated: bool, big_registers: bool,
                   aligned: bool) -> bool:
    """Whether the config's fp32 accumulators leave room in the registers (`compile-check` on sm_90
    and sm_80): unaligned rows at most 32 values per thread; the gated GEMM's two accumulators at
    most 128 per thread with 8 warps of 16-bit operands on sm_90 (`big_registers`: wgmma reads its
    operands from shared memory), else 64, with BLOCK_K <= 32 off sm_90 (operand fragments in
    registers)."""
    k = config.kwargs
    per_thread = (2 if gated else 1) * k["BLOCK_M"] * k["BLOCK_N"] // (32 * config.num_warps)
    if not aligned:
        return per_thread <= (16 if gated and dtype == torch.float32 else 32)
    if not gated:
        return True
    if big_registers and config.num_warps >= 8 and dtype != torch.float32:
        return per_thread <= 128
    return per_thread <= 64 and (big_registers or k["BLOCK_K"] <= 32)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 follows torch's matmul setting (TF32 tensor cores where
    `torch.backends.cuda.matmul.allow_tf32` or `torch.set_float32_matmul_precision("high"/"medium")`
    allow it, as torch's own fp32 matmul does; IEEE otherwise); 16-bit operands ignore it."""
    if dtype == torch.float32 and not INTERPRET and (
            torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"):
        return "tf32"
    return "ieee"


def gemm_config_list(dtype: torch.dtype, gated: bool, precision: str, aligned: bool = True) -> list[triton.Config]:
    """The configs of this dtype / precision / alignment (`kept_configs`: those a device keeps)."""
    if not aligned:
        table = _UNALIGNED_CONFIGS
    elif dtype == torch.float32:
        table = _FMA_CONFIGS if precision == "ieee" else _TF32_CONFIGS
    else:
        table = _MMA_CONFIGS
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bm, bn, bk, w, st in table]


def kept_configs(dtype: torch.dtype, gated: bool, precision: str, *, shared_limit: int, big_registers: bool,
                 aligned: bool, wgrad: bool = False) -> list[triton.Config]:
    """The configs the autotuner tries on a device: of this dtype / precision, fitting its shared
    memory per block (`shared_bytes`) and registers (`_registers_fit`)."""
    return [c for c in gemm_config_list(dtype, gated, precision, aligned)
            if shared_bytes(c, dtype, gated, wgrad) <= shared_limit
            and (wgrad or _registers_fit(c, dtype, gated, big_registers, aligned))]


def shared_bytes(config: triton.Config, dtype: torch.dtype, gated: bool, wgrad: bool = False) -> int:
    """Shared memory of the software pipeline: num_stages copies of the two operand tiles (forward:
    x [BM, BK] and w [BK, BN], twice for gated; dW: x [BM, BK] and dy [BM, BN])."""
    k = config.kwargs
    second = k["BLOCK_M"] * k["BLOCK_N"] if wgrad else k["BLOCK_K"] * k["BLOCK_N"] * (2 if gated else 1)
    return config.num_stages * (k["BLOCK_M"] * k["BLOCK_K"] + second) * torch.empty(0, dtype=dtype).element_size()


def _prune(configs, named_args, **kwargs):
    """Autotune's early prune: `kept_configs` for the launch's dtype, precision and sizes on its
    device (the configs as given where triton_ascend narrowed them already)."""
    args = {**named_args, **kwargs}
    x, gated, precision, wgrad = args["x_ptr"], bool(args.get("GATED", False)), args["PRECISION"], "dy_ptr" in args
    if x.device.type != "cuda":
        return configs
    props = triton.runtime.driver.active.utils.get_device_properties(x.device.index)
    aligned = all(args[n] % 16 == 0 for n in ("K", "N"))
    wanted = kept_configs(x.dtype, gated, precision, shared_limit=props["max_shared_mem"],
                          big_registers=torch.cuda.get_device_capability(x.device)[0] >= 9, aligned=aligned,
                          wgrad=wgrad)
    if not wanted:
        raise RuntimeError(f"no grouped GEMM config fits this device's {props['max_shared_mem']} B of shared memory")
    names = {str(c) for c in wanted}
    kept = [c for c in configs if str(c) in names]
    return kept if AUTOTUNE else kept[:1]


def _all_configs() -> list[triton.Config]:
    seen = {}
    for dtype, precision, aligned in ((torch.bfloat16, "ieee", True), (torch.float32, "tf32", True),
                                      (torch.float32, "ieee", True), (torch.bfloat16, "ieee", False)):
        for c in gemm_config_list(dtype, False, precision, aligned):
            seen.setdefault(str(c), c)
    return list(seen.values())


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


@gemm_configs(_all_configs(), key=["N", "K", "GATED", "PRECISION"], prune=_prune)
@triton.jit
def _grouped_gemm_kernel(
    x_ptr, w_ptr, y_ptr, h_ptr, sizes_ptr, S, E, N, K, limit,
    s_xm, s_xk, s_we, s_wk, s_wn, s_ym, s_yn, s_hm,
    GATED: tl.constexpr, ACT: tl.constexpr, CLAMP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
                acc = tl.dot(a, load_tile(w_ptrs, w_mask, UPCAST), acc, input_precision=PRECISION)
                if GATED:
                    b_up = load_tile(w_ptrs + N * s_wn, w_mask, UPCAST)
                    acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
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


# Blocks per SM of each compiled forward kernel (by its blocks, gated or not, dtype), learned from
# the compiled kernel after its first launch (registers and shared memory as compiled); until then
# the persistent grid assumes 1 block per SM, which never oversubscribes.
_OCCUPANCY: dict[tuple, int] = {}


def _occupancy_key(blocks: dict, gated: bool, dtype: torch.dtype, precision: str) -> tuple:
    return blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"], gated, dtype, precision


def _learn_occupancy(compiled, key: tuple, device: torch.device) -> None:
    props = torch.cuda.get_device_properties(device)
    sm = Target("device", "cuda", 0, 32, 0, getattr(props, "shared_memory_per_multiprocessor", 228 * 1024),
                getattr(props, "regs_per_multiprocessor", 65536),
                getattr(props, "max_threads_per_multi_processor", 2048) // 32)
    _OCCUPANCY[key] = max(1, occupancy(sm, compiled.metadata.num_warps, compiled.n_regs, compiled.metadata.shared))


def _launch(x, w, y, h, group_sizes, n: int, trans_b: bool, gated: bool, activation: str = "swiglu",
            limit: float = math.inf) -> None:
    S, K = x.shape
    E = w.shape[0]
    s_wk, s_wn = (w.stride(2), w.stride(1)) if trans_b else (w.stride(1), w.stride(2))  # trans_b: strides only
    precision = dot_precision(x.dtype)

    def grid(meta):
        upper = (triton.cdiv(S, meta["BLOCK_M"]) + E) * triton.cdiv(n, meta["BLOCK_N"])
        return (num_programs(x.device, upper, _OCCUPANCY.get(_occupancy_key(meta, gated, x.dtype, precision))),)

    compiled = _grouped_gemm_kernel[grid](
        x, w, y, h, group_sizes, S, E, n, K, limit if limit != math.inf else 0.0,
        x.stride(0), x.stride(1), w.stride(0), s_wk, s_wn, y.stride(0), y.stride(1), h.stride(0),
        GATED=gated, ACT=ACT_CODES[activation], CLAMP=limit != math.inf, UPCAST=upcast_operands(x.dtype),
        PRECISION=precision, **(INTERPRET_BLOCKS if INTERPRET else {}),
    )
    best = getattr(_grouped_gemm_kernel, "best_config", None)
    if x.device.type == "cuda" and compiled is not None and best is not None:
        key = _occupancy_key(best.kwargs, gated, x.dtype, precision)
        if key not in _OCCUPANCY:  # once per compiled config, not on every launch
            _learn_occupancy(compiled, key, x.device)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor, trans_b: bool) -> torch.Tensor:
    if check_values(x):
        checks.group_sizes_values("grouped_gemm", group_sizes, x.shape[0])
    S, K = x.shape
    N = w.shape[1] if trans_b else w.shape[2]
    y = torch.empty(S, N, dtype=x.dtype, device=x.device)
    if S == 0 or N == 0 or K == 0:
        return y.zero_()
    _launch(x, w, y, y, group_sizes, N, trans_b, gated=False)
    return y


def gated_grouped_gemm(x: torch.Tensor, w_gate_up: torch.Tensor, group_sizes: torch.Tensor, activation: str,
                       trans_b: bool, limit: float):
    """(gate_up [S, 2F], h = act(gate) * up [S, F]) in x's dtype, from one fused GEMM."""
    if check_values(x):
        checks.group_sizes_values("expert_mlp", group_sizes, x.shape[0])
    S, K = x.shape
    F = w_gate_up.shape[1 if trans_b else 2] // 2
    gate_up = torch.empty(S, 2 * F, dtype=x.dtype, device=x.device)
    h = torch.empty(S, F, dtype=x.dtype, device=x.device)
    if S == 0 or F == 0 or K == 0:
        return gate_up.zero_(), h.zero_()
    _launch(x, w_gate_up, gate_up, h, group_sizes, F, trans_b, gated=True, activation=activation, limit=limit)
    return gate_up, h


@gemm_configs(_all_configs(), key=["K", "N", "PRECISION"], prune=_prune)
@triton.jit
def _grouped_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, sizes_ptr, ends_ptr, K, N,
    s_xm, s_xk, s_dm, s_dn, s_we, s_wk, s_wn,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
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
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    dw_ptrs = dw_ptr + e.to(tl.int64) * s_we + rk[:, None] * s_wk + rn[None, :] * s_wn
    tl.store(dw_ptrs, to_dtype(acc, dw_ptr.dtype.element_ty), mask=(rk[:, None] < K) & (rn[None, :] < N))


def grouped_gemm_wgrad(x: torch.Tensor, dy: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    if check_values(x):
        checks.group_sizes_values("grouped_gemm_wgrad", group_sizes, x.shape[0])
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
        UPCAST=upcast_operands(x.dtype), PRECISION=dot_precision(x.dtype),
        **(INTERPRET_BLOCKS if INTERPRET else {}),
    )
    return dw
