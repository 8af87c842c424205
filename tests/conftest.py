import os

# Triton reads TRITON_INTERPRET when @triton.jit runs: set it before anything imports pangu_ops,
# so Triton kernels (where the Triton backend is present) run on CPU tensors in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pangu_ops import backends, verify  # noqa: E402

# The backends every machine must have: a CPU build without its C++ extension fails here rather
# than silently testing the reference alone.
REQUIRED_BACKENDS = ("reference", "cpu")
BACKENDS = list(REQUIRED_BACKENDS) + [b for b in verify.available_backends() if b not in REQUIRED_BACKENDS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def failures(results: list[verify.Result]) -> str:
    return "\n".join(f"{r.case}: {r.check}: max err {r.max_err:.3g} {r.detail}" for r in results if not r.ok)


def assert_all_pass(results: list[verify.Result]) -> None:
    assert results, "no check ran"
    bad = failures(results)
    assert not bad, bad


def reason(name: str) -> str | None:
    return backends.status()[name]
