"""pytest-benchmark view of the same microbenchmarks (`pytest benchmarks/ --benchmark-only`).

The suite and its baselines live in `ops.py`; this file only hands its entries to pytest-benchmark
for its statistics, comparisons between saved runs (`--benchmark-autosave`, `--benchmark-compare`)
and histograms. Never part of the unit tests: timing does not pass or fail anything.
"""
import pytest
import torch

from pangu_ops import verify
from pangu_ops.benchmarks.ops import Problem, entries

PROBLEM = Problem()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in verify.available_backends(DEVICE) if b != "reference"]
CASES = [(dtype, e) for dtype in (torch.float32, torch.bfloat16) for e in entries(PROBLEM, dtype, DEVICE, BACKENDS)]


@pytest.mark.parametrize("dtype, entry", CASES, ids=[f"{e.op}-{str(d)[6:]}-{e.impl}" for d, e in CASES])
def test_bench(benchmark, dtype, entry):
    benchmark.extra_info.update(op=entry.op, impl=entry.impl, work=entry.work, unit=entry.unit)
    benchmark(entry.fn)
