"""rre_dispatch (route-table lookup fused into permute) against the reference and the two-step
rre_route + permute."""
import pytest
import torch

import pangu_ops
from pangu_ops import routing

from conftest import BACKENDS, DEVICE, reference_test

test_matches_reference = reference_test("rre_dispatch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_route_then_permute(backend):
    table = routing.rre_route_table(40, 12, 3, seed=7, layer=2).to(DEVICE)
    token_ids, domain_ids = torch.randint(0, 40, (4, 9)), torch.tensor([2, 0, 2, 1])
    x = torch.randn(36, 10)
    with pangu_ops.use_backend(backend):
        fused = pangu_ops.rre_dispatch(x, token_ids, domain_ids, table, 12)
        two_step = pangu_ops.permute(x, routing.rre_route(token_ids, domain_ids, table).reshape(-1, 1), 12)
    for a, b in zip(fused, two_step):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad, message", [
    ("domain", r"domain_ids\[1\] = 3 is out of range \[0, num_domains=3\)"),
    ("token", r"token_ids\[0, 2\] = 40 is out of range \[0, vocab_size=40\)"),
])
def test_bad_ids(backend, bad, message):
    table = routing.rre_route_table(40, 12, 3, seed=7, layer=2).to(DEVICE)
    token_ids, domain_ids = torch.randint(0, 40, (2, 5)), torch.tensor([0, 1])
    if bad == "domain":
        domain_ids[1] = 3
    else:
        token_ids[0, 2] = 40
    with pangu_ops.use_backend(backend), pytest.raises(ValueError, match=message):
        pangu_ops.rre_dispatch(torch.randn(10, 4), token_ids, domain_ids, table, 12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3])
def test_many_experts_lookup_blocks(backend, k):
    """256 experts: the Triton lookup takes its smaller slot blocks there (permute.block_slots)."""
    table = routing.rre_route_table(500, 256, 2, seed=3, layer=1).to(DEVICE)
    if k > 1:
        table = torch.stack([table] + [(table + j) % 256 for j in range(1, k)], dim=-1)
    token_ids, domain_ids = torch.randint(0, 500, (3, 31)), torch.tensor([1, 0, 1])
    x = torch.randn(93, 24)
    with pangu_ops.use_backend(backend):
        got = pangu_ops.rre_dispatch(x, token_ids, domain_ids, table, 256)
    want = pangu_ops.reference.rre_dispatch(x, token_ids, domain_ids, table, 256)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
