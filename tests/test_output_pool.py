"""The C++ kernels' cache of large output blocks: freed outputs' memory is reused, never their
values; pooled tensors behave like any other; the cap turns it off."""
import io
import os
import subprocess
import sys

import pytest
import torch

import pangu_ops
from pangu_ops import reference

pytest.importorskip("pangu_ops._C")

# 4096 tokens x 256 fp32 x top-1: 4 MiB outputs, above the pool's 1 MiB threshold
T, H, E = 4096, 256, 8

pytestmark = pytest.mark.usefixtures("on_the_cpu")



def _permute(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    ids = torch.randint(0, E, (T, 1), generator=gen)
    with pangu_ops.use_backend("cpu"):
        got = pangu_ops.permute(x, ids, E)
    for a, b in zip(got, reference.permute(x, ids, E)):
        assert torch.equal(a, b)
    return got[0]


def test_freed_outputs_are_reused_with_fresh_values():
    pangu_ops.cpu_output_cache(clear=True)
    first = _permute(0)
    start = pangu_ops.cpu_output_cache()
    assert start["cached_bytes"] == 0
    del first
    assert pangu_ops.cpu_output_cache()["cached_bytes"] >= T * H * 4
    second = _permute(1)  # the same block, other values: checked against the reference inside
    after = pangu_ops.cpu_output_cache()
    assert after["reused"] == start["reused"] + 1 and after["fresh"] == start["fresh"]
    assert after["cached_bytes"] == 0
    del second
    assert pangu_ops.cpu_output_cache(clear=True)["cached_bytes"] == 0


def test_small_outputs_are_not_pooled():
    pangu_ops.cpu_output_cache(clear=True)
    before = pangu_ops.cpu_output_cache()
    x = torch.randn(16, 8)
    with pangu_ops.use_backend("cpu"):
        out = pangu_ops.permute(x, torch.randint(0, 4, (16, 2)), 4)[0]
    del out
    assert pangu_ops.cpu_output_cache() == before


def test_pooled_tensor_behaves_like_any_tensor():
    out = _permute(2)
    expected = out.clone()
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), expected)
    out.add_(1.0)
    assert torch.equal(out, expected + 1.0)
    out.resize_(2 * T, H)  # the storage grows through the same allocator
    assert torch.equal(out[:T], expected + 1.0)
    out[T:] = 3.0
    assert bool((out[T:] == 3.0).all())


def test_cap_zero_turns_the_cache_off():
    code = ("import torch, pangu_ops\n"
            "x = torch.randn(4096, 256)\n"
            "ids = torch.randint(0, 8, (4096, 1))\n"
            "out = pangu_ops.permute(x, ids, 8)[0]\n"
            "del out\n"
            "print(pangu_ops.cpu_output_cache())\n")
    env = dict(os.environ, PANGU_OPS_CPU_OUTPUT_CACHE_MB="0", PANGU_OPS_BACKEND="cpu")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "'cached_bytes': 0" in res.stdout and "'reused': 0" in res.stdout and "'fresh': 1" in res.stdout
