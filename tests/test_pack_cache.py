"""The C++ kernels' cache of packed expert weights (AMX-BF16 CPUs): a weight version's tiles are
packed on its second use and reused while it is unchanged, never after it changed (in place,
through `.data`, or freed and replaced); the cap turns it off. Elsewhere the cache stays empty and
the same products are checked."""
import os
import subprocess
import sys

import pytest
import torch

import pangu_ops
from pangu_ops import verify
from pangu_ops.backends import cpu as cpu_backend

pytest.importorskip("pangu_ops._C")

pytestmark = pytest.mark.usefixtures("on_the_cpu")

# a prefill-sized group (the grouped tile kernels' path) beside a decode step's 1 and 2 rows (dot
# products over the cached tiles)
SIZES = torch.tensor([70, 1, 2])


def _amx() -> bool:
    return cpu_backend.has_amx()


def _product(x, w):
    with pangu_ops.use_backend("cpu"):
        y = pangu_ops.grouped_gemm(x, w, SIZES)
    rows = x.float().split(SIZES.tolist())
    expected = torch.cat([r @ w[e].float() for e, r in enumerate(rows)]).bfloat16()
    torch.testing.assert_close(y, expected, **verify.TOLERANCES[torch.bfloat16])
    return y


def _weights(seed):
    gen = verify.generator(seed)
    x = verify.randn((int(SIZES.sum()), 96), torch.bfloat16, gen, scale=96 ** -0.5)
    return x, verify.randn((len(SIZES), 96, 64), torch.bfloat16, gen)


def _twice(x, w):
    """A weight version's first use packs per task (remembered only), its second fills the cache."""
    first = _product(x, w)
    assert torch.equal(_product(x, w), first)
    return first


def test_reused_while_unchanged_repacked_after_any_change():
    pangu_ops.cpu_pack_cache(clear=True)
    start = pangu_ops.cpu_pack_cache()
    x, w = _weights(0)
    first = _product(x, w)
    seen = pangu_ops.cpu_pack_cache()
    assert torch.equal(_product(x, w), first)
    packed = pangu_ops.cpu_pack_cache()
    assert torch.equal(_product(x, w), first)  # unchanged: the same tiles
    again = pangu_ops.cpu_pack_cache()
    with torch.no_grad():
        w.mul_(-2)  # an optimizer's in-place update: a new version
    _twice(x, w)
    bumped = pangu_ops.cpu_pack_cache()
    with torch.no_grad():
        w[0, 5, 7] += 1.0  # one element, none of the sampled ones: only the version tells
    _twice(x, w)
    one = pangu_ops.cpu_pack_cache()
    w.data.mul_(-0.25)  # `.data` bypasses the version counter; the sampled elements change
    _twice(x, w)
    sampled = pangu_ops.cpu_pack_cache()
    del w
    _, w2 = _weights(1)  # a new weight, perhaps in the freed one's memory
    _twice(x, w2)
    fresh = pangu_ops.cpu_pack_cache()
    if not _amx():
        assert fresh == {"cached_bytes": 0, "entries": 0, "hits": 0, "packs": 0}
        return
    assert seen["packs"] == start["packs"] and seen["entries"] == 0
    assert packed["packs"] == start["packs"] + 1 and packed["entries"] == 1
    assert packed["cached_bytes"] == 3 * 96 * 64 * 2
    assert again["hits"] == packed["hits"] + 1 and again["packs"] == packed["packs"]
    for before, after in ((again, bumped), (bumped, one), (one, sampled), (sampled, fresh)):
        assert after["packs"] == before["packs"] + 1 and after["entries"] == 1  # old tiles gone
    assert pangu_ops.cpu_pack_cache(clear=True)["entries"] == 0


def test_views_of_one_storage_are_told_apart():
    """Two experts' slices of one stacked weight (same storage, other offsets) and a transposed
    use of the same memory each get their own tiles."""
    pangu_ops.cpu_pack_cache(clear=True)
    x, w = _weights(2)
    both = torch.cat([w, -w])
    _twice(x, both[:3])
    _twice(x, both[3:])
    if _amx():
        assert pangu_ops.cpu_pack_cache()["entries"] == 2


def test_cap_zero_turns_it_off():
    code = ("import torch, pangu_ops\n"
            "x = torch.randn(110, 96).bfloat16(); w = torch.randn(3, 96, 64).bfloat16()\n"
            "with pangu_ops.use_backend('cpu'):\n"
            "    for _ in range(3): pangu_ops.grouped_gemm(x, w, torch.tensor([40, 0, 70]))\n"
            "print(pangu_ops.cpu_pack_cache()['entries'])\n")
    env = dict(os.environ, PANGU_OPS_CPU_PACK_CACHE_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_columns_contiguous_weights_are_cached_too():
    """transformers' layout (`trans_b`: w[e] stored [N, K]) gets tiles of its own on its second use,
    which the row-major kernel then runs: the same values as the first call (the transposed kernel
    reading the weight in place) and as the reference; the same memory used row-major is another
    entry."""
    pangu_ops.cpu_pack_cache(clear=True)
    sizes = torch.tensor([70, 0, 1, 2, 37])  # an empty expert, decode-sized and odd groups
    gen = verify.generator(3)
    x = verify.randn((int(sizes.sum()), 96), torch.bfloat16, gen, scale=96 ** -0.5)
    wt = verify.randn((len(sizes), 64, 96), torch.bfloat16, gen)  # [E, N, K]
    with pangu_ops.use_backend("cpu"):
        first = pangu_ops.grouped_gemm(x, wt, sizes, trans_b=True)
        assert torch.equal(pangu_ops.grouped_gemm(x, wt, sizes, trans_b=True), first)
        assert torch.equal(pangu_ops.grouped_gemm(x, wt, sizes, trans_b=True), first)
        # the same memory as a row-major [E, K', N'] weight (K' = N = 64, N' = K = 96)
        xr = verify.randn((int(sizes.sum()), 64), torch.bfloat16, verify.generator(4))
        rm = pangu_ops.grouped_gemm(xr, wt, sizes)
        assert torch.equal(pangu_ops.grouped_gemm(xr, wt, sizes), rm)
    expected = torch.cat([r @ wt[e].float().t() for e, r in enumerate(x.float().split(sizes.tolist()))])
    torch.testing.assert_close(first, expected.bfloat16(), **verify.TOLERANCES[torch.bfloat16])
    stats = pangu_ops.cpu_pack_cache()
    if _amx():
        assert stats["entries"] == 2 and stats["hits"] >= 1  # wt both ways
    else:
        assert stats["entries"] == 0
