"""The benchmarks' limit kernels (csrc/peak.cpp): `read_work` reads every byte of its tensor once
(its result is the xor of the tensor's little-endian 32-bit words, a trailing 1-3 bytes zero-padded,
so a byte skipped or read twice changes it); `write_work` sets exactly its tensor's bytes to its value
(the kernels' `fill_streaming`); `fma_work` and `bf16_dot_work` do the FLOPs asked of them; `bench --hf` splits the
experts into the touched ones' ranges (values written) and the others' (zeros)."""
import statistics

import numpy as np
import pytest
import torch

from pangu_ops import backends

pytest.importorskip("pangu_ops._C")
pytestmark = pytest.mark.usefixtures("on_the_cpu")


def _xor_of_words(t: torch.Tensor) -> int:
    raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    raw += b"\0" * (-len(raw) % 4)
    return int(np.bitwise_xor.reduce(np.frombuffer(raw, dtype="<u4"), initial=np.uint32(0)))


# one word; a 1-3-byte tail; below and above the 4096-word size that splits over threads; 4 streams
# per thread with a remainder; bf16 of odd length (a 2-byte tail)
@pytest.mark.parametrize("numel, dtype", [(1, torch.float32), (3, torch.bfloat16), (5, torch.uint8),
                                          (4095, torch.float32), (100_003, torch.float32),
                                          (262_147, torch.bfloat16)])
def test_read_work_reads_every_byte_once(numel, dtype):
    backends.load("cpu")
    gen = torch.Generator().manual_seed(numel)
    size = torch.empty(0, dtype=dtype).element_size()
    t = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=gen).view(dtype)
    assert t.numel() == numel
    expected = _xor_of_words(t)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for ahead in (0, 64, 8192):  # prefetching reads the same bytes
                assert torch.ops.pangu_cpu.read_work([t], ahead) & 0xFFFFFFFF == expected
    finally:
        torch.set_num_threads(before)
    byte = numel // 2 * size  # one bit anywhere moves it, by that bit's value in its word
    t.view(torch.uint8)[byte] ^= 0x10
    assert torch.ops.pangu_cpu.read_work([t]) & 0xFFFFFFFF == expected ^ (0x10 << (8 * (byte % 4)))


def test_read_work_reads_every_tensor_of_a_list_once():
    """One pass over several tensors (a decode step's touched weight slices: one parallel region,
    each thread's share crossing from one tensor into the next): the xor of each one's words, every
    byte read once, on 1 and 2 threads; an empty list and empty tensors read nothing."""
    backends.load("cpu")
    gen = torch.Generator().manual_seed(7)
    whole = torch.randint(0, 256, (4 * 300_001,), dtype=torch.uint8, generator=gen)
    parts = [whole[:4 * 70_001].view(torch.float32), whole[4 * 70_001:4 * 70_001 + 7], torch.empty(0),
             whole[4 * 70_001 + 7:].view(torch.int8)]
    expected = 0
    for t in parts:
        expected ^= _xor_of_words(t)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.ops.pangu_cpu.read_work(parts) & 0xFFFFFFFF == expected
            assert torch.ops.pangu_cpu.read_work([]) == 0
    finally:
        torch.set_num_threads(before)


def test_read_work_takes_contiguous_cpu_tensors_only():
    backends.load("cpu")
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.pangu_cpu.read_work([torch.zeros(8), torch.zeros(8, 8).t()])
    with pytest.raises(ValueError, match="ahead"):
        torch.ops.pangu_cpu.read_work([torch.zeros(8)], -1)


def _dot_read_dtypes():
    backends.load("cpu")
    return [d for d in (torch.float32, torch.bfloat16) if torch.ops.pangu_cpu.dot_read_ready(d)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dot_read_work_multiplies_every_value_into_every_row(dtype):
    """Each row's other operand is (r + 1) / 1024 in every lane: the sum is every value's (a
    tensor of 1 value, of part of a line, of whole lines, of lines that the streams leave over, a
    view starting mid-line) times sum_r (r + 1) / 1024, at each row count 1-16, on 1 and 2 threads;
    a value read twice or not at all moves it (random positive values, fp32 accumulation)."""
    backends.load("cpu")
    if not torch.ops.pangu_cpu.dot_read_ready(dtype):
        with pytest.raises(RuntimeError, match="dot_read_ready"):
            torch.ops.pangu_cpu.dot_read_work([torch.ones(64, dtype=dtype)], [1])
        return
    gen = torch.Generator().manual_seed(3)
    base = (torch.rand(200_000, generator=gen) + 0.5).to(dtype)
    tensors = [base[:1], base[:31], base[5:5 + 1000], base[:4096], base[7:7 + 123_457]]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for t in tensors:
                for rows in range(1, 17):
                    want = t.double().sum().item() * sum(r + 1 for r in range(rows)) / 1024
                    for ahead in (0, 8192):
                        got = torch.ops.pangu_cpu.dot_read_work([t], [rows], ahead)
                        assert got == pytest.approx(want, rel=1e-4), (t.numel(), rows, ahead)
    finally:
        torch.set_num_threads(before)
    smallest = base[:1000].double().min().item() * sum(r + 1 for r in range(3)) / 1024
    one_short = torch.ops.pangu_cpu.dot_read_work([base[:999]], [3])
    assert torch.ops.pangu_cpu.dot_read_work([base[:1000]], [3]) - one_short >= 0.99 * smallest


def test_dot_read_work_takes_each_tensors_row_count():
    """One pass over a list (each thread's share crossing tensors): each tensor's values times its
    own rows' sum, empty tensors and an empty list adding nothing."""
    for dtype in _dot_read_dtypes():
        gen = torch.Generator().manual_seed(5)
        parts = [(torch.rand(n, generator=gen) + 0.5).to(dtype) for n in (70_001, 7, 0, 230_000)]
        rows = [2, 16, 5, 1]
        want = sum(t.double().sum().item() * r * (r + 1) / 2 / 1024 for t, r in zip(parts, rows))
        before = torch.get_num_threads()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                assert torch.ops.pangu_cpu.dot_read_work(parts, rows) == pytest.approx(want, rel=1e-4)
                assert torch.ops.pangu_cpu.dot_read_work([], []) == 0
        finally:
            torch.set_num_threads(before)


def test_dot_read_work_rejects_what_it_cannot_read():
    backends.load("cpu")
    op = torch.ops.pangu_cpu.dot_read_work
    for dtype in _dot_read_dtypes():
        ok = torch.ones(64, dtype=dtype)
        with pytest.raises(ValueError, match="one row count per tensor"):
            op([ok, ok], [1])
        for rows in (0, 17):
            with pytest.raises(ValueError, match=r"rows must be in \[1, 16\]"):
                op([ok], [rows])
        with pytest.raises(ValueError, match="contiguous"):
            op([torch.ones(8, 8, dtype=dtype).t()], [1])
        with pytest.raises(ValueError, match="ahead"):
            op([ok], [1], -1)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        op([torch.ones(64, dtype=torch.float16)], [1])
    assert not torch.ops.pangu_cpu.dot_read_ready(torch.float16)


# views starting and ending mid-line (1-63-byte ends by memset) or on line boundaries, small and
# large, written in one call with a second tensor, before or after it (the threads' shares split
# between them); zeros and a value
@pytest.mark.parametrize("value", [0, 0x3C])
@pytest.mark.parametrize("start, numel", [(3, 1000), (5, 300_001), (16, 1 << 20), (1, (1 << 20) + 13)])
def test_write_work_sets_its_bytes_only(start, numel, value):
    backends.load("cpu")
    buf = torch.randint(0x40, 0x100, (4 * (start + numel + 40),), dtype=torch.uint8).view(torch.float32)
    other = torch.randint(0x40, 0x100, (4 * 777 + 3,), dtype=torch.uint8)
    before, other_before = buf.clone(), other.clone()
    view = buf[start:start + numel]
    assert view.data_ptr() % 64 != 0 or start == 16
    threads = torch.get_num_threads()
    try:
        for n, first in ((1, True), (2, True), (2, False), (3, False)):
            torch.set_num_threads(n)
            buf.copy_(before)
            ts = [view, other[1:-1]]
            torch.ops.pangu_cpu.write_work(ts if first else ts[::-1], value)
            assert torch.equal(view.view(torch.uint8), torch.full((4 * numel,), value, dtype=torch.uint8))
            bytes_, kept = buf.view(torch.uint8), before.view(torch.uint8)  # (random bits: NaNs among them)
            assert torch.equal(bytes_[:4 * start], kept[:4 * start])
            assert torch.equal(bytes_[4 * (start + numel):], kept[4 * (start + numel):])
            assert (other[1:-1] == value).all() and other[0] == other_before[0] and other[-1] == other_before[-1]
            other.copy_(other_before)
    finally:
        torch.set_num_threads(threads)


def test_write_work_takes_contiguous_cpu_tensors_and_bytes_only():
    backends.load("cpu")
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.pangu_cpu.write_work([torch.ones(8), torch.ones(600, 600).t()], 0)
    for value in (-1, 256):
        with pytest.raises(ValueError, match="byte"):
            torch.ops.pangu_cpu.write_work([torch.ones(8)], value)


@pytest.mark.parametrize("ids, expected", [
    ([[2, 3], [3, 7]], ([(2, 4), (7, 8)], [(0, 2), (4, 7)])),
    ([[0, 7], [1, 6]], ([(0, 2), (6, 8)], [(2, 6)])),
    ([list(range(8))], ([(0, 8)], [])),
    ([[5]], ([(5, 6)], [(0, 5), (6, 8)])),
])
def test_bench_hf_expert_runs_split_touched_and_untouched(ids, expected):
    from pangu_ops.benchmarks.hf import expert_runs
    assert expert_runs(torch.tensor(ids), 8) == expected


@pytest.mark.parametrize("ids, num_experts, turns", [
    ([[2, 6]], 8, 4), ([[5], [5], [1]], 7, 3), ([[0, 3], [3, 4], [6, 1]], 8, 1), ([[1, 2, 4]], 8, 2)])
def test_bench_hf_cold_cycle_touches_new_experts_every_turn(ids, num_experts, turns):
    """A cold cycle's routings touch pairwise disjoint sets of experts (as many routings as the
    experts allow, one where over half are touched), each the same routing up to relabelling: the
    first is ids itself, and every expert gets the rows of the one it stands in for."""
    from pangu_ops.benchmarks.hf import cold_cycle
    ids = torch.tensor(ids)
    cycle = cold_cycle(ids, num_experts)
    assert len(cycle) == turns and torch.equal(cycle[0], ids)
    sets = [set(c.flatten().tolist()) for c in cycle]
    assert sum(map(len, sets)) == len(set().union(*sets)) == turns * len(sets[0])
    for c in cycle:
        assert c.dtype == ids.dtype and c.shape == ids.shape and max(c.flatten().tolist()) < num_experts
        relabel = dict(zip(ids.flatten().tolist(), c.flatten().tolist()))
        assert len(set(relabel.values())) == len(relabel)  # one expert for each, the same for each
        assert c.tolist() == [[relabel[e] for e in row] for row in ids.tolist()]


def test_bench_hf_cold_rows_and_their_limit_take_the_routings_in_turn(monkeypatch):
    """Cold decode calls take the cycle's routings in turn (the router and the weight-reading
    limit alike); the limit reads the touched experts' weights of each turn's routing."""
    pytest.importorskip("transformers")
    from pangu_ops.benchmarks import hf
    backends.load("cpu")
    block = hf.Block("tiny", "MixtralConfig", hf.BLOCKS[0].module, 32, 16, 8, 2)
    experts = hf._experts(block, torch.float32)
    route = hf._router(block, 1, torch.float32, "cold")
    cycle = hf.cold_cycle(hf._router(block, 1, torch.float32, "fixed")()[0], block.experts)
    assert len(cycle) == 4 and hf._applies(block, 1, "cold") and not hf._applies(block, 2048, "cold")
    for turn in range(9):
        ids, _ = route()
        assert torch.equal(ids, cycle[turn % 4])
    read = []
    monkeypatch.setattr(torch.ops.pangu_cpu, "read_work", lambda views, ahead=0: read.append((views, ahead)))
    limits = hf._limits(block, experts, torch.float32, cycle, "fwd", 1)
    for name, ahead in (("weight reading", 0), ("weight reading, prefetched", hf.READ_AHEAD)):
        for turn in range(5):
            limits[name][1]()
            assert read[-1][1] == ahead
            for w in (experts.gate_up_proj, experts.down_proj):
                views = [v for v in read[-1][0] if v.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()]
                first = [(v.data_ptr() - w.data_ptr()) // w[0].nbytes for v in views]
                covered = {e for f, v in zip(first, views) for e in range(f, f + v.shape[0])}
                assert covered == set(cycle[turn % 4].flatten().tolist())


def test_bench_hf_products_limit_multiplies_each_touched_expert_into_its_rows(monkeypatch):
    """The decode forward's `read with products` passes each touched expert's weight slices (one
    expert each) with that expert's row count, each turn's routing in turn; none for the backward."""
    pytest.importorskip("transformers")
    from pangu_ops.benchmarks import hf
    backends.load("cpu")
    if not hf._products_read(torch.float32):
        pytest.skip("dot_read_work does not run here (no AVX-512)")
    block = hf.Block("tiny", "MixtralConfig", hf.BLOCKS[0].module, 32, 16, 8, 2)
    experts = hf._experts(block, torch.float32)
    ids = torch.tensor([[2, 5], [5, 0], [5, 2]])
    cycle = hf.cold_cycle(ids, block.experts)
    calls = []
    monkeypatch.setattr(torch.ops.pangu_cpu, "dot_read_work",
                        lambda views, rows, ahead=0: calls.append((views, rows, ahead)))
    limits = hf._limits(block, experts, torch.float32, cycle, "fwd", 3)
    for name, ahead in ((hf.PRODUCTS, 0), (f"{hf.PRODUCTS}, prefetched", hf.READ_AHEAD)):
        for turn in range(2 * len(cycle)):
            limits[name][1]()
            views, rows, got_ahead = calls[-1]
            assert got_ahead == ahead and len(views) == len(rows)
            counts = torch.bincount(cycle[turn % len(cycle)].flatten(), minlength=block.experts)
            seen = {}
            for v, r in zip(views, rows):
                w = next(w for w in (experts.gate_up_proj, experts.down_proj)
                         if v.untyped_storage().data_ptr() == w.untyped_storage().data_ptr())
                e = (v.data_ptr() - w.data_ptr()) // w[0].nbytes
                assert v.shape == w.shape[1:] and r == counts[e] > 0
                seen.setdefault(e, []).append(w is experts.gate_up_proj)
            touched = counts.nonzero().flatten().tolist()
            assert {e: sorted(s) for e, s in seen.items()} == {e: [False, True] for e in touched}
    assert hf.PRODUCTS not in hf._limits(block, experts, torch.float32, cycle, "fwd+bwd", 3)


def test_fma_work_takes_no_negative_flops():
    backends.load("cpu")
    assert torch.ops.pangu_cpu.fma_work(10_000) > 0
    with pytest.raises(ValueError, match=">= 0"):
        torch.ops.pangu_cpu.fma_work(-1)


def test_bf16_dot_work_does_the_products_asked_of_it():
    """Each thread's 12 accumulators of 16 lanes start at 1 + chain and gain 2 * 2^-10 * 2^-10 (t + 1)
    per VDPBF16PS, flops / threads / 768 + 1 times (exact in fp32 at these sizes); where the build
    has no AVX512-BF16 it says so."""
    from pangu_ops.backends import cpu as cpu_backend
    backends.load("cpu")
    if not cpu_backend.has_avx512_bf16():
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            torch.ops.pangu_cpu.bf16_dot_work(1000)
        return
    with pytest.raises(ValueError, match=">= 0"):
        torch.ops.pangu_cpu.bf16_dot_work(-1)
    threads, flops = torch.get_num_threads(), 10 ** 9
    steps = flops // threads // 768 + 1
    expected = sum(16 * (1 + c + steps * (t + 1) * 2.0 ** -19) for t in range(threads) for c in range(12))
    assert torch.ops.pangu_cpu.bf16_dot_work(flops) == pytest.approx(expected, rel=1e-6)


def test_bench_hf_takes_every_fma_limit_at_the_runs_best_rate():
    """A group whose FMA rounds ran slow (disturbed) gets its limit from the best rate of the run,
    so a kernel row that beat that group's own FMA time is flagged above the limit, not hidden."""
    from pangu_ops.benchmarks.hf import FMA_PEAK, Row, _rate_against_limits

    def group(kernel_ms, builtin_ms):
        return [Row("b", "float32", 16, "fwd", "fixed", "pangu_ops", kernel_ms, kernel_ms, 0.0),
                Row("b", "float32", 16, "fwd", "fixed", "eager", builtin_ms, builtin_ms, 0.0)]
    quiet, disturbed, decode = group(2.0, 4.0), group(1.5, 3.0), group(1.0, 2.0)
    # 1 GFLOP in 1 ms (quiet); 2 GFLOP in 4 ms (disturbed: 2 ms at the best rate); a memory-bound
    # decode group: its faster read (3 ms; two ways of reading the same bytes) outlasts its FLOPs at
    # the best rate (0.5 ms)
    _rate_against_limits([(quiet, 10 ** 9, {FMA_PEAK: ("compute", 1e-3)}),
                          (disturbed, 2 * 10 ** 9, {FMA_PEAK: ("compute", 4e-3), "dense mm": ("compute", 5e-3)}),
                          (decode, 5 * 10 ** 8, {FMA_PEAK: ("compute", 2e-3), "weight reading": ("memory", 4e-3),
                                                 "weight reading, prefetched": ("memory", 3e-3)})])
    assert [r.of_limit for r in quiet] == [0.5, 0.25]
    assert disturbed[0].of_limit == pytest.approx(2.0 / 1.5) and "ABOVE THE LIMIT" in disturbed[0].note
    assert disturbed[1].of_limit == pytest.approx(2.0 / 3.0) and "ABOVE" not in disturbed[1].note
    assert [r.of_limit for r in decode] == [3.0, 1.5] and "ABOVE THE LIMIT" in decode[0].note
    assert [r.vs_fastest_builtin for r in disturbed] == [2.0, 1.0]
    assert "read with products" not in quiet[0].note


def test_bench_hf_rates_each_round_against_the_same_rounds_limit():
    """Shares are the median over the interleaved rounds of the ratio within a round: a limit whose
    fast round (2 ms) came later than the row's (2 ms in round 1, when the limit took 4) gives 80%,
    where the two minima alone would read 100%; the speed-up over the fastest built-in alike."""
    from pangu_ops.benchmarks.hf import FMA_PEAK, Row, _rate_against_limits
    rows = [Row("b", "bfloat16", 16, "fwd", "fixed", impl, statistics.median(ms), min(ms), 0.0, rounds_ms=ms)
            for impl, ms in (("pangu_ops", [2.0, 5.0, 2.5]), ("eager", [8.0, 10.0, 5.0]))]
    _rate_against_limits([(rows, 10 ** 6, {FMA_PEAK: ("compute", [1e-4, 1e-4, 1e-4]),
                                           "weight reading": ("memory", [4e-3, 4e-3, 2e-3])})])
    assert rows[0].of_limit == pytest.approx(0.8) and rows[0].vs_fastest_builtin == pytest.approx(2.0)
    assert rows[1].of_limit == pytest.approx(0.4) and rows[1].vs_fastest_builtin == pytest.approx(1.0)


def test_bench_hf_notes_pangu_ops_share_of_the_products_ceiling():
    """A decode forward group with `read with products` limits: pangu_ops' row notes its share of
    the faster one (here 4 ms over 5 ms) beside its share of the limit (the fastest read, 3 ms)."""
    from pangu_ops.benchmarks.hf import FMA_PEAK, PRODUCTS, Row, _rate_against_limits
    rows = [Row("b", "bfloat16", 1, "fwd", "cold", impl, ms, ms, 0.0)
            for impl, ms in (("pangu_ops", 5.0), ("eager", 9.0))]
    _rate_against_limits([(rows, 10 ** 6, {FMA_PEAK: ("compute", 1e-3), "weight reading": ("memory", 3e-3),
                                           PRODUCTS: ("memory", 4.5e-3), f"{PRODUCTS}, prefetched": ("memory", 4e-3)})])
    assert rows[0].of_limit == pytest.approx(0.6) and rows[0].note == f"80% of {PRODUCTS}"
    assert rows[1].note == ""


def test_bench_hf_prefill_rows_beating_the_dense_mm_stay_within_the_bf16_peak():
    """A prefill group whose packed row beats the dense mm (4 ms) but not the bf16 peak (3 ms): its
    limit is the peak, no "ABOVE THE LIMIT"; pangu_ops' rows note their share of the dense mm."""
    from pangu_ops.benchmarks.hf import DENSE_MM, FMA_PEAK, PREPACKED, Row, _rate_against_limits
    rows = [Row("b", "bfloat16", 2048, "fwd", "fixed", impl, ms, ms, 0.0)
            for impl, ms in ((PREPACKED, 3.2), ("pangu_ops", 5.0), ("eager", 9.0))]
    _rate_against_limits([(rows, 10 ** 6, {FMA_PEAK: ("compute", 6e-3), f"{DENSE_MM} bfloat16": ("compute", 4e-3),
                                           "AVX512-BF16 peak": ("compute", 3e-3)})])
    assert [r.of_limit for r in rows] == pytest.approx([3 / 3.2, 0.6, 3 / 9])
    assert [r.note for r in rows] == [f"125% of the {DENSE_MM}", f"80% of the {DENSE_MM}", ""]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bench_hf_limits_take_the_bf16_peak_where_the_cpu_multiplies_bf16(dtype):
    """Decode rows' compute limit in bf16 is the CPU's own bf16 peak where it has one (AMX tiles,
    VDPBF16PS: the few-row kernels multiply that way and beat the fp32 FMA peak on a Zen 4); fp32
    rows and CPUs without one keep the FMA peak; prefill rows too (the packed kernels beat the dense mm
    on a Zen 4)."""
    pytest.importorskip("transformers")
    from pangu_ops.benchmarks import hf
    from pangu_ops.benchmarks.ops import bf16_peak

    block = hf.Block("tiny", "MixtralConfig", hf.BLOCKS[0].module, 32, 16, 4, 2)
    experts = hf._experts(block, dtype)
    peak = bf16_peak(1) if dtype == torch.bfloat16 else None
    reads = {"weight reading": "memory", "weight reading, prefetched": "memory"}
    if hf._products_read(dtype):
        reads.update({hf.PRODUCTS: "memory", f"{hf.PRODUCTS}, prefetched": "memory"})
    for tokens, memory in ((1, reads), (hf.PREFILL[0], {})):
        ids = torch.zeros(tokens, 2, dtype=torch.long)
        kinds = {n: k for n, (k, _) in hf._limits(block, experts, dtype, [ids], "fwd", tokens).items()
                 if not n.startswith("dense mm")}
        assert kinds == {hf.FMA_PEAK: "compute", **memory, **({peak[0].split(" (")[0]: "compute"} if peak else {})}


@pytest.mark.parametrize("kernel_ms, calls", [(1.0, 2), (3.0, 1)])
def test_bench_hf_times_a_group_again_where_a_row_beats_its_limit(monkeypatch, kernel_ms, calls):
    """A kernel row faster than its group's limit (2 ms here) gets the group timed again, every fn
    for as many rounds more (the samples joined, each round's limit against the row's time in that
    round: 2 ms then 0.5 ms over 1 ms, median 1.25); a group within its limit is timed once."""
    pytest.importorskip("transformers")
    from pangu_ops.benchmarks import hf
    from pangu_ops.benchmarks.timing import Timing

    seen = []

    def fake_interleaved(fns, device, **kwargs):
        seen.append(len(fns))
        limit_s = (0.5 if len(seen) == 2 else 2) * 1e-3  # the limits: FMA peak, the weight readings
        return [Timing([kernel_ms * 1e-3])] + [Timing([4e-3])] * 3 + [Timing([limit_s])] * (len(fns) - 4)
    monkeypatch.setattr(hf, "interleaved", fake_interleaved)
    block = hf.Block("tiny", "MixtralConfig", hf.BLOCKS[0].module, 32, 16, 4, 2)
    rows = hf.run(blocks=(block,), dtypes=(torch.float32,), sizes=(1,), modes=("fwd",), routings=("fixed",))
    assert len(seen) == calls and seen[0] == len(rows)
    ours = next(r for r in rows if r.impl == "pangu_ops")
    limits_ms = [2.0, 0.5][:calls]
    assert ours.min_ms == pytest.approx(kernel_ms) and ours.rounds_ms == pytest.approx([kernel_ms] * calls)
    assert ours.of_limit == pytest.approx(statistics.median(limit / kernel_ms for limit in limits_ms))
    assert next(r for r in rows if r.impl == "weight reading").min_ms == pytest.approx(min(limits_ms))


def test_bench_takes_the_compute_peak_at_the_runs_best_rate():
    """`pangu-ops bench`: a dtype whose compute-peak rounds ran slow (disturbed) gets the best peak
    rate any dtype measured, so its kernels' shares are against the machine, not the disturbance."""
    from pangu_ops.benchmarks.ops import PEAK_OP, Row, _compare

    def row(op, dtype, kind, rate):
        return Row(op, dtype, f"{op} {kind}", kind, 1.0, rate, "GFLOP/s")
    rows = [row(PEAK_OP, "float32", "limit", 100.0), row("dense mm", "float32", "limit", 80.0),
            row("grouped_gemm", "float32", "kernel", 70.0),
            row(PEAK_OP, "bfloat16", "limit", 50.0), row("dense mm", "bfloat16", "limit", 30.0),
            row("grouped_gemm", "bfloat16", "kernel", 60.0), row("grouped_gemm", "bfloat16", "baseline", 120.0)]
    _compare(rows)
    shares = [r.fraction_of_limit for r in rows]
    assert shares == pytest.approx([1.0, 0.8, 0.7, 0.5, 0.3, 0.6, 1.2])
    assert "ABOVE" not in rows[5].note and "ABOVE ITS LIMIT" in rows[6].note


def test_bench_rates_each_round_against_the_same_rounds_limit():
    """`pangu-ops bench`: a kernel's share of its limit is the median over the rounds of the ratio
    within a round: memcpy's best round (90 GB/s) came when the kernel ran at 80, the kernel's best
    (100) when memcpy ran at 60, so the two best rounds alone would read 111% (ABOVE ITS LIMIT)."""
    from pangu_ops.benchmarks.ops import Row, _compare
    rows = [Row("memcpy", "float32", "torch", "limit", 1.5, 90.0, "GB/s", min_ms=1.0, rounds_ms=[1.5, 1.5, 1.0]),
            Row("permute", "float32", "cpu", "kernel", 1.25, 100.0, "GB/s", min_ms=1.0, rounds_ms=[1.0, 2.0, 1.25]),
            Row("permute", "float32", "reference", "reference", 2.0, 50.0, "GB/s", min_ms=2.0, rounds_ms=[2.0, 4.0, 2.0])]
    _compare(rows)
    assert rows[1].fraction_of_limit == pytest.approx(80 / 90) and "ABOVE" not in rows[1].note
    assert rows[1].speedup_vs_reference == pytest.approx(2.0) and rows[0].fraction_of_limit == pytest.approx(1.0)


def test_bench_takes_the_bf16_peak_as_a_limit_and_notes_the_dense_mm_share():
    """`pangu-ops bench` in bf16 where the CPU multiplies it natively: a kernel beating the dense mm
    (the prepacked one on a Zen 4) is within the bf16 peak, its limit; it notes its share of the
    dense mm (the issue's targets); the dense mm's own share is of the peak."""
    from pangu_ops.benchmarks.ops import BF16_PEAK_OP, PEAK_OP, Row, _compare

    def row(op, dtype, kind, rate):
        return Row(op, dtype, f"{op} {kind}", kind, 1.0, rate, "GFLOP/s")
    rows = [row(PEAK_OP, "float32", "limit", 100.0), row(BF16_PEAK_OP, "bfloat16", "limit", 200.0),
            row("dense mm", "bfloat16", "limit", 160.0), row("expert_mlp", "bfloat16", "kernel", 180.0),
            row("expert_mlp", "bfloat16", "baseline", 120.0)]
    _compare(rows)
    assert [r.fraction_of_limit for r in rows] == pytest.approx([1.0, 1.0, 0.8, 0.9, 0.6])
    assert rows[3].note == "112% of the dense mm" and rows[4].note == "75% of the dense mm" and not rows[2].note


@pytest.mark.parametrize("amx, avx512_bf16, bf16_impl", [(True, True, "AMX peak (bf16 tiles)"),
                                                         (False, True, "AVX512-BF16 peak (registers)"),
                                                         (False, False, None)])
def test_bench_shows_bf16s_own_peak_where_the_cpu_multiplies_bf16(monkeypatch, amx, avx512_bf16, bf16_impl):
    """`pangu-ops bench`: bf16 on a CPU with AMX tiles or AVX512-BF16 gets that instruction's peak
    (the dense bf16 mm beats fp32 FMAs there), not the fp32 FMA peak; without either, and in fp32,
    the FMA peak."""
    from pangu_ops.backends import cpu as cpu_backend
    from pangu_ops.benchmarks.ops import BF16_PEAK_OP, PEAK_OP, Problem, entries
    monkeypatch.setattr(cpu_backend, "has_amx", lambda: amx)
    monkeypatch.setattr(cpu_backend, "has_avx512_bf16", lambda: avx512_bf16)
    problem = Problem(tokens=8, hidden=32, ffn=32, experts=4, topk=2)

    def peaks(dtype):
        return {e.op: e.impl for e in entries(problem, dtype, torch.device("cpu"), ["cpu"])
                if e.op in (PEAK_OP, BF16_PEAK_OP)}
    assert peaks(torch.float32) == {PEAK_OP: "FMA peak (fp32, registers)"}
    assert peaks(torch.bfloat16) == ({BF16_PEAK_OP: bf16_impl} if bf16_impl else
                                     {PEAK_OP: "FMA peak (fp32, registers)"})


def test_bench_data_movement_limit_is_the_faster_of_memcpy_and_the_ops_own_move():
    """`pangu-ops bench`: permute / unpermute are held to the faster of memcpy and their own memory
    move (the input read once, the output written once); one op's move is no other op's limit."""
    from pangu_ops.benchmarks.ops import MOVE, Row, _compare

    def row(op, kind, rate):
        return Row(op, "float32", f"{op} {kind}", kind, 1.0, rate, "GB/s")
    rows = [row("memcpy", "limit", 40.0), row(f"permute {MOVE}", "limit", 80.0),
            row(f"unpermute {MOVE}", "limit", 30.0), row("permute", "kernel", 60.0),
            row("unpermute", "kernel", 50.0)]
    _compare(rows)
    assert rows[3].fraction_of_limit == pytest.approx(0.75) and "ABOVE" not in rows[3].note
    assert rows[4].fraction_of_limit == pytest.approx(1.25) and "ABOVE ITS LIMIT" in rows[4].note


def _moved(src: torch.Tensor, dst_bytes: int) -> np.ndarray:
    """What `move_work` writes: dst line d is the xor of src lines [S d / D, S (d + 1) / D), or where
    that range is empty the last src line before it (zeros before any), as 64-bit words."""
    raw = src.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    S, D = len(raw) // 64, dst_bytes // 64
    lines = np.frombuffer(raw[:64 * S], dtype="<u8").reshape(S, 8)
    out = np.zeros((D, 8), dtype="<u8")
    for d in range(D):
        a, b = S * d // D, S * (d + 1) // D
        out[d] = np.bitwise_xor.reduce(lines[a:b], axis=0) if b > a else (lines[a - 1] if a > 0 else 0)
    return out


# src smaller, larger, equal; odd line counts and byte tails; below and above a line a thread; a
# src under one line (dst all zeros); each pair in one call with a second pair (the threads' shares
# split between them)
@pytest.mark.parametrize("src_bytes, dst_bytes", [(64 * 1000, 64 * 2000 + 12), (64 * 2001 + 5, 64 * 1000),
                                                  (64 * 4097, 64 * 4097), (64 * 3, 64 * 700), (64 * 900, 64 * 64),
                                                  (10, 64 * 300)])
def test_move_work_reads_src_and_writes_dst_once_in_order(src_bytes, dst_bytes):
    backends.load("cpu")
    gen = torch.Generator().manual_seed(src_bytes)
    pairs = [(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen), torch.full((m,), 7, dtype=torch.uint8))
             for n, m in ((src_bytes, dst_bytes), (64 * 37 + 3, 64 * 50))]
    expected = [_moved(src, dst.numel()) for src, dst in pairs]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for _, dst in pairs:
                dst.fill_(7)
            fold = torch.ops.pangu_cpu.move_work([p[0] for p in pairs], [p[1] for p in pairs]) & 0xFFFFFFFFFFFFFFFF
            for (_, dst), want in zip(pairs, expected):
                whole = dst[:dst.numel() // 64 * 64].numpy().view("<u8").reshape(-1, 8)
                assert np.array_equal(whole, want)
                assert (dst[dst.numel() // 64 * 64:] == 7).all()  # the tail untouched
            folds = [int(np.bitwise_xor.reduce(w.reshape(-1), initial=np.uint64(0))) for w in expected]
            assert fold == folds[0] ^ folds[1]
    finally:
        torch.set_num_threads(before)


def test_move_work_takes_contiguous_cpu_tensors_with_a_line_aligned_dst():
    backends.load("cpu")
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.pangu_cpu.move_work([torch.zeros(64, 64).t()], [torch.zeros(4096)])
    with pytest.raises(ValueError, match="line"):
        torch.ops.pangu_cpu.move_work([torch.zeros(4096)], [torch.zeros(4096)[1:]])
    with pytest.raises(ValueError, match="one dst per src"):
        torch.ops.pangu_cpu.move_work([torch.zeros(4096)], [])
