"""`pangu-ops bench --hf`: transformers' MoE experts blocks on the "pangu_ops" experts backend
against every built-in transformers experts backend that runs here, in the same run.

Blocks: a Mixtral-shaped one (few wide experts, top-2) and a Qwen3-MoE-shaped one (many narrow
experts, top-8), at scaled-down widths that a 2-core CPU finishes in minutes; forward and
forward+backward, float32 and bfloat16; prefill/training sizes and decode sizes. Prefill sizes run
twice: with one fixed routing (every call sees the same rows per expert: warm) and with a fresh
routing every call (new rows per expert, as every training step and prefill batch brings; drawing
it, ~1 ms, is timed in every implementation alike). Decode sizes run with the fixed routing (the
touched experts' weights stay in the caches between calls where they fit: warm) and, where the
block's experts allow it, cold: each call routes to experts the calls since its last turn did not
touch (`cold_cycle`), so its weights come from memory, as in a model whose other layers evicted
them since the last token. Peers: transformers' own backends and, in
bfloat16 forward where it is installed, kt-kernel's CPU MoE (`kt_kernel.py`). In bfloat16 forward
where the CPU backend takes prepacked weights (`packed_kernels`), the block also runs as inference
would after `pangu_ops.prepack` (`pangu_ops, prepacked`: a copy of its experts, packed in place).

Limits measured in the same run: compute, the faster of the same FLOPs as fp32 FMAs on registers
over all threads (`FMA peak`, the CPU backend's `fma_work`, taken at the best rate any row of the
run measured: it is one rate of the machine, and a row whose own FMA rounds ran disturbed would get
a limit its kernels beat) and, for prefill, the dense matmul of the same FLOPs in the dtype (fp32
where this CPU's half-precision matmul is slower; x3 for forward + backward; in fp32 also torch's
oneDNN matmul, `onednn_mm`: torch.mm's fp32 is MKL's, AVX2 code on AMD CPUs); for decode also
memory, one read-only pass (the CPU backend's `read_work`: every byte read once, nothing else) over
the touched experts' weights in place, the faster of a plain pass and one with the few-row kernels'
software prefetch (`weight reading, prefetched`: from memory it can read faster than the plain
pass) and, for decode forward where the CPU backend's `dot_read_work` multiplies as the
few-row kernels do (fp32 on AVX-512, bf16 by VDPBF16PS: `_products_read`), the same pass with
their products done on every line, each expert's lines into its rows' register accumulators
(`read with products`, plain and prefetched: the best kernel of those products, nothing reduced or
stored; about as fast as the plain pass where the products are few, slower where they bound it),
the fastest of these passes counting (forward + backward: one such pass, then a second one
overlapped with the write of their gradients, streamed, as `move_work` reads a source's lines and
writes a destination's interleaved, and the zeros of the other experts' gradients, `write_work`,
since zeros stream ~2x faster on some of these machines); a row's limit is whichever of the two
takes longer. On a CPU that multiplies bf16 natively, bfloat16 rows also get the same FLOPs as
its widest bf16 product on registers: tile products held in the tile registers with AMX-BF16
(`AMX peak`, `amx_work`), else VDPBF16PS on vectors with AVX512-BF16 (`AVX512-BF16 peak`,
`bf16_dot_work`): a compute limit of decode rows (their few-row kernels multiply bf16 that way:
on a Zen 4 they beat the FMA peak, which is then no limit) and of prefill rows too (the packed
kernels beat the dense bf16 mm on a Zen 4, which runs at ~92% of the VDPBF16PS peak; the dense mm
reaches about half the AMX one: pangu_ops' prefill rows note their share of the dense mm, the
rate the issue's targets are set against). A group in which a row beats its limit is timed again
(every fn for as many rounds more: a limit's rounds may have run disturbed); a row still above its
limit means the limit or the benchmark is wrong, and the table says so. Forward + backward rows
give the weights a new version every repetition, as a training step's optimizer update does
(`optimizer_step`: kernels that keep packed weights pack again). Timing: `timing.interleaved`,
`rounds` rounds a group (3 by default: six runs of the bf16 forward decode rows here, 3 rounds
against 7 in turn, moved a row's share by up to 30 points between runs either way, as the memory's
rate moved; the rounds did not narrow it).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import kt_kernel
from .ops import SLOW_BASELINE_FRACTION, _half_on_cpu, add_note, bf16_peak, compute_peak, onednn_mm, optimizer_step
from .timing import Timing, in_round, interleaved, per_round, rounds_of

BUILT_IN = ("eager", "batched_mm", "grouped_mm")  # deepgemm / sonicmoe: CUDA-only hub kernels


@dataclass(frozen=True)
class Block:
    name: str
    config: str  # transformers config class
    module: str  # transformers experts class
    hidden: int
    ffn: int
    experts: int
    topk: int


BLOCKS = (
    Block("mixtral-shaped", "MixtralConfig", "transformers.models.mixtral.modeling_mixtral.MixtralExperts",
          1024, 3584, 8, 2),
    Block("qwen3-moe-shaped", "Qwen3MoeConfig", "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts",
          1024, 384, 64, 8),
)
PREFILL, DECODE = (2048,), (1, 4, 16)
READ_AHEAD = 8192  # bytes: the few-row kernels' software prefetch distance (csrc/common.h kDotsAhead)
BATCHED_MM_BYTES = 2 << 30  # batched_mm's per-slot weight copies beyond this are not run
FMA_PEAK = "FMA peak"
PREPACKED = "pangu_ops, prepacked"  # inference on pangu_ops.prepack's weights (bf16 fwd, where it runs)
PRODUCTS = "read with products"  # decode forward's ceiling (_limits)
DENSE_MM = "dense mm"  # prefill's limit of the same FLOPs (_limits), the rate the targets are set against


@dataclass
class Row:
    block: str
    dtype: str
    tokens: int
    mode: str  # "fwd" or "fwd+bwd"
    routing: str  # "fixed" (warm: the same rows per expert every call), "fresh" (new every call), "cold" (cold_cycle)
    impl: str
    median_ms: float
    min_ms: float
    spread: float
    vs_fastest_builtin: float | None = None  # fastest built-in's time / this one's (per round: timing.per_round)
    of_limit: float | None = None  # limit time / this one's (1 = at the limit; per round: timing.per_round)
    note: str = ""
    rounds_ms: list[float] = field(default_factory=list)  # one time per interleaved round ([min_ms] if none)


def _experts(block: Block, dtype: torch.dtype):
    import importlib

    import transformers

    extra = {"intermediate_size": block.ffn, "num_local_experts": block.experts} if block.config == "MixtralConfig" \
        else {"moe_intermediate_size": block.ffn, "num_experts": block.experts}
    config = getattr(transformers, block.config)(hidden_size=block.hidden, num_experts_per_tok=block.topk, **extra)
    module_path, cls = block.module.rsplit(".", 1)
    experts = getattr(importlib.import_module(module_path), cls)(config)
    torch.manual_seed(0)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=block.hidden ** -0.5)
    return experts.to(dtype)


def _router(block: Block, tokens: int, dtype: torch.dtype, routing: str):
    """`route() -> (ids, weights)`: "fixed": the same routing every call; "fresh": a new draw every
    call; "cold": the fixed routing's cold cycle (`cold_cycle`), each call the next routing of it."""
    gen = torch.Generator().manual_seed(tokens)

    def draw():
        weights, ids = torch.softmax(torch.randn(tokens, block.experts, generator=gen), -1).topk(block.topk, -1)
        return ids, weights.to(dtype)
    if routing == "fresh":
        return draw
    fixed = draw()
    if routing == "fixed":
        return lambda: fixed
    return _turns([(ids, fixed[1]) for ids in cold_cycle(fixed[0], block.experts)])


def _applies(block: Block, tokens: int, routing: str) -> bool:
    """Whether rows of this size run with this routing: fixed ones all; fresh ones prefill; cold
    ones decode where the block's experts allow a cycle of more than one routing (else every call
    reads over half the block's weights anyway: cold_cycle)."""
    if routing == "fixed":
        return True
    if routing == "fresh" or tokens > max(DECODE):
        return routing == "fresh" and tokens > max(DECODE)
    return len(_routings(block, tokens, "cold")) > 1


def _routings(block: Block, tokens: int, routing: str) -> list[torch.Tensor]:
    """The expert ids that a row's calls take in turn: the fixed routing's cold cycle (cold), else
    the first routing its router gives (the one the decode limit reads)."""
    ids = _router(block, tokens, torch.float32, "fixed" if routing == "cold" else routing)()[0]
    return cold_cycle(ids, block.experts) if routing == "cold" else [ids]


def _turns(items: list):
    """A fn returning the next of `items` each call, in turn."""
    turn = [-1]

    def take():
        turn[0] = (turn[0] + 1) % len(items)
        return items[turn[0]]
    return take


def cold_cycle(ids: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """`ids` (expert ids) with its experts relabelled, as many times as the block's experts allow
    routings that touch experts none of the others does: the touched experts t_0..t_{n-1} then the
    others, in order, form a ring, and routing c moves every expert c * n places along it. Called in
    turn, each call reads weights that the calls since its last turn did not, as a model's decode
    step reads a layer's experts after its other layers' weights evicted them from the caches: a
    block's decode rows (one layer, the same routing every call) otherwise find their weights in the
    L3 where few experts are touched (Qwen3-MoE-shaped, one token: 19 MB of bf16 weights). One
    routing (ids itself) where ids touches over half the experts: every call reads over half the
    block's weights then."""
    touched = sorted(set(ids.flatten().tolist()))
    ring = touched + sorted(set(range(num_experts)) - set(touched))
    n = len(touched)
    cycle = []
    for c in range(max(1, num_experts // n)):
        relabel = torch.empty(num_experts, dtype=ids.dtype)
        for i, e in enumerate(ring):
            relabel[e] = ring[(i + c * n) % num_experts]
        cycle.append(relabel[ids])
    return cycle


def _case(block: Block, experts, tokens: int, dtype: torch.dtype, mode: str, impl: str, route):
    x = torch.randn(tokens, block.hidden, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    if impl == kt_kernel.NAME:
        kt = kt_kernel.moe(experts, tokens)
        return lambda: kt(x, *route())

    # a shallow copy per backend: the same parameters, its own config naming the backend (setting
    # the shared config's backend on every call cost ~40 us, timed in every row); prepacked: a deep
    # copy, its weights packed in place
    own = copy.deepcopy(experts) if impl == PREPACKED else copy.copy(experts)
    own.config = copy.deepcopy(experts.config)
    own.config._experts_implementation = "pangu_ops" if impl == PREPACKED else impl
    if impl == PREPACKED:
        import pangu_ops

        report = pangu_ops.prepack(own)
        if report != {"": "packed"}:
            raise RuntimeError(f"bench --hf: {block.name}'s experts were not prepacked: {report}")

    def call(inp):
        return own(inp, *route())

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return call(x)
    else:
        xg = x.detach().requires_grad_()

        def run():
            optimizer_step(experts.parameters())  # a training step's weights: a new version every call
            call(xg).float().square().mean().backward()
            # each implementation frees its own gradients, as a training step does (freeing at the
            # start of the next call charged one implementation with the last one's: 350 MB of
            # torch-allocated fp32 gradients cost ~35 ms to unmap)
            experts.zero_grad(set_to_none=True)
    return run


def expert_runs(ids: torch.Tensor, num_experts: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """([a, b) ranges of consecutive experts that `ids` routes to, those of the others): each
    range is one contiguous slice of an [E, ...] weight, read (written) by one call."""
    touched = set(ids.flatten().tolist())
    runs: tuple[list, list] = ([], [])
    for e in range(num_experts):
        side = runs[e not in touched]
        if side and side[-1][1] == e:
            side[-1] = (side[-1][0], e + 1)
        else:
            side.append((e, e + 1))
    return runs


def _flops(block: Block, mode: str, tokens: int) -> int:
    """The experts' FLOPs of one call: 3 GEMMs of 2*H*F per routed token, x3 with the backward."""
    return (1 if mode == "fwd" else 3) * 2 * tokens * block.topk * block.hidden * 3 * block.ffn


def _limits(block: Block, experts, dtype: torch.dtype, cycle: list[torch.Tensor], mode: str, tokens: int) -> dict:
    """{name: (kind, fn)} of the same-run limits (module doc): a row's limit is the fastest "memory"
    limit or the fastest "compute" one, whichever takes longer. `cycle`:
    the routings (expert ids) the row's calls take in turn; the decode memory limit's calls take
    them alike."""
    passes = 1 if mode == "fwd" else 3
    mm_dtype = torch.float32 if _half_on_cpu(dtype, torch.device("cpu")) else dtype
    limits = {FMA_PEAK: ("compute", compute_peak(_flops(block, mode, tokens)))}
    peak16 = bf16_peak(_flops(block, mode, tokens)) if dtype == torch.bfloat16 else None
    if peak16 is not None:  # the kernels multiply bf16 natively there: beyond the FMA peak
        limits[peak16[0].split(" (")[0]] = ("compute", peak16[2])
    if tokens > max(DECODE):
        rows = tokens * block.topk
        a = torch.randn(rows, block.hidden, dtype=mm_dtype)
        w1 = torch.randn(block.hidden, 2 * block.ffn, dtype=mm_dtype)
        w2 = torch.randn(block.ffn, block.hidden, dtype=mm_dtype)
        h = torch.randn(rows, block.ffn, dtype=mm_dtype)
        limits[f"{DENSE_MM} {str(mm_dtype)[6:]}"] = ("compute", lambda: [(a @ w1, h @ w2) for _ in range(passes)])
        up, down = onednn_mm(a, w1), onednn_mm(h, w2)
        if up is not None:  # torch.mm's fp32 is MKL's: AVX2 code on AMD CPUs
            limits[f"{DENSE_MM} {str(mm_dtype)[6:]}, oneDNN"] = ("compute",
                                                                   lambda: [(up(), down()) for _ in range(passes)])
        return limits
    # decode: reading the touched experts' weights, or their FLOPs at the vector peak
    weights = (experts.gate_up_proj, experts.down_proj)
    # the fastest read-only pass here: the CPU backend's `read_work` (torch's sum reads up to 25%
    # slower, and the few-row kernels beat it); each pass (read, move, write) one call over all the
    # slices (a call per slice cost ~2-5 us each outside the memory work: ~100 calls a step made the
    # cold Qwen3-MoE-shaped fp32 4-token forward + backward limit slower than pangu_ops, 116% of it)
    read_work, move_work, write_work = (torch.ops.pangu_cpu.read_work, torch.ops.pangu_cpu.move_work,
                                        torch.ops.pangu_cpu.write_work)
    # the gradients' write, streamed (fill_ takes up to 2x as long), with the second read: the touched
    # experts' gradients as values (non-zero lines: the kernels can write them no faster) by
    # `move_work`, which reads a weight's lines and streams its gradient's lines interleaved (reads and
    # streamed writes overlap: the two passes one after the other, as before 2026-12-06, took longer
    # than pangu_ops on a Zen 4, which read and wrote at once); zeros for the others' (`write_work`,
    # as the kernels write an expert without rows)
    grads = [torch.empty_like(w) for w in weights] if mode != "fwd" else []

    def weight_pass(ids: torch.Tensor, ahead: int):
        runs, untouched = expert_runs(ids, block.experts)
        views = [w.detach()[a:b] for w in weights for a, b in runs]
        if mode == "fwd":
            return lambda: read_work(views, ahead)
        moves = [g[a:b] for g in grads for a, b in runs]
        zeros = [g[a:b] for g in grads for a, b in untouched]
        return lambda: (read_work(views, ahead), move_work(views, moves), write_work(zeros, 0))
    def products_pass(ids: torch.Tensor, ahead: int):
        rows = torch.bincount(ids.flatten(), minlength=block.experts).tolist()
        views = [w.detach()[e] for w in weights for e, r in enumerate(rows) if r]
        counts = [r for _ in weights for r in rows if r]
        return lambda: torch.ops.pangu_cpu.dot_read_work(views, counts, ahead)

    def memory_limits(name: str, make_pass) -> None:
        """`name` plain and `name, prefetched` (the few-row kernels' software prefetch: into L2
        READ_AHEAD on, or for bf16 products into L1 where those kernels fetch so, `dot_read_work`),
        each taking the cycle's routings in turn."""
        for suffix, ahead in (("", 0), (", prefetched", READ_AHEAD)):
            turn = _turns([make_pass(ids, ahead) for ids in cycle])
            limits[name + suffix] = ("memory", lambda turn=turn: turn()())
    # the read plain and with the few-row kernels' software prefetch: from memory the prefetching one
    # read up to 4% faster than the plain pass (2-core Zen 4), from the L3 the plain pass is the faster;
    # both limits of one row move the same bytes, so the faster counts (_limit)
    memory_limits("weight reading", weight_pass)
    if mode == "fwd" and _products_read(dtype):
        # the same bytes read with the few-row kernels' products done on them, each expert's weight
        # lines multiplied into its rows (`dot_read_work`): the best kernel of those products here
        # (a way of reading the same bytes: where the products bound it, the plain read counts)
        memory_limits(PRODUCTS, products_pass)
    return limits


def _products_read(dtype: torch.dtype) -> bool:
    """Whether `dot_read_work` multiplies this dtype as the CPU backend's few-row kernels do here:
    fp32 FMAs on AVX-512 vectors; bf16 by VDPBF16PS where they do (bf16_pair_dots: a Zen 4), not
    where they widen bf16 to fp32 FMAs or take AMX tiles (a Xeon)."""
    from pangu_ops.backends import cpu as cpu_backend
    return bool(torch.ops.pangu_cpu.dot_read_ready(dtype)) and (dtype != torch.bfloat16 or cpu_backend.bf16_pair_dots())


def run(blocks=BLOCKS, dtypes=(torch.float32, torch.bfloat16), sizes=PREFILL + DECODE, modes=("fwd", "fwd+bwd"),
        routings=("fixed", "fresh", "cold"), min_time: float = 0.5, rounds: int = 3) -> list[Row]:
    import pangu_ops.integrations.transformers as hf
    from pangu_ops.backends import cpu as cpu_backend

    rows: list[Row] = []
    groups = []  # (a row group, its FLOPs, {limit: (kind, best seconds)})
    todo = [(b, d, t, m, r) for b in blocks for d in dtypes for t in sizes for m in modes for r in routings
            if _applies(b, t, r)]
    if kt_kernel.unavailable() and torch.bfloat16 in dtypes:
        print(f"bench --hf: no kt-kernel baseline: {kt_kernel.unavailable()}", file=sys.stderr)
    for i, (block, dtype, tokens, mode, routing) in enumerate(todo, 1):
        experts = _experts(block, dtype)
        # batched_mm gathers every slot's expert weights ([T*k, 2F, H] ...): only where that fits
        gathered = tokens * block.topk * 3 * block.ffn * block.hidden * torch.finfo(dtype).bits // 8
        impls = (hf.NAME,) + tuple(b for b in BUILT_IN if b != "batched_mm" or gathered <= BATCHED_MM_BYTES)
        if dtype == torch.bfloat16 and mode == "fwd" and cpu_backend.packed_kernels():
            impls += (PREPACKED,)
        if dtype == torch.bfloat16 and mode == "fwd" and not kt_kernel.unavailable():
            impls += (kt_kernel.NAME,)
        route = _router(block, tokens, dtype, routing)
        # transformers' built-ins multiply in the dtype: where this CPU's half-precision matmul is an
        # emulation (~1 GFLOP/s) they run prefill on a fraction of the tokens, scaled back up
        part = max(1, tokens // SLOW_BASELINE_FRACTION) if tokens > max(DECODE) and _half_on_cpu(
            dtype, torch.device("cpu")) else tokens
        route_part = _router(block, part, dtype, routing) if part != tokens else route
        fns = [_case(block, experts, part, dtype, mode, impl, route_part) if impl in BUILT_IN else
               _case(block, experts, tokens, dtype, mode, impl, route) for impl in impls]
        limits = _limits(block, experts, dtype, _routings(block, tokens, routing), mode, tokens)
        print(f"[{i}/{len(todo)}] {block.name} {str(dtype)[6:]} T={tokens} {mode} {routing} routing", file=sys.stderr,
              flush=True)
        settle = [kt_kernel.SETTLE_S if impl == kt_kernel.NAME else 0.0 for impl in impls] + [0.0] * len(limits)

        def timed() -> list[Timing]:
            return interleaved(fns + [fn for _, fn in limits.values()], torch.device("cpu"), rounds=rounds,
                               min_time=min_time, settle=settle)
        timings = timed()
        times = {n: (limits[n][0], t.samples) for n, t in zip(limits, timings[len(fns):])}
        scales = [tokens / part if impl in BUILT_IN else 1.0 for impl in impls] + [1.0] * len(limits)
        fma = min(times[FMA_PEAK][1])  # (the group's own best: the run's is known at the end)
        if any(per_round(_round_limits(times, fma), [s * k for s in t.samples]) > 1.0
               for t, k in zip(timings[:len(fns)], scales)):
            # a limit's rounds ran disturbed (or the limit is wrong): every fn gets as many rounds again
            print("  a row beat this group's limit: timing the group again", file=sys.stderr, flush=True)
            timings = [Timing(a.samples + b.samples) for a, b in zip(timings, timed())]
            times = {n: (limits[n][0], t.samples) for n, t in zip(limits, timings[len(fns):])}
        group = []
        for impl, t, scale in zip(impls + tuple(limits), timings, scales):
            group.append(Row(block.name, str(dtype)[6:], tokens, mode, routing, impl, t.median * 1e3 * scale,
                             t.min * 1e3 * scale, t.spread,
                             note=f"timed on 1/{tokens // part} of the tokens, scaled" if scale != 1.0 else "",
                             rounds_ms=[s * 1e3 * scale for s in t.samples]))
        rows += group
        groups.append((group, _flops(block, mode, tokens), times))
    _rate_against_limits(groups)
    return rows


def _limit(times: dict[str, tuple[str, float]], fma: float) -> float:
    """A group's limit from its limits' {name: (kind, seconds)}, the FMA peak's taken as `fma`: the
    fastest memory limit (each moves the row's bytes its own way) or the fastest compute one,
    whichever takes longer."""
    compute = min([fma] + [t for n, (kind, t) in times.items() if kind == "compute" and n != FMA_PEAK])
    return max([compute] + [min([t for kind, t in times.values() if kind == "memory"], default=0.0)])


def _round_limits(times: dict, fma: float, names=None) -> list[float]:
    """The limit in each interleaved round, `_limit` of that round's times ({name: (kind, seconds or
    per-round seconds)}; `names`: only those limits, their fastest). Rows are rated against it
    round by round (`per_round`): a decode row had read 129% of a limit whose best round was slower
    than the row's."""
    rounds = rounds_of(*(s for _, s in times.values()))
    if names is not None:
        return [min(in_round(times[n][1], i) for n in names) for i in range(rounds)]
    return [_limit({n: (kind, in_round(s, i)) for n, (kind, s) in times.items()}, fma) for i in range(rounds)]


def _rate_against_limits(groups: list[tuple[list[Row], int, dict]]) -> None:
    """Each row's `of_limit` and vs-fastest-built-in, per round (per_round: each round's limit, the
    fastest built-in's time in it). The FMA peak is one rate of this machine: every group's FMA limit
    is its FLOPs at the best rate any group measured (a group whose interleaved FMA rounds ran
    disturbed would otherwise get a slower limit than its kernels)."""
    best_fma = max(flops / min(_round_limits(times, 0.0, [FMA_PEAK])) for _, flops, times in groups)
    for group, flops, times in groups:
        ms = [r.rounds_ms or [r.min_ms] for r in group]
        limit = [t * 1e3 for t in _round_limits(times, flops / best_fma)]
        builtins = [m for r, m in zip(group, ms) if r.impl in BUILT_IN]
        fastest = [min(in_round(m, i) for m in builtins) for i in range(rounds_of(*builtins))]
        # pangu_ops' notes: its share of the products' ceiling (decode) and of the dense mm (prefill)
        notes = {label: [t * 1e3 for t in _round_limits(times, 0.0, names)]
                 for label, names in ((f"of {PRODUCTS}", [n for n in times if n.startswith(PRODUCTS)]),
                                      (f"of the {DENSE_MM}", [n for n in times if n.startswith(DENSE_MM)])) if names}
        for r, m in zip(group, ms):
            r.vs_fastest_builtin = per_round(fastest, m)
            r.of_limit = per_round(limit, m)
            if r.impl not in times and r.of_limit > 1.0:
                add_note(r, "ABOVE THE LIMIT: the limit or the benchmark is wrong")
            if r.impl in ("pangu_ops", PREPACKED):
                for label, reference in notes.items():
                    add_note(r, f"{per_round(reference, m):.0%} {label}")


def table(rows: list[Row]) -> str:
    head = (f"{'block':<17} {'dtype':<9} {'tokens':>6} {'mode':<8} {'routing':<8} {'impl':<30} {'median ms':>10}"
            f" {'min ms':>10} {'spread':>6} {'vs fastest built-in':>20} {'of limit':>9}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.block:<17} {r.dtype:<9} {r.tokens:>6} {r.mode:<8} {r.routing:<8} {r.impl:<30}"
                     f" {r.median_ms:>10.3f} {r.min_ms:>10.3f} {r.spread:>6.2f} {r.vs_fastest_builtin:>19.2f}x"
                     f" {100 * r.of_limit:>8.0f}%  {r.note}")
    lines.append("vs fastest built-in: the fastest of transformers' eager / batched_mm (where its per-slot weight "
                 f"copies fit in {BATCHED_MM_BYTES >> 30} GiB) / grouped_mm, best round over this row's; of limit: "
                 "the same-run limit's time over this row's (the faster of the FMA peak, at the best rate of the run, "
                 "the bf16 peak where this CPU multiplies bf16 natively and, for prefill, the dense mm for the same "
                 "FLOPs; for decode the slower of that and one read-only pass over the touched experts' weights, "
                 "plain or prefetching as the few-row kernels do, or for the forward with their products done on the "
                 "lines (read with products: the best kernel of those products), whichever is the fastest; with the "
                 "backward one more, overlapped with the write of the gradients); routing fresh: a new routing (new "
                 "rows per expert) every call; cold: the fixed routing with its experts relabelled in turn, each "
                 "call's weights untouched since its last turn (from memory, as in a model's decode step).")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r.block, r.dtype, r.mode, r.routing) for r in rows))
    cols = 4
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(4.4 * cols, 3.4 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (block, dtype, mode, routing) in zip(axes.flat, panels):
        mine = [r for r in rows if (r.block, r.dtype, r.mode, r.routing) == (block, dtype, mode, routing)]
        sizes = list(dict.fromkeys(r.tokens for r in mine))
        shown = BUILT_IN + ("pangu_ops", PREPACKED, kt_kernel.NAME)
        impls = [i for i in dict.fromkeys(r.impl for r in mine) if i in shown]
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            vals = [next((r.vs_fastest_builtin for r in mine if r.tokens == t and r.impl == impl), 0.0)  # 0: not run
                    for t in sizes]
            ax.bar([i + j * width for i in range(len(sizes))], vals, width, label=impl)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(sizes))], [str(t) for t in sizes])
        ax.set_title(f"{block} {dtype} {mode}" + (f" ({routing} routing)" if routing != "fixed" else ""), fontsize=9)
        ax.set_xlabel("tokens")
        ax.set_ylabel("speed vs fastest built-in")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> str:
    """This CPU, its vector capability and the versions, for the results' first line."""
    import datetime
    import platform

    import transformers

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return (f"pangu-ops bench --hf on {model} ({torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads), torch {torch.__version__}, transformers {transformers.__version__}, "
            f"kt-kernel: {kt_kernel.unavailable() or 'installed'}, {datetime.date.today()}")


def main(out_dir: Path, **kwargs) -> list[Row]:
    with torch.device("cpu"):  # a CPU benchmark, whatever the default device (a GPU test run sets one)
        rows = run(**kwargs)
    text = machine() + "\n\n" + table(rows)
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_hf.txt").write_text(text + "\n")
    (out_dir / "bench_hf.json").write_text(json.dumps(
        {"blocks": [dataclasses.asdict(b) for b in kwargs.get("blocks", BLOCKS)], "torch": torch.__version__,
         "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    plot(rows, out_dir / "bench_hf.png")
    print(f"wrote {out_dir / 'bench_hf.txt'}, bench_hf.json and bench_hf.png", file=sys.stderr)
    return rows
