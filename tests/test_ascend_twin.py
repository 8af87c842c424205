"""The AscendC kernels on the CPU twin of the AscendC API (every op x dtype x case runs through
the shared reference tests, `ascend_twin` being a required backend). Here: shapes that cross the
kernels' tile boundaries (grouped GEMM remainders of 128 x 256 tiles, rows longer than one UB
tile, more blocks than items), and that the twin rejects what real hardware faults on."""
import subprocess
import textwrap

import pytest
import torch

import pangu_ops
from pangu_ops import verify
from pangu_ops.backends import ascend


@pytest.mark.parametrize("blocks", [1, 3, 40])
def test_tile_remainders_and_block_counts(monkeypatch, blocks):
    twin = ascend.Kernels(ascend.TwinRunner(ascend.build_twin(), blocks))
    gen = verify.generator(blocks)
    sizes = torch.tensor([0, 300, 1, 129])  # an empty expert, m tiles with remainders
    x = verify.randn((int(sizes.sum()), 24), torch.bfloat16, gen)
    w = verify.randn((4, 24, 520), torch.bfloat16, gen)  # n: two full 256 tiles and 8
    torch.testing.assert_close(twin.grouped_gemm(x, w, sizes, False), pangu_ops.reference.grouped_gemm(x, w, sizes, False),
                               rtol=1.6e-2, atol=1e-2)
    dy = verify.randn((int(sizes.sum()), 520), torch.bfloat16, gen)
    torch.testing.assert_close(twin.grouped_gemm_wgrad(x, dy, sizes), pangu_ops.reference.grouped_gemm_wgrad(x, dy, sizes),
                               rtol=1.6e-2, atol=1e-2)
    # rows of 5000 fp32 (20000 bytes: one full 16 KiB UB tile and an unaligned rest), 3 tokens
    xr = verify.randn((3, 5000), torch.float32, gen)
    ids = torch.tensor([[1, 0], [-1, 1], [0, -1]])
    got, want = twin.permute(xr, ids, 2), pangu_ops.reference.permute(xr, ids, 2)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    weights = torch.rand(3, 2)
    torch.testing.assert_close(twin.unpermute(got[0], got[2], weights, 3, 2),
                               pangu_ops.reference.unpermute(want[0], want[2], weights, 3, 2), rtol=1e-6, atol=1e-6)


MISUSE = {
    "unaligned DataCopy": "LocalTensor<float> t = q.AllocTensor<float>(); DataCopy(t, g, 7);",
    "over-full UB": "TBuf<TPosition::VECCALC> big; pipe.InitBuffer(big, 200 * 1024);",
    "AllocTensor without FreeTensor": "q.AllocTensor<float>(); q.AllocTensor<float>(); q.AllocTensor<float>();",
    "EnQue beyond the depth": "auto a = q.AllocTensor<float>(); auto b = q.AllocTensor<float>(); q.EnQue(a); q.EnQue(b);",
    "DeQue of an empty queue": "q.DeQue<float>();",
    "access beyond a LocalTensor": "LocalTensor<float> t = q.AllocTensor<float>(); t.SetValue(64, 1.0f);",
}


@pytest.mark.parametrize("misuse", list(MISUSE))
def test_twin_rejects_what_hardware_faults_on(tmp_path, misuse):
    src = tmp_path / "bad.cpp"
    src.write_text(textwrap.dedent(f"""
        #include "kernel_operator.h"
        using namespace AscendC;
        int main() {{
            static float gm[64];
            GlobalTensor<float> g; g.SetGlobalBuffer(gm, 64);
            TPipe pipe; TQue<TPosition::VECIN, 1> q; pipe.InitBuffer(q, 2, 64 * sizeof(float));
            {MISUSE[misuse]}
            return 0;
        }}"""))
    exe = tmp_path / "bad"
    subprocess.run(["g++", "-std=c++17", f"-I{ascend.kernel_dir() / 'cpu_twin'}", str(src), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode != 0 and "AscendC CPU twin:" in run.stderr, (misuse, run.stderr)
