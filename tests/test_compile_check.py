"""The Triton kernels compiled by Triton's real compiler for real GPUs, with no GPU here
(`pangu-ops compile-check`): a fast subset in CI (the first config of each list, every dtype and
mode, DeepSeek-V3-sized shapes); `pangu-ops compile-check` runs every autotune config and odd sizes.

Asserted per target: every variant compiles (sm_90, sm_80; gfx942 where this Triton's AMD backend
works), no config the launch code keeps needs more shared memory than the target has per block, the
kept 16-bit / TF32 GEMM configs do not spill, and they run on the matrix units (wgmma on sm_90,
mma.sync on sm_80, MFMA on gfx942). The compile runs in a subprocess: this process's Triton is in
interpreter mode (conftest)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import TRITON

pytest.importorskip("triton")
if TRITON != "triton":
    pytest.skip("triton-ascend: no CUDA/HIP targets", allow_module_level=True)

from pangu_ops.triton_kernels.compile_check import TARGETS, Result, occupancy, problems  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[Result]:
    out = tmp_path_factory.mktemp("compile_check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PANGU_OPS_CACHE"] = str(out / "cache")  # compile afresh: nothing stale is checked
    proc = subprocess.run([sys.executable, "-m", "pangu_ops.cli", "compile-check", "--configs", "first",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert (out / "compile_check.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [Result(**r) for r in json.loads((out / "compile_check.json").read_text())]


def _amd_works(results) -> bool:
    return any(r.ok for r in results if r.target == "gfx942")


def test_every_variant_compiles(results):
    for target in ("sm90", "sm80", "gfx942"):
        mine = [r for r in results if r.target == target]
        assert mine, f"no variant was compiled for {target}"
        if target == "gfx942" and not _amd_works(results):
            continue  # this Triton wheel's AMD backend does not run here (reported by the CLI)
        bad = [f"{r.kernel} {r.dtype} {r.mode} {r.config}: {r.error}" for r in mine if not r.ok]
        assert not bad, "\n".join(bad)


def test_kept_configs_fit_do_not_spill_and_use_the_matrix_units(results):
    checked = [r for r in results if r.target != "gfx942" or _amd_works(results)]
    found = problems(checked)
    assert not found, "\n".join(found)


def test_shared_memory_estimate_used_for_pruning_is_an_upper_bound(results):
    """The launch code prunes configs by `grouped_gemm.shared_bytes`: it must not under-estimate
    what the compiler allocates (or a kept config could be over the device's limit)."""
    import torch

    from pangu_ops.triton_kernels import compile_check as cc

    dtypes = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    configs = {cc._cfg_name(c): c for d in (torch.float32, torch.bfloat16) for p in ("ieee", "tf32")
               for c in cc.gg.gemm_config_list(d, False, p)}
    checked = 0
    for r in results:
        if r.ok and r.kernel.startswith("grouped_gemm") and r.config in configs:
            estimate = cc.gg.shared_bytes(configs[r.config], dtypes[r.dtype], r.mode.startswith("gated"),
                                          wgrad=r.kernel == "grouped_gemm_wgrad")
            assert r.shared <= estimate, f"{r.target} {r.dtype} {r.mode} {r.config}: {r.shared} B > {estimate} B"
            checked += 1
    assert checked


def test_occupancy():
    sm90 = TARGETS["sm90"]
    assert occupancy(sm90, 8, 255, 147456) == 1  # the gated 128x128 GEMM: one block per SM
    assert occupancy(sm90, 4, 128, 64 * 1024) == 3  # shared memory: 3 x 65 KiB of 228 KiB
    assert occupancy(sm90, 4, 64, 0) == 8  # registers: 64 x 128 threads -> 8 blocks of 65536
    assert occupancy(sm90, 4, None, 0) == 16  # warps only: 64 per SM
    assert occupancy(TARGETS["gfx942"], 4, 128, 32 * 1024) == 2  # 64 KiB of LDS
