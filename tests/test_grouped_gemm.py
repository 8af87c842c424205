"""grouped_gemm (forward, dX, dW) against the reference and torch's own grouped/dense GEMMs."""
import pytest
import torch
import torch.nn.functional as F

import pangu_ops
from pangu_ops import backends, reference, verify
from pangu_ops.backends.cpu import output_cache

from conftest import BACKENDS, reference_test


test_matches_reference = reference_test("grouped_gemm")


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_per_expert_matmul(backend):
    """Independent of the reference: each group is its own dense matmul; int32 sizes accepted."""
    sizes = torch.tensor([3, 0, 5, 1], dtype=torch.int32)
    x, w = torch.randn(9, 7), torch.randn(4, 7, 11)
    with pangu_ops.use_backend(backend):
        y = pangu_ops.grouped_gemm(x, w, sizes)
    expected = torch.cat([x[0:3] @ w[0], x[3:8] @ w[2], x[8:9] @ w[3]])
    torch.testing.assert_close(y, expected, **verify.TOLERANCES[torch.float32])


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch has no F.grouped_mm")
@pytest.mark.parametrize("backend", BACKENDS)
def test_interop_with_torch_grouped_mm(backend):
    sizes = torch.tensor([16, 0, 8, 24])
    x, w = torch.randn(48, 32), torch.randn(4, 32, 16)
    with pangu_ops.use_backend(backend):
        y = pangu_ops.grouped_gemm(x, w, sizes)
    expected = F.grouped_mm(x, w, offs=sizes.cumsum(0).to(torch.int32))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_expert_weight_gets_zero_gradient(backend):
    sizes = torch.tensor([4, 0, 2])
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(3, 5, 4, requires_grad=True)
    with pangu_ops.use_backend(backend):
        pangu_ops.grouped_gemm(x, w, sizes).square().sum().backward()
    assert torch.equal(w.grad[1], torch.zeros(5, 4))
    assert (w.grad[0] != 0).any() and (w.grad[2] != 0).any()


@pytest.mark.usefixtures("on_the_cpu")
def test_empty_experts_get_zeros_in_reused_memory():
    """The CPU backend's weight gradient takes its output from the output pool, whose blocks hold
    an earlier output's values: runs of experts without rows (one, and two side by side, each over
    1 MiB: streamed zeros) must be zeroed there, the others written."""
    backends.load("cpu")
    gen = verify.generator(2)
    x, dy = verify.randn((8, 256), torch.float32, gen), verify.randn((8, 1536), torch.float32, gen)
    everywhere = torch.ops.pangu_cpu.grouped_gemm_wgrad(x, dy, torch.tensor([1, 1, 2, 1, 3]))
    assert (everywhere != 0).all()
    del everywhere  # its block goes back to the pool, for the next output of its size
    reused = output_cache()["reused"]
    sizes = torch.tensor([3, 0, 5, 0, 0])
    dw = torch.ops.pangu_cpu.grouped_gemm_wgrad(x, dy, sizes)
    assert output_cache()["reused"] == reused + 1
    torch.testing.assert_close(dw, reference.grouped_gemm_wgrad(x, dy, sizes), rtol=1e-5, atol=1e-4)
    assert not dw[[1, 3, 4]].any() and dw[[0, 2]].all()


@pytest.mark.usefixtures("on_the_cpu")
def test_few_row_weight_gradient_nans_are_canonical():
    """bf16 dW over decode-sized groups rounds every NaN to 0x7FC0 as torch does (x86's own NaN
    from inf * 0 and a negative NaN operand carry the sign bit), where the operands are not all
    finite (1 row: inf * 0; 2 rows: a negative NaN), and overflows to inf as the reference does."""
    backends.load("cpu")
    gen = verify.generator(3)
    sizes = torch.tensor([1, 2, 0])
    x, dy = verify.randn((3, 40), torch.bfloat16, gen), verify.randn((3, 64), torch.bfloat16, gen)
    x[0, 5], dy[0, 7] = float("inf"), 0.0  # dW[0][5, 7] = inf * 0
    x.view(torch.int16)[2, 9] = -64  # 0xFFC0: a NaN with the sign bit, dW[1][9, :]
    x[1:3, 12], dy[1:3, 3] = 2.0 ** 100, 2.0 ** 100  # dW[1][12, 3]: products beyond fp32's range
    dw = torch.ops.pangu_cpu.grouped_gemm_wgrad(x, dy, sizes)
    expected = reference.grouped_gemm_wgrad(x, dy, sizes)
    nan = expected.isnan()
    assert nan[0, 5, 7] and nan[1, 9].all() and expected[1, 12, 3] == float("inf")
    assert torch.equal(dw.isnan(), nan) and (dw[nan].view(torch.int16) == 0x7FC0).all()
    torch.testing.assert_close(dw, expected, **verify.TOLERANCES[torch.bfloat16], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.usefixtures("bf16_dots", "dots_tuning")
def test_few_rows_per_expert(dtype, trans_b):
    """Decode-sized groups (1-17 rows: the few-row kernels' 4 / 2 / 1-row dot passes, the streamed
    row-major passes of 1-8 rows and the 16-column tiles above, and the switch back to the matmul
    above 16 rows, 8 in fp32 with row-major weights) with widths that leave tails (N = 37, K = 70: K split in two with a
    remainder of b's rows), against fp32 products of the same values, rounded once."""
    sizes = torch.tensor([1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 16, 17])
    gen = verify.generator(0)
    x = verify.randn((int(sizes.sum()), 70), dtype, gen)
    w = verify.randn((len(sizes), *((37, 70) if trans_b else (70, 37))), dtype, gen)
    y = pangu_ops.grouped_gemm(x, w, sizes, trans_b)
    rows = x.float().split(sizes.tolist())
    expected = torch.cat([r @ (w[e].float().t() if trans_b else w[e].float()) for e, r in enumerate(rows)]).to(dtype)
    torch.testing.assert_close(y, expected, **verify.TOLERANCES[dtype])


@pytest.mark.usefixtures("bf16_dots")
def test_few_rows_per_expert_with_long_weight_rows():
    """bf16, a row-major weight of 2048+ columns: where VDPBF16PS is the faster dot product
    (`bf16_pair_dots`), 2-8 rows go through pairs of the weight's rows interleaved 32 columns at a
    time; an odd K (each thread's share of K ends in an unpaired row, zeros beside it) and a tail of
    N % 32 columns, every row count 1-9 and an expert without rows, against fp32 products of the
    same values, rounded once. Elsewhere the same products run the other few-row kernels."""
    sizes = torch.tensor([1, 2, 3, 4, 0, 5, 6, 7, 8, 9])
    gen = verify.generator(13)
    x = verify.randn((int(sizes.sum()), 69), torch.bfloat16, gen, scale=69 ** -0.5)
    w = verify.randn((len(sizes), 69, 2085), torch.bfloat16, gen)
    y = pangu_ops.grouped_gemm(x, w, sizes)
    rows = x.float().split(sizes.tolist())
    expected = torch.cat([r @ w[e].float() for e, r in enumerate(rows)]).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, **verify.TOLERANCES[torch.bfloat16])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("onednn", [False, True])
def test_fp32_library_products(onednn):
    """fp32 groups past the few-row kernels (19-70 rows) run on a library's matmul: oneDNN's
    (`onednn_fp32`: a shape's first 7 calls with the rows padded to a multiple of 32, then its own
    kernel) or BLAS's, forced either way; nine calls of the same sizes, both weight layouts and the
    weight gradient, against fp64 products of the same values."""
    from pangu_ops.backends import cpu as cpu_backend
    sizes = torch.tensor([37, 0, 70, 19])
    gen = verify.generator(41)
    x = verify.randn((int(sizes.sum()), 70), torch.float32, gen)
    w = verify.randn((len(sizes), 70, 45), torch.float32, gen)
    dy = verify.randn((int(sizes.sum()), 45), torch.float32, gen)
    rows, grads = x.double().split(sizes.tolist()), dy.double().split(sizes.tolist())
    expected = torch.cat([r @ w[e].double() for e, r in enumerate(rows)]).float()
    expected_dw = torch.stack([r.t() @ g for r, g in zip(rows, grads)]).float()
    wt = w.transpose(1, 2).contiguous()
    with cpu_backend.onednn_fp32_forced(onednn):
        for _ in range(9):
            tol = verify.TOLERANCES[torch.float32]
            torch.testing.assert_close(pangu_ops.grouped_gemm(x, w, sizes), expected, **tol)
            torch.testing.assert_close(pangu_ops.grouped_gemm(x, wt, sizes, trans_b=True), expected, **tol)
            torch.testing.assert_close(torch.ops.pangu_cpu.grouped_gemm_wgrad(x, dy, sizes), expected_dw, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_few_row_dot_tunings_agree(dtype):
    """The few-row dot kernels (weights with contiguous rows) as tuned for both kinds of AVX-512 unit
    (`full_width_512`: 8 or 4 of the weight's rows at once at 2-3 rows of bf16, software prefetch by
    block or by the product's rows) give the same bits at 1-9 rows per expert, with a tail of K past
    the 8 KiB prefetch distance and columns that leave each thread's share a tail of the 4 / 8
    streams, and match fp32 products of the same values, rounded once."""
    from pangu_ops.backends import cpu as cpu_backend
    sizes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9])
    gen = verify.generator(31)
    K, N = 4126, 75
    x = verify.randn((int(sizes.sum()), K), dtype, gen, scale=K ** -0.5)
    w = verify.randn((len(sizes), N, K), dtype, gen)
    ys = []
    for full in (False, True):
        with cpu_backend.full_width_512_forced(full):
            ys.append(pangu_ops.grouped_gemm(x, w, sizes, trans_b=True))
    assert torch.equal(ys[0], ys[1])
    rows = x.float().split(sizes.tolist())
    expected = torch.cat([r @ w[e].float().t() for e, r in enumerate(rows)]).to(dtype)
    torch.testing.assert_close(ys[0], expected, **verify.TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.usefixtures("on_the_cpu", "bf16_dots", "dots_tuning")
def test_few_row_dots_stored_in_blocks(dtype):
    """The few-row dot kernels (weights with contiguous rows) store each stream's outputs 16 adjacent
    ones at a time: 1-16 rows per expert against 299 weight rows (each thread's share of the streams
    spans whole blocks of 16 and a partial one, and leaves rows over for the one-row pass) and an
    odd K. A weight row holding inf (inf against a zero of x: NaN) and a NaN in one row of x give
    NaN (bf16: 0x7FC0, as torch rounds) and inf exactly where the reference's fp32 products do; the
    rest matches the reference."""
    backends.load("cpu")
    sizes = torch.tensor([1, 2, 3, 4, 0, 5, 8, 16])
    gen = verify.generator(47)
    K, N = 77, 299
    x = verify.randn((int(sizes.sum()), K), dtype, gen, scale=K ** -0.5)
    w = verify.randn((len(sizes), N, K), dtype, gen)
    off = sizes.cumsum(0) - sizes
    w[2, 40, 10] = float("inf")  # expert 2: column 40 inf, NaN in its row whose x[., 10] is 0
    x[off[2] + 1, 10] = 0.0
    x[off[6] + 3, 5] = float("nan")  # expert 6's fourth row: all NaN
    y = torch.ops.pangu_cpu.grouped_gemm(x, w, sizes, True)
    expected = reference.grouped_gemm(x, w, sizes, True)
    nan = expected.isnan()
    assert nan[off[2] + 1, 40] and nan[off[6] + 3].all() and expected[off[2], 40].isinf()
    assert torch.equal(y.isnan(), nan)
    if dtype == torch.bfloat16:
        assert (y[nan].view(torch.int16) == 0x7FC0).all()
    torch.testing.assert_close(y, expected, **verify.TOLERANCES[dtype], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.usefixtures("on_the_cpu", "bf16_dots", "dots_tuning")
def test_few_row_dots_rows_independent_of_row_count(dtype):
    """With AVX-512, a decode step's products on weights with contiguous rows (transformers' layout)
    give each row of x the bits it gets alone, whichever of 1-16 rows share its expert (1-12 on the
    bf16 FMA kernels, which leave 13+ rows to oneDNN: `kFewRowsNoTiles`): a token's output does not
    depend on the batch it is decoded in. Each lane's sum runs over K in one order in every row
    block and stream count; a second accumulator per product (measured in session 39) would break
    this. Long and short odd K, N leaving every stream count a tail, and enough outputs that a
    changed fp32 sum shows in some bf16 rounding."""
    from pangu_ops.backends import cpu as cpu_backend
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the few-row dot kernels with this property are AVX-512's")
    if dtype == torch.bfloat16 and cpu_backend.has_amx():
        pytest.skip("with AMX-BF16, bf16 steps of 2+ rows take tiles (other sums than one row's)")
    rows = 16 if dtype == torch.float32 or cpu_backend.bf16_pair_dots() else 12
    gen = verify.generator(53)
    for K, N in ((3583, 509), (77, 299)):
        x = verify.randn((16, K), dtype, gen, scale=K ** -0.5)
        w = verify.randn((1, N, K), dtype, gen)
        alone = torch.cat([pangu_ops.grouped_gemm(x[i:i + 1], w, torch.tensor([1]), trans_b=True) for i in range(16)])
        torch.testing.assert_close(alone, reference.grouped_gemm(x, w, torch.tensor([16]), True),
                                   **verify.TOLERANCES[dtype])
        for m in range(2, rows + 1):
            assert torch.equal(pangu_ops.grouped_gemm(x[:m], w, torch.tensor([m]), trans_b=True), alone[:m]), (K, m)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("k, n", [(1024, 40), (48, 1024)])
def test_few_rows_per_expert_with_rows_4kib_apart(dtype, trans_b, k, n):
    """K or N of 1024 fp32 elements: the few-row kernels lay a's rows and their accumulators out
    one line further apart than 4 KiB (`unaliased_stride`); every path (dots, streamed, tiles) on
    those strides, against fp32 products of the same values, rounded once."""
    sizes = torch.tensor([1, 3, 8, 0, 12, 16])
    gen = verify.generator(3)
    x = verify.randn((int(sizes.sum()), k), dtype, gen, scale=k ** -0.5)
    w = verify.randn((len(sizes), *((n, k) if trans_b else (k, n))), dtype, gen)
    y = pangu_ops.grouped_gemm(x, w, sizes, trans_b)
    rows = x.float().split(sizes.tolist())
    expected = torch.cat([r @ (w[e].float().t() if trans_b else w[e].float()) for e, r in enumerate(rows)]).to(dtype)
    torch.testing.assert_close(y, expected, **verify.TOLERANCES[dtype])


@pytest.mark.parametrize("trans_b, n", [(True, 69), (True, 48), (True, 16), (False, 64), (False, 192)])
def test_few_rows_per_expert_amx_tiles(trans_b, n):
    """bf16, K a multiple of 32: where the CPU has AMX-BF16, 3-16 rows (2-16 row-major) go through
    AMX tiles. The
    weight's rows contiguous: two 16-row blocks of the weight at a time, then a single block, the
    last N % 16 rows by the 16-lane dot products; row-major (N a multiple of 64): 64 columns at a
    time, pairs of the weight's rows interleaved on the fly. Every row count 1-16, against fp32
    products of the same values, rounded once. Elsewhere the same products run the other few-row
    kernels."""
    sizes = torch.arange(1, 17)
    gen = verify.generator(7)
    x = verify.randn((int(sizes.sum()), 96), torch.bfloat16, gen, scale=96 ** -0.5)
    w = verify.randn((len(sizes), *((n, 96) if trans_b else (96, n))), torch.bfloat16, gen)
    y = pangu_ops.grouped_gemm(x, w, sizes, trans_b=trans_b)
    rows = x.float().split(sizes.tolist())
    expected = torch.cat([r @ (w[e].float().t() if trans_b else w[e].float()) for e, r in enumerate(rows)])
    torch.testing.assert_close(y, expected.to(torch.bfloat16), **verify.TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("trans_b, n", [(True, 48), (False, 64)])
@pytest.mark.usefixtures("bf16_dots")
def test_few_rows_amx_tiles_nans_are_canonical(trans_b, n):
    """bf16 outputs of 3-4-row groups (AMX tiles where the CPU has them: their sums are rounded 16
    lanes at a time) round every NaN to 0x7FC0 as torch does: inf * 0 (x86's NaN carries the sign
    bit) and a negative NaN operand."""
    sizes = torch.tensor([3, 4])
    gen = verify.generator(11)
    x = verify.randn((7, 64), torch.bfloat16, gen)
    w = verify.randn((2, *((n, 64) if trans_b else (64, n))), torch.bfloat16, gen)
    x[0, 5] = float("inf")  # row 0: inf * 0 in column 7 of expert 0
    (w[0, 7, 5] if trans_b else w[0, 5, 7]).zero_()
    x.view(torch.int16)[4, 9] = -64  # 0xFFC0: a NaN with the sign bit, every column of row 4
    y = pangu_ops.grouped_gemm(x, w, sizes, trans_b=trans_b)
    rows = x.float().split(sizes.tolist())
    expected = torch.cat([r @ (w[e].float().t() if trans_b else w[e].float()) for e, r in enumerate(rows)])
    nan = expected.isnan()
    assert nan[0, 7] and nan[4].all() and nan.sum() < y.numel()
    assert torch.equal(y.isnan(), nan) and (y[nan].view(torch.int16) == 0x7FC0).all()


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("k, n, sizes", [
    (96, 64, [17, 0, 1, 33, 16, 64, 31]),  # 16-row halves, empty and one-row groups
    (2048, 96, [300, 20]),                 # K = 2048: 256-row chunks, 300 rows in two
    (1024, 1024, [40, 70]),                # 2 MiB of weight a group: two column chunks
    (1024, 1024, [600]),                   # one group: its chunks split into units
    (64, 1024, [600, 500]),                # dW: column ranges sized per group
    (4096, 64, [300, 17]),                 # row-major b, K > 2048: K in blocks of 1024, b packed
                                           # per 32 columns and block (a unit of one row chunk)
    (96, 2080, [40, 0, 530]),              # and dX of the transposed layout, a 32-element last block
])
def test_prefill_sized_groups(trans_b, k, n, sizes):
    """bf16 groups of more than 16 rows (prefill), K and N multiples of 32: where the CPU has
    AMX-BF16, the forward, dX (the other layout) and dW run the grouped tile kernels
    (amx_grouped.h): rows packed into VNNI pairs or tiles per task, row-major weights' pairs of rows
    interleaved per task, the transposed product's output turned back on store; chunks of rows and
    columns, units split across the threads, K in blocks with fp32 sums between them. Where its
    bf16 products are VDPBF16PS's (a Zen 4), the forward and dX run packed_pairs.h's
    unpacked_pairs: each thread's share of a group's 16-column blocks 4 at a time packed into L2
    (the next 4's lines fetched meanwhile; shares of 2-3 blocks and a last 1-3 alone), both
    layouts. x is a column slice of a wider tensor (rows further apart than K). Against fp32
    products of the same values, rounded once; elsewhere the same products run the other kernels."""
    sizes = torch.tensor(sizes)
    gen = verify.generator(11)
    wide = verify.randn((int(sizes.sum()), k + 32), torch.bfloat16, gen, scale=k ** -0.5)
    x = wide[:, :k]
    w = verify.randn((len(sizes), *((n, k) if trans_b else (k, n))), torch.bfloat16, gen)
    dy = verify.randn((x.shape[0], n), torch.bfloat16, gen, scale=0.1)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = pangu_ops.grouped_gemm(xr, wr, sizes, trans_b)
    y.backward(dy)
    rows, grads = x.float().split(sizes.tolist()), dy.float().split(sizes.tolist())
    w_kn = [w[e].float().t() if trans_b else w[e].float() for e in range(len(sizes))]
    tol = verify.TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(y, torch.cat([r @ w_kn[e] for e, r in enumerate(rows)]).bfloat16(), **tol)
    torch.testing.assert_close(xr.grad, torch.cat([g @ w_kn[e].t() for e, g in enumerate(grads)]).bfloat16(), **tol)
    dw = torch.stack([r.t() @ g for r, g in zip(rows, grads)])
    torch.testing.assert_close(wr.grad, (dw.transpose(1, 2) if trans_b else dw).bfloat16(), **tol)
    assert (y != 0).any(1).all()


@pytest.mark.parametrize("trans_b", [False, True])
def test_prefill_sized_groups_of_every_other_expert(trans_b):
    """The prefill kernels on a view of every other expert of a stacked weight (experts 2 K N
    apart): the forward and dX against the same products on a contiguous copy."""
    sizes = torch.tensor([40, 0, 23])
    gen = verify.generator(13)
    x = verify.randn((int(sizes.sum()), 64), torch.bfloat16, gen, scale=0.125)
    stacked = verify.randn((6, *((160, 64) if trans_b else (64, 160))), torch.bfloat16, gen)
    dy = verify.randn((x.shape[0], 160), torch.bfloat16, gen)
    got, want = [], []
    for w in (stacked[::2], stacked[::2].contiguous()):
        xr = x.clone().requires_grad_()
        y = pangu_ops.grouped_gemm(xr, w, sizes, trans_b)
        y.backward(dy)
        got, want = want, [y, xr.grad]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("trans_b", [False, True])
def test_prefill_sized_groups_with_more_threads_than_column_blocks(trans_b):
    """5 threads against 2 column blocks (N = 32): the threads' shares of a group's blocks are
    empty or one block (packed_pairs.h's tasks); the same products as ever."""
    threads = torch.get_num_threads()
    torch.set_num_threads(5)
    try:
        test_prefill_sized_groups(trans_b, 64, 32, [40, 20, 0])
    finally:
        torch.set_num_threads(threads)


def test_blocked_k_units_of_several_row_chunks():
    """One thread: four groups of two 512-row chunks each make four units (none split), whose
    row-major b (K > 2048) is packed once per unit for all of K rather than per column slice."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        test_prefill_sized_groups(False, 4096, 64, [600, 600, 600, 600])
    finally:
        torch.set_num_threads(threads)


def test_new_shapes_padded_then_their_own_kernel():
    """Where torch's bf16 matmul is native (AMX-BF16), a product shape's first 7 calls run padded by
    zeros to multiples of 32 rows and inner elements (oneDNN's kernels for those reused), the 8th and
    later as they are: 9 calls of the same forward, dX and dW (groups of 45 and 33 rows, K = 70:
    both dimensions padded) against fp32 products of the same values, rounded once; each call
    equals the reference, padded or not. Elsewhere the same calls run the fp32 path."""
    sizes = torch.tensor([45, 0, 33])
    gen = verify.generator(5)
    x = verify.randn((int(sizes.sum()), 70), torch.bfloat16, gen, scale=70 ** -0.5)
    w = verify.randn((3, 70, 50), torch.bfloat16, gen)
    dy = verify.randn((int(sizes.sum()), 50), torch.bfloat16, gen)
    rows, grads = x.float().split(sizes.tolist()), dy.float().split(sizes.tolist())
    y_ref = torch.cat([r @ w[e].float() for e, r in enumerate(rows)]).to(torch.bfloat16)
    dx_ref = torch.cat([g @ w[e].float().t() for e, g in enumerate(grads)]).to(torch.bfloat16)
    dw_ref = torch.stack([r.t() @ g for r, g in zip(rows, grads)]).to(torch.bfloat16)
    tol = verify.TOLERANCES[torch.bfloat16]
    for _ in range(9):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = pangu_ops.grouped_gemm(xr, wr, sizes)
        y.backward(dy)
        torch.testing.assert_close(y, y_ref, **tol)
        torch.testing.assert_close(xr.grad, dx_ref, **tol)
        torch.testing.assert_close(wr.grad, dw_ref, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("k, n", [(70, 37), (67, 64)])
def test_weight_gradient_over_few_rows_per_expert(dtype, trans_b, k, n):
    """dW over decode-sized groups (0-17 rows: the short-inner-dimension kernel's 2-, 3-, 4- and
    6-row tiles and 16- / 32-column panels with their tails, up to 16 rows, the matmul above; 64
    columns: bf16's streamed whole-line stores), both layouts, against the reference (fp32 products
    of the same values, rounded once); an expert without rows gets zeros."""
    sizes = torch.tensor([1, 2, 3, 4, 5, 0, 7, 16, 17])
    gen = verify.generator(1)
    x = verify.randn((int(sizes.sum()), k), dtype, gen)
    w = verify.randn((len(sizes), *((n, k) if trans_b else (k, n))), dtype, gen).requires_grad_()
    dy = verify.randn((x.shape[0], n), dtype, gen)
    pangu_ops.grouped_gemm(x, w, sizes, trans_b).backward(dy)
    expected = reference.grouped_gemm_wgrad(dy, x, sizes) if trans_b else reference.grouped_gemm_wgrad(x, dy, sizes)
    torch.testing.assert_close(w.grad, expected, **verify.TOLERANCES[dtype])
    assert torch.equal(w.grad[5], torch.zeros_like(w.grad[5])) and (w.grad[0] != 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_activations_give_the_contiguous_bits(dtype):
    """An activation that comes expanded (a loss's gradient, stride 0) or transposed multiplies as
    its contiguous copy does, bit for bit (the kernels are chosen by the operands' strides: eager
    autograd against a compiled graph that materialised the gradient), forward and weight
    gradient, decode-sized groups of 1-12 rows."""
    sizes = torch.tensor([1, 4, 0, 9, 12])
    gen = verify.generator(3)
    S, K, N = int(sizes.sum()), 48, 40
    w = verify.randn((len(sizes), N, K), dtype, gen)
    other = verify.randn((S, N), dtype, gen)
    for x in (verify.randn((S, 1), dtype, gen).expand(S, K), verify.randn((K, S), dtype, gen).t()):
        assert x.stride(1) != 1
        y = pangu_ops.grouped_gemm(x, w, sizes, trans_b=True)
        assert torch.equal(y, pangu_ops.grouped_gemm(x.contiguous(), w, sizes, trans_b=True))
        dw = torch.ops.pangu.grouped_gemm_wgrad(other, x, sizes)
        assert torch.equal(dw, torch.ops.pangu.grouped_gemm_wgrad(other, x.contiguous(), sizes))
