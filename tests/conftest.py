import importlib.util
import os
from pathlib import Path

# The device the reference checks run on: cpu (CI), or cuda on a GPU machine
# (`PANGU_OPS_TEST_DEVICE=cuda pytest tests`): the same tests, unchanged.
DEVICE = os.environ.get("PANGU_OPS_TEST_DEVICE", "cpu")
# In an environment with triton-ascend instead of upstream Triton (README: Ascend NPUs), the Triton
# kernels run through the Ascend compiler: triton_ascend replaces triton.
# (Looked up without importing triton, which must not happen before TRITON_INTERPRET is set.)
_triton = importlib.util.find_spec("triton")
_ascend = _triton is not None and any((Path(p) / "backends" / "ascend").is_dir() for p in _triton.submodule_search_locations)
TRITON = "triton_ascend" if _ascend else "triton"
# Triton reads TRITON_INTERPRET when @triton.jit runs: set it before anything imports pangu_ops,
# so on CPU the Triton kernels run on CPU tensors in Triton's interpreter.
if DEVICE == "cpu" and TRITON == "triton":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU: values are what the tests check, not speed: one config per GEMM, no autotune timing;
# and the value checks (a host sync each, off by default there) on, as the error tests expect them.
os.environ.setdefault("PANGU_OPS_TRITON_AUTOTUNE", "0")
if DEVICE != "cpu":
    os.environ.setdefault("PANGU_OPS_CHECK_VALUES", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pangu_ops import backends, verify  # noqa: E402

# The backends every test machine must have (the README's set-up installs them): a build without
# its C++ extension, or without Triton, fails here rather than silently testing fewer backends.
REQUIRED_BACKENDS = ("reference", "cpu", TRITON, "ascend_twin") if DEVICE == "cpu" else ("reference", "triton")
BACKENDS = list(REQUIRED_BACKENDS) + [b for b in verify.available_backends(DEVICE) if b not in REQUIRED_BACKENDS]


@pytest.fixture(autouse=True)
def _seed_and_device():
    torch.manual_seed(1234)
    with torch.device(DEVICE):  # tensors the tests make inline land on the device under test
        yield


@pytest.fixture
def on_the_cpu():
    """For tests of host code (the C++ kernels' pool, the host optimizer, the cost model, the
    placement planner): their tensors on the CPU whatever the device under test. Use as
    `pytestmark = pytest.mark.usefixtures("on_the_cpu")`."""
    with torch.device("cpu"):
        yield


@pytest.fixture(params=["fma", "pairs"])
def bf16_dots(request):
    """The CPU backend's few-row bf16 dot products forced onto fp32 FMAs, then onto VDPBF16PS pairs
    (skipped where the build has no AVX512-BF16), whatever this CPU's probe chose: both kernels
    checked on any CPU that runs both."""
    from pangu_ops.backends import cpu as cpu_backend
    if request.param == "pairs" and not cpu_backend.has_avx512_bf16():
        pytest.skip("the VDPBF16PS dot kernels need a build with AVX512-BF16")
    if not cpu_backend.has_avx512_bf16():
        yield  # the FMA kernels are the only ones
        return
    with cpu_backend.bf16_pair_dots_forced(request.param == "pairs"):
        yield


@pytest.fixture(params=["halves", "full"])
def dots_tuning(request):
    """The CPU backend's few-row dot kernels and its VDPBF16PS kernels on prepacked weights as tuned
    for 512-bit FMAs run as two halves (AMD Zen 4), then at full width (Zen 5, Xeons), whatever this
    CPU's probe chose (`full_width_512`): the software prefetch and stream (block) counts of both
    checked on any CPU with AVX-512."""
    from pangu_ops.backends import cpu as cpu_backend
    with cpu_backend.full_width_512_forced(request.param == "full"):
        yield


def failures(results: list[verify.Result]) -> str:
    return "\n".join(f"{r.case}: {r.check}: max err {r.max_err:.3g} {r.detail}" for r in results if not r.ok)


def assert_all_pass(results: list[verify.Result]) -> None:
    assert results, "no check ran"
    bad = failures(results)
    assert not bad, bad


def reason(name: str) -> str | None:
    return backends.status()[name]


def serving(op: str) -> list[str]:
    """The backends under test that have a kernel for `op` (all of them but for host-only ops)."""
    return [b for b in BACKENDS if backends.serves(b, op)]


def reference_test(op: str):
    """The test every op file has: `op` on every backend x dtype x case matches the reference
    (values and gradients). Use as `test_matches_reference = reference_test("permute")`."""

    @pytest.mark.parametrize("case", verify.CASES, ids=str)
    @pytest.mark.parametrize("dtype", verify.DTYPES, ids=str)
    @pytest.mark.parametrize("backend", serving(op))
    def test_matches_reference(backend, dtype, case):
        assert_all_pass(verify.check(op, backend, dtype, case, device=DEVICE))

    return test_matches_reference


def large_outputs_test(op: str):
    """For the data-movement ops: `op` on the CPU with outputs above 1 MiB, which its C++ kernel
    writes with non-temporal stores, against the reference (values and gradients): rows of whole
    64-byte lines (1024 bf16, 512 fp32) and rows starting anywhere in a line (771 fp32, 770 bf16)."""

    @pytest.mark.parametrize("dtype, width", [(torch.bfloat16, 1024), (torch.float32, 512), (torch.float32, 771),
                                              (torch.bfloat16, 770)], ids=str)
    def test_large_outputs_match_reference(dtype, width):
        pytest.importorskip("pangu_ops._C")
        case = verify.Case(700, width, width, 6, 2, drop=0.1, empty=1)
        assert_all_pass(verify.check(op, "cpu", dtype, case, device="cpu"))

    return test_large_outputs_match_reference
