"""The `pangu-ops` command: info, verify (exit codes), bench (table, JSON, PNG)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from pangu_ops import backends, cli

from conftest import DEVICE


def test_info_lists_backends_and_reasons(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference" in out and "cpu" in out
    assert "why:" in out  # the unavailable backends say why


def test_verify_passes_and_prints_table(capsys):
    assert cli.main(["verify", "--op", "permute", "--dtype", "bfloat16", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "permute" in out and "pass" in out and " 0 failed" in out


def test_verify_lists_adamw_experts_with_every_backend_that_serves_it(capsys):
    """The host optimizer is an op like the others: verified on reference and cpu, and skipped
    (not failed) on the backends without a kernel for it."""
    assert cli.main(["verify", "--op", "adamw_experts", "--dtype", "float32", "--device", "cpu"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("adamw_experts")]
    assert {row[1] for row in rows} == {"reference", "cpu"} and all(row[-1] == "pass" for row in rows)


def test_verify_exits_1_on_failure(monkeypatch, capsys):
    from pangu_ops import verify

    def broken(dtype, case, gen, device):
        yield "forced", 1.0, False, "broken on purpose"

    monkeypatch.setitem(verify.CHECKS, "permute", broken)
    assert cli.main(["verify", "--op", "permute", "--dtype", "float32", "--backend", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_writes_table_json_png(tmp_path, capsys):
    out_dir = tmp_path / "bench"
    cli.main(["bench", "--tokens", "64", "--hidden", "32", "--ffn", "16", "--experts", "4", "--topk", "2",
              "--dtype", "float32", "bfloat16", "--out", str(out_dir), "--min-time", "0.01", "--device", DEVICE])
    captured = capsys.readouterr()
    assert "grouped_gemm" in captured.out and "memcpy" in captured.out
    assert "[float32 1/" in captured.err and "round 1 of" in captured.err  # progress lines
    data = json.loads((out_dir / "bench.json").read_text())
    kinds = {r["kind"] for r in data["rows"]}
    assert {"kernel", "reference", "limit"} <= kinds
    auto = backends.AUTO_BY_DEVICE[torch.device(DEVICE).type]  # the backend the device's tensors get
    gemm = [r for r in data["rows"] if r["op"] == "grouped_gemm" and r["impl"] == auto]
    assert gemm and all(r["rate"] > 0 and r["fraction_of_limit"] > 0 for r in gemm)
    assert (out_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "grouped_gemm" in (out_dir / "bench.txt").read_text()


def test_bench_refuses_a_preset_the_gpu_cannot_hold(monkeypatch):
    """Before allocating anything: the DeepSeek preset in fp32 (~111 GiB) on a GPU with 78 GiB free
    is refused with the sizes named; bf16 (~55 GiB) fits. (The GPU's free memory is stood in for.)"""
    from pangu_ops.benchmarks import ops as bench_ops
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (78 * 2**30, 80 * 2**30))
    deepseek, cuda = bench_ops.PRESETS["deepseek"], torch.device("cuda")
    bench_ops.check_device_memory(deepseek, [torch.bfloat16], cuda)
    with pytest.raises(SystemExit, match=r"float32 needs about 111.0 GiB of GPU memory; 78.0 GiB are free"):
        bench_ops.check_device_memory(deepseek, [torch.bfloat16, torch.float32], cuda)


def test_console_script_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "pangu-ops")
    if not os.path.exists(exe):
        pytest.skip("console script not installed (package not pip-installed)")
    res = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "backends:" in res.stdout


def test_bench_distributed_reports_inter_node_bytes(tmp_path, capsys):
    """8 local gloo ranks as 2 nodes x 4, top-8 of 16 experts: the table and files, and the
    hierarchical strategy's inter-node bytes at most half the flat strategy's."""
    out_dir = tmp_path / "dist"
    cli.main(["bench", "--distributed", "--tokens", "24", "--hidden", "64", "--ffn", "16", "--experts", "16",
              "--topk", "8", "--chunks", "2", "--iters", "1", "--dtype", "float32", "--out", str(out_dir)])
    text = capsys.readouterr().out
    assert "hierarchical vs flat" in text and "inter MB" in text
    data = json.loads((out_dir / "bench_distributed.json").read_text())
    flat, hier = (data["results"][s]["per_rank"] for s in ("flat", "hierarchical"))
    assert 0 < 2 * hier["inter_bytes"] <= flat["inter_bytes"]
    assert hier["inter_messages"] < flat["inter_messages"]
    assert (out_dir / "bench_distributed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_routing_goes_with_hf():
    with pytest.raises(SystemExit, match="--routing goes with --hf"):
        cli.main(["bench", "--routing", "cold"])
    for wrong in (["--rounds", "3"], ["--hf", "--rounds", "0"]):
        with pytest.raises(SystemExit, match="--rounds goes with --hf"):
            cli.main(["bench", *wrong])


def test_bench_hf_writes_table_json_png(tmp_path, capsys):
    """Decode rows with the cold routing (each call's experts new since its last turn) through the
    real blocks, their limits read both ways; --routing picks the routings."""
    pytest.importorskip("transformers", minversion="5.0")
    out_dir = tmp_path / "hf"
    cli.main(["bench", "--hf", "--tokens", "2", "--dtype", "float32", "--routing", "cold", "--out", str(out_dir),
              "--min-time", "0.01", "--rounds", "2"])
    assert "pangu_ops" in capsys.readouterr().out
    rows = json.loads((out_dir / "bench_hf.json").read_text())["rows"]
    assert {len(r["rounds_ms"]) for r in rows} <= {2, 4}  # (4: a group timed again)
    assert {"pangu_ops", "eager", "grouped_mm", "weight reading", "weight reading, prefetched", "FMA peak"} <= {
        r["impl"] for r in rows}
    assert {r["routing"] for r in rows} == {"cold"} and {r["block"] for r in rows} == {"mixtral-shaped",
                                                                                        "qwen3-moe-shaped"}
    assert (out_dir / "bench_hf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rebalance_balances_the_skewed_layer(tmp_path, capsys):
    """4 local gloo ranks as 2 nodes x 2, Zipf-skewed top-4 of 16 experts, 20 physical: the table,
    the JSON's "rebalance" object and the plot; the planned placement evens the rows per rank."""
    out_dir = tmp_path / "rb"
    cli.main(["bench", "--distributed", "--rebalance", "--nodes", "2", "--ranks-per-node", "2", "--tokens", "64",
              "--hidden", "32", "--ffn", "16", "--experts", "16", "--physical", "20", "--topk", "4", "--skew", "1.4",
              "--layers", "1", "--iters", "1", "--dtype", "float32", "--out", str(out_dir)])
    assert "max/mean rows per rank" in capsys.readouterr().out
    r = json.loads((out_dir / "bench_rebalance.json").read_text())["rebalance"]
    assert {"max_over_mean_before", "max_over_mean_after", "critical_ms_before", "critical_ms_after", "step_ms_before",
            "step_ms_after", "bytes_moved", "plan_ms"} <= set(r)
    assert r["max_over_mean_after"] < r["max_over_mean_before"] and r["bytes_moved"] > 0
    assert (out_dir / "bench_rebalance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
