"""permute against the reference: values bit-exact, gradients within the dtype's tolerance."""
import pytest
import torch

import pangu_ops
from pangu_ops import reference, verify

from conftest import BACKENDS, large_outputs_test, reference_test


test_matches_reference = reference_test("permute")

test_large_outputs_match_reference = large_outputs_test("permute")


@pytest.mark.parametrize("backend", BACKENDS)
def test_contract_order_and_sizes(backend):
    """Rows grouped by expert ascending, token-then-slot order inside an expert, drops skipped."""
    x = torch.randn(5, 3)
    ids = torch.tensor([[2, 0], [0, -1], [2, 1], [-1, -1], [0, 2]])
    with pangu_ops.use_backend(backend):
        x_sorted, sizes, index = pangu_ops.permute(x, ids, 4)
    assert index.tolist() == [1, 2, 8, 5, 0, 4, 9]
    assert sizes.tolist() == [3, 1, 3, 0]
    assert torch.equal(x_sorted, x[index // 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_chunks_stay_stable(backend):
    """Enough slots that the C++ kernel splits them across threads: order must not change."""
    torch.set_num_threads(2)
    case = verify.Case(5000, 8, 8, 7, 3, drop=0.05, empty=1)
    ids, _ = verify.routing(case, verify.generator(3))
    x = torch.randn(case.tokens, case.hidden)
    with pangu_ops.use_backend(backend):
        got = pangu_ops.permute(x, ids, case.experts)
    for a, b in zip(got, reference.permute(x, ids, case.experts)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_dropped(backend):
    x = torch.randn(3, 4)
    with pangu_ops.use_backend(backend):
        x_sorted, sizes, index = pangu_ops.permute(x, torch.full((3, 2), -1), 5)
    assert x_sorted.shape == (0, 4) and index.shape == (0,) and sizes.tolist() == [0] * 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_expert_round_trip(backend):
    """Megatron's check: combine(dispatch(x)) == x * (sum of the kept weights)."""
    case = verify.Case(64, 40, 40, 6, 3, drop=0.2)
    gen = verify.generator(5)
    ids, w = verify.routing(case, gen)
    x = verify.randn((case.tokens, case.hidden), torch.float32, gen)
    with pangu_ops.use_backend(backend):
        x_sorted, _, index = pangu_ops.permute(x, ids, case.experts)
        y = pangu_ops.unpermute(x_sorted, index, w)
    kept = (w * (ids >= 0)).sum(1, keepdim=True)
    torch.testing.assert_close(y, x * kept, **verify.TOLERANCES[torch.float32])
