"""Microbenchmarks of permute, unpermute and grouped_gemm against baselines measured in the same run.

Every kernel is timed beside:
- the pure-PyTorch reference (`pangu_ops.reference`): the "speedup" column;
- the physical limit: for the data-movement ops the faster of memcpy bandwidth (`dst.copy_(src)`
  and `src.clone()`, read+write bytes) and, on a CPU, the op's own memory move (its input read
  once and its output written once, in order, the writes streamed: `move_work`), for the GEMMs the
  fastest of the dense `torch.mm` rate of the same FLOPs (in fp32 on a CPU also torch's oneDNN
  matmul: `onednn_mm`) and (CPU) the same FLOPs as fp32 FMAs on
  registers over all threads or, in bf16 where the CPU multiplies it natively, as its bf16 product
  on registers (AMX tiles, VDPBF16PS: the prepacked kernels beat the dense bf16 mm on a Zen 4): the
  "of limit" column (kernel rows whose limit is a peak note their share of the dense mm too, the
  rate the issue's targets are set against);
- torch's own routes to the same result: `F.grouped_mm`, dense `torch.mm` in the op's dtype.
On a GPU the GEMM limit is dense torch.mm in the op's dtype (cuBLAS). Torch's half-precision CPU
matmuls are ~60-200x slower than fp32 on CPUs without native bf16/fp16 units (and several times
faster with AMX): where they are slower (`torch.ops.pangu_cpu.native_half_matmul`), the fp32 rate is the
limit, and those baselines run on 1/32 of the rows so the run stays short.

Fresh routing: grouped_gemm, its backward and expert_mlp again with new group sizes every call (as
every training step and prefill batch brings; a kernel library that generates code per row count
pays for it there), noted with their time over the warm call's.

Timing: all rows of a dtype interleaved in rounds (`timing.interleaved`), min / median / spread,
rows flagged where the machine was disturbed, and rows faster than their limit flagged as a wrong
limit or benchmark; plus the per-call overhead of an op on one token, a one-token decode step
(`moe_experts` against the three ops and the expert kernel alone), and the first call after import,
in fresh processes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import pangu_ops
from pangu_ops import backends, packed_weights, reference, verify
from pangu_ops.backends import cpu as cpu_backend

from pangu_ops.nn import MoEFeedForward

from .layer import loop_forward
from .timing import Timing, in_round, interleaved, per_round, rounds_of

SLOW_BASELINE_FRACTION = 32
FRESH = "fresh routing"  # suffix of the ops timed with new group sizes every call


@dataclass(frozen=True)
class Problem:
    """Default: an MoE layer that finishes in about a minute on a 2-core CPU."""

    tokens: int = 4096
    hidden: int = 1024
    ffn: int = 512
    experts: int = 16
    topk: int = 2

    def __str__(self) -> str:
        return f"T={self.tokens} H={self.hidden} N={self.ffn} E={self.experts} k={self.topk}"


# MoE shapes worth a GPU run (too large for a 2-core CPU).
PRESETS = {
    "cpu": Problem(),
    # DeepSeek-V3 / Pangu Ultra MoE-like: 256 experts, top-8, hidden 7168, expert ffn 2048.
    "deepseek": Problem(tokens=8192, hidden=7168, ffn=2048, experts=256, topk=8),
    # Mixtral-8x7B-like: 8 experts, top-2, hidden 4096, ffn 14336.
    "mixtral": Problem(tokens=8192, hidden=4096, ffn=14336, experts=8, topk=2),
}


@dataclass
class Row:
    op: str
    dtype: str
    impl: str
    kind: str  # "kernel" (a pangu_ops backend), "reference", "baseline" or "limit"
    time_ms: float
    rate: float  # GB/s or GFLOP/s of the full problem
    unit: str
    speedup_vs_reference: float | None = None
    fraction_of_limit: float | None = None
    note: str = ""
    min_ms: float = 0.0  # the best round's time per call (time_ms: the median round's)
    spread: float = 0.0  # (max - min) / median over the rounds
    busy: bool = False  # spread > 1: the machine was disturbed
    rounds_ms: list[float] = field(default_factory=list)  # one time per interleaved round

    def round_rates(self) -> list[float]:
        """The rate in each round (rate: the best round's), [rate] without per-round times."""
        return [self.rate * self.min_ms / t for t in self.rounds_ms] if self.rounds_ms and self.min_ms else [self.rate]


@dataclass
class Entry:
    op: str
    impl: str
    kind: str
    fn: Callable[[], object]
    work: float  # bytes or flops done by one call of fn
    unit: str
    note: str = ""


def _half_on_cpu(dtype: torch.dtype, device: torch.device) -> bool:
    """Half precision on a CPU whose torch matmul in that dtype is slower than in fp32 (the C++
    kernels' own probe, which also decides whether they multiply in that dtype)."""
    if device.type != "cpu" or dtype == torch.float32:
        return False
    backends.load("cpu")
    return not torch.ops.pangu_cpu.native_half_matmul(dtype)


def optimizer_step(params) -> None:
    """What a training step's optimizer update does to its weights, for kernels that keep work per
    weight version (the CPU backend's packed weights): a new version of each, without the update's
    own cost. Forward + backward rows call it every repetition, so a repack per step is timed."""
    for t in params:
        torch.autograd.graph.increment_version(t)


def add_note(row, text: str) -> None:
    """Appends `text` to a result row's note."""
    row.note = f"{row.note}; {text}" if row.note else text


def compute_peak(flops: float):
    """A fn doing `flops` fp32 FMAs on register-resident vectors over torch's threads (the CPU
    backend's `fma_work`): the compute time no kernel beats, measured like any row."""
    backends.load("cpu")
    return lambda: torch.ops.pangu_cpu.fma_work(int(flops))


def onednn_mm(a: torch.Tensor, b: torch.Tensor):
    """A fn computing a @ b (fp32, CPU) by torch's oneDNN matmul (`mkldnn::_linear_pointwise`, what
    its compiled CPU linear layers run), or None where torch has no oneDNN: a dense-mm limit beside
    torch.mm, whose fp32 is MKL's, which runs AVX2 code on AMD CPUs (2-core Zen 5: half the rate of
    oneDNN's, which the CPU backend then takes: `onednn_fp32`)."""
    if a.device.type != "cpu" or a.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return None
    bt = b.t().contiguous()
    return lambda: op(a, bt, None, "none", [], "")


def bf16_peak(flops: float):
    """`(impl, note, fn)`: fn does `flops` as this CPU's widest bf16 product on register-resident
    operands over torch's threads: TDPBF16PS on tiles held in the tile registers where it has AMX-BF16
    (the CPU backend's `amx_work`), else VDPBF16PS on vectors where it has AVX512-BF16
    (`bf16_dot_work`): the bf16 compute time no kernel beats there. None where it has neither (bf16
    is then multiplied as fp32, whose limit is `compute_peak`)."""
    if cpu_backend.has_amx():
        return ("AMX peak (bf16 tiles)", "the same FLOPs as TDPBF16PS on tiles held in registers, all threads",
                lambda: torch.ops.pangu_cpu.amx_work(int(flops)))
    if cpu_backend.has_avx512_bf16():
        return ("AVX512-BF16 peak (registers)", "the same FLOPs as VDPBF16PS on vectors in registers, all threads",
                lambda: torch.ops.pangu_cpu.bf16_dot_work(int(flops)))
    return None


def _grouped_mm_entry(x, w, group_sizes, flops_per_row, device, dtype) -> Entry | None:
    if not hasattr(F, "grouped_mm"):
        return None
    note = ""
    if _half_on_cpu(dtype, device):
        group_sizes = group_sizes // SLOW_BASELINE_FRACTION
        note = f"rate on 1/{SLOW_BASELINE_FRACTION} of the rows"
    offs = group_sizes.cumsum(0).to(torch.int32)
    xs = x[: int(group_sizes.sum())].contiguous()
    return Entry("grouped_gemm", "torch F.grouped_mm", "baseline", lambda: F.grouped_mm(xs, w, offs=offs),
                 flops_per_row * xs.shape[0], "GFLOP/s", note)


def _device_randn(device: torch.device, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """`randn(shape, scale=1.0)` drawing standard normal values on the device (the DeepSeek preset's
    weights are 3.8G values: minutes on a CPU), from a generator seeded 0, in `dtype`."""
    gen = torch.Generator(device).manual_seed(0)

    def randn(shape, scale=1.0):
        return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)
    return randn


def entries(problem: Problem, dtype: torch.dtype, device: torch.device, kernel_backends: list[str]) -> list[Entry]:
    p = problem
    case = verify.Case(p.tokens, p.hidden, p.ffn, p.experts, p.topk)
    ids, weights = verify.routing(case, verify.generator(0), device=device)
    randn = _device_randn(device, dtype)
    x = randn((p.tokens, p.hidden))
    x_sorted, group_sizes, sorted_index = reference.permute(x, ids, p.experts)
    rows = x_sorted.shape[0]
    y_sorted = randn((rows, p.ffn))
    w = randn((p.experts, p.hidden, p.ffn), p.hidden ** -0.5)
    dy = randn((rows, p.ffn))
    w_gate_up = randn((p.experts, p.hidden, 2 * p.ffn), p.hidden ** -0.5)
    w_down = randn((p.experts, p.ffn, p.hidden), p.ffn ** -0.5)
    elt = x.element_size()

    def fwd_bwd(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        xg, wg = x_sorted.detach().requires_grad_(), w.detach().requires_grad_()
        return lambda: (optimizer_step([wg]), torch.autograd.grad(fn(xg, wg), [xg, wg], dy))

    sizes_gen = torch.Generator().manual_seed(1)

    def fresh_sizes() -> torch.Tensor:
        """New group sizes of the same rows (a new routing's)."""
        return torch.randint(0, p.experts, (rows,), generator=sizes_gen, device="cpu").bincount(minlength=p.experts).to(device)

    def gemm_ops(sizes: Callable[[], torch.Tensor], suffix: str) -> dict:
        """grouped_gemm, its backward and expert_mlp on the group sizes `sizes()` gives each call."""
        return {
            f"grouped_gemm{suffix}": (lambda: pangu_ops.grouped_gemm(x_sorted, w, sizes()),
                                      lambda: reference.grouped_gemm(x_sorted, w, sizes(), False),
                                      2 * rows * p.hidden * p.ffn, "GFLOP/s"),
            f"grouped_gemm fwd+bwd{suffix}": (fwd_bwd(lambda a, b: pangu_ops.grouped_gemm(a, b, sizes())),
                                              fwd_bwd(lambda a, b: reference.grouped_gemm(a, b, sizes(), False)),
                                              6 * rows * p.hidden * p.ffn, "GFLOP/s"),
            f"expert_mlp{suffix}": (lambda: pangu_ops.expert_mlp(x_sorted, w_gate_up, w_down, sizes()),
                                    lambda: reference.expert_mlp(x_sorted, w_gate_up, w_down, sizes(), "swiglu", False,
                                                                 math.inf),
                                    6 * rows * p.hidden * p.ffn, "GFLOP/s"),
        }

    ops = {
        "permute": (lambda: pangu_ops.permute(x, ids, p.experts),
                    lambda: reference.permute(x, ids, p.experts), 2 * rows * p.hidden * elt, "GB/s"),
        "unpermute": (lambda: pangu_ops.unpermute(y_sorted, sorted_index, weights),
                      lambda: reference.unpermute(y_sorted, sorted_index, weights, p.tokens, p.topk),
                      (rows + p.tokens) * p.ffn * elt, "GB/s"),
        **gemm_ops(lambda: group_sizes, ""),
        **gemm_ops(fresh_sizes, f" {FRESH}"),
    }
    out: list[Entry] = []
    for op, (kernel_fn, ref_fn, work, unit) in ops.items():
        out.append(Entry(op, "reference", "reference", ref_fn, work, unit))
        out += [Entry(op, b, "kernel", _on(b, kernel_fn), work, unit) for b in kernel_backends]
    out += _prepacked_entries(x_sorted, w_gate_up, w_down, group_sizes, 6 * rows * p.hidden * p.ffn, kernel_backends)
    out += _layer_entries(p, x, w_gate_up, w_down, kernel_backends)

    # Limits and torch baselines.
    if device.type == "cpu":
        out.append(_move_entry("permute", x, torch.empty_like(x_sorted), ops["permute"][2]))
        out.append(_move_entry("unpermute", y_sorted, torch.empty(p.tokens, p.ffn, dtype=dtype), ops["unpermute"][2]))
    dst = torch.empty_like(x_sorted)
    out.append(Entry("memcpy", "dst.copy_(src)", "limit", lambda: dst.copy_(x_sorted), 2 * rows * p.hidden * elt, "GB/s"))
    # a copy into a fresh tensor (what an op's output is) ran faster than into a kept one in some
    # runs (109-122%): both are limits, the faster one the rows' limit
    out.append(Entry("memcpy", "src.clone()", "limit", x_sorted.clone, 2 * rows * p.hidden * elt, "GB/s",
                     "copy into a fresh tensor, as an op's output"))
    # The GEMM ceiling: dense torch.mm of the same FLOPs in the op's dtype, except for half
    # precision on a CPU, whose torch matmul is pathological: there the fp32 rate is the ceiling
    # and the half-precision torch.mm is shown as a baseline (on a fraction of the rows).
    flops_per_row = 2 * p.hidden * p.ffn
    slow_half = _half_on_cpu(dtype, device)
    limit_dtype = torch.float32 if slow_half else dtype
    x_lim = x_sorted.to(limit_dtype)
    w_lim = torch.randn(p.hidden, p.ffn, device=device, dtype=limit_dtype)
    out.append(Entry("dense mm", f"torch.mm {str(limit_dtype)[6:]}", "limit", lambda: torch.mm(x_lim, w_lim),
                     flops_per_row * rows, "GFLOP/s", "same FLOPs as the grouped GEMM"))
    onednn = onednn_mm(x_lim, w_lim)
    if onednn is not None:
        out.append(Entry("dense mm", "oneDNN matmul float32", "limit", onednn, flops_per_row * rows, "GFLOP/s",
                         "same FLOPs as the grouped GEMM, by torch's oneDNN"))
    if device.type == "cpu":
        # bf16 where this CPU multiplies it natively: its own peak, shown beside the limits (fp32
        # FMAs are no bf16 limit there: the dense bf16 mm beats them)
        peak16 = bf16_peak(flops_per_row * rows) if dtype == torch.bfloat16 else None
        if peak16 is None:
            out.append(Entry(PEAK_OP, "FMA peak (fp32, registers)", "limit", compute_peak(flops_per_row * rows),
                             flops_per_row * rows, "GFLOP/s", "the same FLOPs as fp32 FMAs on registers, all threads"))
        else:
            impl, note, fn = peak16
            out.append(Entry(BF16_PEAK_OP, impl, "limit", fn, flops_per_row * rows, "GFLOP/s", note))
    if slow_half:
        m = rows // SLOW_BASELINE_FRACTION
        xh, wh = x_sorted[:m].contiguous(), w_lim.to(dtype)
        out.append(Entry("dense mm", f"torch.mm {str(dtype)[6:]}", "baseline", lambda: torch.mm(xh, wh),
                         flops_per_row * m, "GFLOP/s", f"rate on 1/{SLOW_BASELINE_FRACTION} of the rows"))
    gmm = _grouped_mm_entry(x_sorted, w, group_sizes, flops_per_row, device, dtype)
    if gmm is not None:
        out.append(gmm)
    return out


def _move_entry(op: str, source: torch.Tensor, result: torch.Tensor, work: float) -> Entry:
    """The memory limit of a data-movement op on the CPU: every byte of its input read once and every
    byte of its output written once, both in order, interleaved line by line, the writes streamed
    (the CPU backend's `move_work`), credited with the op's own work so the rates compare. A copy is
    no such limit: it reads as much as it writes (unpermute reads `topk` rows per row it writes, and
    beat memcpy's GB/s), and a read pass then a write pass (`read_work`, `write_work`) took 1.1-1.3x
    this one's time: the two overlap."""
    backends.load("cpu")
    move_work = torch.ops.pangu_cpu.move_work
    return Entry(f"{op} {MOVE}", "move_work(in, out)", "limit", lambda: move_work([source], [result]), work, "GB/s",
                 f"{op}'s input read and its output written, once each, in order")


def _prepacked_entries(x_sorted, w_gate_up, w_down, group_sizes, flops, kernel_backends) -> list[Entry]:
    """expert_mlp's forward on the CPU backend as inference runs it (weights prepacked in place by
    `pangu_ops.prepack`: no packing per call) and as a training step's forward does (a new weight
    version every call: the tiles packed per call), beside the plain row (fixed weights: the packed
    copies of the cache). Where the CPU backend takes prepacked bf16 (`packed_kernels`: AMX tiles, or
    AVX512-BF16 products on a Zen 4); the per-call packing row where it packs tiles (AMX)."""
    if "cpu" not in kernel_backends or x_sorted.dtype != torch.bfloat16 or x_sorted.device.type != "cpu":
        return []
    if not cpu_backend.packed_kernels() or packed_weights.packable(w_gate_up) or packed_weights.packable(w_down):
        return []
    packed = packed_weights.pack(w_gate_up), packed_weights.pack(w_down)

    def prepacked():
        with torch.inference_mode():
            return pangu_ops.expert_mlp(x_sorted, *packed, group_sizes)

    op = "expert_mlp"
    entries = [Entry(op, "cpu: prepacked", "kernel", _on("cpu", prepacked), flops, "GFLOP/s",
                     "weights in tile order (pangu_ops.prepack): inference")]
    if cpu_backend.has_amx():
        training = w_gate_up.clone(), w_down.clone()  # (their versions move: the plain row's cache keeps its own)

        def new_weights():
            optimizer_step(training)
            return pangu_ops.expert_mlp(x_sorted, *training, group_sizes)
        entries.append(Entry(op, "cpu: new weights each call", "kernel", _on("cpu", new_weights), flops, "GFLOP/s",
                             "a new weight version per call (a training step's forward): tiles packed per call"))
    return entries


def _layer_entries(p: Problem, x, w_gate_up, w_down, kernel_backends) -> list[Entry]:
    """A whole top-k MoEFeedForward forward+backward (router, permute, expert MLP, combine),
    against the same layer written the usual way (benchmarks/layer.py; "reference" here). Work:
    the expert FLOPs, 3 GEMMs of 2*H*F per routed token, times 3 for forward+backward.
    On a GPU the layer's expert weights are the expert_mlp rows' own `w_gate_up`, `w_down` (the
    DeepSeek preset's 22.5 GB twice, with their gradients, ran an 80 GB H100 out of memory); on the
    CPU it keeps copies, as its steps' new weight versions would have the CPU backend repack the
    expert_mlp rows' weights too."""
    dtype, device = x.dtype, x.device
    layer = MoEFeedForward(p.hidden, p.ffn, p.experts, topk=p.topk, aux_loss_alpha=0.0, device=device, dtype=dtype)
    if device.type != "cpu":
        layer.w_gate_up, layer.w_down = nn.Parameter(w_gate_up), nn.Parameter(w_down)
    flops_per_token = 3 * 3 * 2 * p.hidden * p.ffn * p.topk

    def fwd_bwd(forward, tokens):
        xg = tokens.detach().requires_grad_()
        dy = torch.randn(tokens.shape, generator=torch.Generator(device).manual_seed(2), device=device).to(dtype)

        def step():
            optimizer_step(layer.parameters())
            # the layer's own backward from a given gradient (a loss of the output, fp32 square and
            # mean with their backward, was ~10 ms of a 71 ms bf16 step here, timed in both rows)
            forward(xg).backward(dy)
            # a training step's gradients are new each step (accumulating into the last call's,
            # 7 adds of up to 32 MB a call, was ~8 ms)
            layer.zero_grad(set_to_none=True)
            xg.grad = None
        return step

    # The loop runs torch's own matmuls in the op's dtype: on a CPU in half precision at ~1 GFLOP/s,
    # so it gets a fraction of the tokens.
    part = p.tokens // SLOW_BASELINE_FRACTION if _half_on_cpu(dtype, device) else p.tokens
    note = f"rate on 1/{SLOW_BASELINE_FRACTION} of the tokens" if part != p.tokens else ""
    op = "moe layer fwd+bwd"
    out = [Entry(op, "loop over experts", "reference", fwd_bwd(lambda t: loop_forward(layer, t), x[:part]),
                 flops_per_token * part, "GFLOP/s", note)]
    out += [Entry(op, b, "kernel", _on(b, fwd_bwd(lambda t: layer(t)[0], x)), flops_per_token * p.tokens, "GFLOP/s")
            for b in kernel_backends]
    return out


def _overhead_entries(device: torch.device, kernel_backends: list[str]) -> list[Entry]:
    """What one op call costs beyond its kernel, on one token (a decode step calls several ops per
    layer): the eager path (`pangu_ops.permute`), the custom op (`torch.ops.pangu.permute`: what
    torch.compile sees) and the backend's kernel called directly."""
    x = torch.randn(1, 64, device=device)
    ids = torch.zeros(1, 2, dtype=torch.int64, device=device)
    op = "call overhead (1 token)"
    out = []
    for b in kernel_backends:
        kernel = backends.load(b).permute
        out += [Entry(op, f"{b}: pangu_ops.permute", "kernel", _on(b, lambda: pangu_ops.permute(x, ids, 4)), 1, "k calls/s"),
                Entry(op, f"{b}: torch.ops.pangu", "baseline", _on(b, lambda: torch.ops.pangu.permute(x, ids, 4)), 1,
                      "k calls/s", "the custom op through torch's dispatcher"),
                Entry(op, f"{b}: kernel only", "limit", lambda: kernel(x, ids, 4), 1, "k calls/s",
                      "the backend's kernel called directly")]
    return out


def _decode_entries(problem: Problem, device: torch.device, kernel_backends: list[str]) -> tuple[str, list[Entry]]:
    """One decode token through the problem's experts (bf16 where the device multiplies in it, else
    fp32): `moe_experts` (one C++ call in CPU inference) against permute + expert_mlp + unpermute,
    and the expert kernel alone on the sorted rows (the limit: what the calls around it cost). Each
    call streams its experts' weights (6 MB for the default problem), as a decode step does: the
    interpreter around the kernels runs with its data pushed out of L2. Returns (dtype, entries)."""
    p = problem
    dtype = torch.float32 if _half_on_cpu(torch.bfloat16, device) else torch.bfloat16
    randn = _device_randn(device, dtype)
    x = randn((1, p.hidden))
    ids = torch.arange(p.topk, device=device)[None] * (p.experts // p.topk)  # distinct experts
    weights = torch.full((1, p.topk), 1.0 / p.topk, device=device)
    w_gate_up, w_down = randn((p.experts, p.hidden, 2 * p.ffn), p.hidden ** -0.5), randn((p.experts, p.ffn, p.hidden))
    x_sorted, sizes, _ = pangu_ops.permute(x, ids, p.experts)

    def three_ops():
        xs, gs, idx = pangu_ops.permute(x, ids, p.experts)
        return pangu_ops.unpermute(pangu_ops.expert_mlp(xs, w_gate_up, w_down, gs), idx, weights)

    op, out = "decode step (1 token)", []
    for b in kernel_backends:
        kernel = backends.load(b).expert_mlp
        out += [Entry(op, f"{b}: pangu_ops.moe_experts", "kernel",
                      _on(b, lambda: pangu_ops.moe_experts(x, ids, weights, w_gate_up, w_down)), 1, "k steps/s",
                      "permute + expert_mlp + unpermute in one call"),
                Entry(op, f"{b}: three ops", "baseline", _on(b, three_ops), 1, "k steps/s",
                      "pangu_ops.permute, expert_mlp, unpermute"),
                Entry(op, f"{b}: expert kernel only", "limit",
                      lambda: kernel(x_sorted, w_gate_up, w_down, sizes, "swiglu", False, math.inf), 1, "k steps/s",
                      "the backend's expert_mlp kernel on the sorted rows")]
    return str(dtype)[6:], out


_FIRST_CALL = """
import time, torch
t0 = time.perf_counter()
import pangu_ops
x, ids = torch.randn(4, 64, device="{device}"), torch.zeros(4, 2, dtype=torch.int64, device="{device}")
{call}
{sync}
print(time.perf_counter() - t0)
"""


def first_call(device: torch.device, repeats: int = 3) -> list[tuple[str, str, Timing]]:
    """Seconds from `import pangu_ops` (torch already imported) to the end of the first op call, in
    fresh processes: through the eager path, and through the custom op (custom_op's wrapper
    imports torch._dynamo on its first call)."""
    import subprocess

    sync = "torch.cuda.synchronize()" if device.type == "cuda" else ""
    out = []
    for impl, call in (("pangu_ops.permute", "pangu_ops.permute(x, ids, 4)"),
                       ("torch.ops.pangu.permute", "torch.ops.pangu.permute(x, ids, 4)")):
        code = _FIRST_CALL.format(device=device, call=call, sync=sync)
        samples = [float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                        text=True).stdout.split()[-1]) for _ in range(repeats)]
        out.append((impl, "kernel" if impl.startswith("pangu_ops") else "baseline", Timing(samples)))
    return out


# the limits of each unit; a row's limit is the fastest of them measured for its dtype and backend
PEAK_OP = "compute peak"  # fma_work's FLOPs: its rate is the machine's, whatever the dtype
# amx_work's / bf16_dot_work's: bf16's ceiling where the CPU multiplies bf16 natively (the dense mm
# reaches about half the AMX peak, ~92% of the VDPBF16PS one on a Zen 4)
BF16_PEAK_OP = "bf16 peak"
MOVE = "memory move"  # suffix of a data-movement op's own limit row (`_move_entry`)
LIMIT_OF = {"GB/s": ("memcpy",), "GFLOP/s": ("dense mm", PEAK_OP, BF16_PEAK_OP),
            "k calls/s": ("call overhead (1 token)",), "k steps/s": ("decode step (1 token)",)}
UNIT_SCALE = {"GB/s": 1e9, "GFLOP/s": 1e9, "k calls/s": 1e3, "k steps/s": 1e3}
BUSY_SPREAD = 1.0  # rounds whose max - min exceed the median: the machine was busy


def _row(e: Entry, dtype: str, t: Timing) -> Row:
    return Row(e.op, dtype, e.impl, e.kind, t.median * 1e3, e.work / t.min / UNIT_SCALE[e.unit], e.unit,
               note=e.note, min_ms=t.min * 1e3, spread=t.spread, rounds_ms=[x * 1e3 for x in t.samples])


def run(problem: Problem, dtypes: list[torch.dtype], device: torch.device, kernel_backends: list[str],
        min_time: float = 0.25, progress: Callable[[str], None] | None = None, rounds: int = 5) -> list[Row]:
    """Every entry of a dtype timed interleaved with the others (`timing.interleaved`); rates from
    each row's best round, ratios between rows round by round (`_compare`), flagged where the run
    looks disturbed."""
    rows: list[Row] = []
    say = progress or (lambda line: None)

    def measure(label: str, dtype: str, todo: list[Entry]) -> None:
        def tick(done: int, total: int) -> None:
            say(f"[{label} {done}/{total}] " + (f"warm-up {todo[done - 1].op} / {todo[done - 1].impl}"
                                                if done <= len(todo) else f"round {done - len(todo)} of {rounds}"))
        timings = interleaved([e.fn for e in todo], device, rounds=rounds, min_time=min_time, progress=tick)
        rows.extend(_row(e, dtype, t) for e, t in zip(todo, timings))

    for dtype in dtypes:
        name = str(dtype)[6:]
        measure(name, name, entries(problem, dtype, device, kernel_backends))
    measure("overhead", "float32", _overhead_entries(device, kernel_backends))
    measure("decode", *_decode_entries(problem, device, kernel_backends))
    say("[first call] fresh processes: import pangu_ops + first op call")
    for impl, kind, t in first_call(device):
        rows.append(Row("first call after import", "float32", impl, kind, t.median * 1e3, t.min * 1e3, "ms",
                        note="import pangu_ops + first op, fresh process", min_ms=t.min * 1e3, spread=t.spread))
    _compare(rows)
    return rows


def _compare(rows: list[Row]) -> None:
    """Each row's speed-up over its reference and share of its limit, with the notes they call for,
    each the median over the interleaved rounds of the ratio within a round (`timing.per_round`).
    The compute peak is one rate of the machine: every dtype's is taken at the best rate any dtype
    measured (a dtype whose interleaved peak rounds ran disturbed would get a limit its kernels beat)."""
    peak = max((q.rate for q in rows if q.op == PEAK_OP), default=None)
    for r in rows:
        ref = next((q for q in rows if q.op == r.op and q.dtype == r.dtype and q.kind == "reference"), None)
        limit_ops = LIMIT_OF.get(r.unit, ()) + (f"{r.op} {MOVE}",)
        limits = [q for q in rows if q.op in limit_ops and q.dtype == r.dtype and q.kind == "limit"
                  and _backend_of(q) == _backend_of(r)]
        rates = r.round_rates()
        if ref is not None and r.kind != "reference":
            r.speedup_vs_reference = per_round(rates, ref.round_rates())
        if limits:  # each round's limit: the fastest limit row's rate in it (the peak's: the run's best)
            per = [peak if q.op == PEAK_OP else q.round_rates() for q in limits]
            r.fraction_of_limit = per_round(rates, [max(in_round(p, i) for p in per) for i in range(rounds_of(*per))])
        dense = max((q for q in rows if q.op == "dense mm" and q.dtype == r.dtype and q.kind == "limit"),
                    key=lambda q: q.rate, default=None)  # the faster of torch.mm and oneDNN's
        limit = max((peak if q.op == PEAK_OP else q.rate for q in limits), default=None)
        if r.kind != "limit" and r.unit == "GFLOP/s" and dense is not None and dense.rate < (limit or 0):
            add_note(r, f"{per_round(rates, dense.round_rates()):.0%} of the dense mm")  # (the issue's targets' rate)
        r.busy = r.spread > BUSY_SPREAD
        if r.kind != "limit" and (r.fraction_of_limit or 0) > 1.0:
            add_note(r, "ABOVE ITS LIMIT: the limit or the benchmark is wrong")
        if r.op.endswith(FRESH):
            warm = next((q for q in rows if q.op == r.op[:-len(FRESH) - 1] and (q.dtype, q.impl) == (r.dtype, r.impl)),
                        None)
            if warm is not None:
                add_note(r, f"{per_round(warm.round_rates(), rates):.2f}x the warm call's time")


def _backend_of(r: Row) -> str | None:
    """The backend an overhead or decode row is about ("cpu: kernel only" -> "cpu"); None for other rows."""
    return r.impl.split(":")[0] if r.unit in ("k calls/s", "k steps/s") else None


def _on(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with backends.use_backend(backend):
            return fn()
    return run


def table(rows: list[Row]) -> str:
    head = (f"{'op':<24} {'dtype':<9} {'impl':<26} {'median ms':>10} {'min ms':>10} {'spread':>7} {'best rate':>18}"
            f" {'vs ref':>8} {'of limit':>9}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        speed = f"{r.speedup_vs_reference:.2f}x" if r.speedup_vs_reference is not None else ""
        frac = f"{100 * r.fraction_of_limit:.0f}%" if r.fraction_of_limit is not None else ""
        note = ("BUSY? " if r.busy else "") + r.note
        lines.append(f"{r.op:<24} {r.dtype:<9} {r.impl:<26} {r.time_ms:>10.3f} {r.min_ms:>10.3f} {r.spread:>7.2f}"
                     f" {r.rate:>9.1f} {r.unit:<9}{speed:>8} {frac:>9}  {note}")
    lines.append("Interleaved rounds (every row of a dtype once per round); rates from each row's best round, "
                 "ratios (vs ref, of limit, notes) the median over the rounds of the ratio within a round; "
                 "spread = (max - min) / median. BUSY?: spread > 1: the machine was disturbed, re-run "
                 "before trusting that row. fresh routing: new group sizes every call (drawing them is timed).")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "pangu_ops": pangu_ops.__version__,
           "device": str(device), "threads": torch.get_num_threads(), "machine": platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return env


def plot(rows: list[Row], problem: Problem, device: torch.device, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in dict.fromkeys(r.op for r in rows if r.fraction_of_limit is not None and r.kind != "limit")]
    cols = min(3, len(ops))
    nrows = -(-len(ops) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(ops):]:
        ax.axis("off")
    for ax, op in zip(axes.flat, ops):
        mine = [r for r in rows if r.op == op and r.fraction_of_limit is not None]
        dtypes = list(dict.fromkeys(r.dtype for r in mine))
        impls = list(dict.fromkeys(r.impl for r in mine))
        width = 0.8 / max(len(impls), 1)
        for j, impl in enumerate(impls):
            vals = [next((r.fraction_of_limit for r in mine if r.dtype == d and r.impl == impl), 0.0) for d in dtypes]
            ax.bar([i + j * width for i in range(len(dtypes))], vals, width, label=impl)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(dtypes))], dtypes)
        unit = mine[0].unit if mine else ""
        ax.set_title(op)
        ax.set_ylabel("fraction of " + {"GB/s": "memory limit", "GFLOP/s": "compute limit",
                                        "k calls/s": "the bare kernel's call rate",
                                        "k steps/s": "the expert kernel's step rate"}.get(unit, "limit"))
        ax.legend(fontsize=7)
    fig.suptitle(f"pangu_ops on {device} ({problem})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_bytes(p: Problem, dtype: torch.dtype) -> int:
    """About the most GPU memory a dtype's rows hold at once: the tensors `entries` makes (the MoE
    layer's expert weights shared), the layer's weight gradients and its activations with theirs."""
    S, EHF = p.tokens * p.topk, p.experts * p.hidden * p.ffn
    elements = p.tokens * p.hidden + 5 * S * p.hidden + 8 * S * p.ffn + 7 * EHF
    return elements * torch.empty(0, dtype=dtype).element_size()


def check_device_memory(problem: Problem, dtypes: list[torch.dtype], device: torch.device) -> None:
    """Refuses, before anything is allocated, a run that would not fit the GPU's free memory."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    for dtype in dtypes:
        need = device_bytes(problem, dtype)
        if need > 0.95 * free:
            raise SystemExit(f"pangu-ops bench: {problem} in {str(dtype)[6:]} needs about {need / 2**30:.1f} GiB of "
                             f"GPU memory; {free / 2**30:.1f} GiB are free on {device}: pass fewer --experts or "
                             f"--tokens, or a 16-bit --dtype")


def main(problem: Problem, dtypes: list[torch.dtype], device: torch.device, kernel_backends: list[str],
         out_dir: Path, min_time: float = 0.25) -> list[Row]:
    check_device_memory(problem, dtypes, device)
    print(f"pangu_ops bench: {problem} on {device}, backends {', '.join(kernel_backends)}", file=sys.stderr)
    rows = run(problem, dtypes, device, kernel_backends, min_time,
               progress=lambda line: print(line, file=sys.stderr, flush=True))
    text = table(rows)
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.txt").write_text(f"pangu_ops bench: {problem} on {device} {environment(device)}\n\n{text}\n")
    (out_dir / "bench.json").write_text(json.dumps(
        {"problem": dataclasses.asdict(problem), "environment": environment(device),
         "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    plot(rows, problem, device, out_dir / "bench.png")
    print(f"wrote {out_dir / 'bench.txt'}, {out_dir / 'bench.json'} and {out_dir / 'bench.png'}", file=sys.stderr)
    return rows
