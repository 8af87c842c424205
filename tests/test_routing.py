"""Routing: RRE tables (balance, determinism, independence), rre_route, top-k, capacity, losses."""
import pytest
import torch

from pangu_ops import routing


def test_rre_table_is_balanced_per_domain():
    table = routing.rre_route_table(1003, 12, 3, seed=1, layer=0)
    assert table.shape == (3, 1003) and table.dtype == torch.int64
    for d in range(3):
        counts = torch.bincount(table[d] - 4 * d, minlength=4)
        assert int(table[d].min()) == 4 * d and int(table[d].max()) == 4 * d + 3  # the domain's own experts
        assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == 1003


def test_rre_table_reproducible_and_independent():
    a = routing.rre_route_table(500, 8, 2, seed=3, layer=5)
    assert torch.equal(a, routing.rre_route_table(500, 8, 2, seed=3, layer=5))
    assert not torch.equal(a, routing.rre_route_table(500, 8, 2, seed=3, layer=6))  # per layer
    assert not torch.equal(a, routing.rre_route_table(500, 8, 2, seed=4, layer=5))  # per seed
    assert not torch.equal(a[0], a[1] - 4)  # per domain


def test_rre_table_rejects_indivisible_experts():
    with pytest.raises(ValueError, match="divisible"):
        routing.rre_route_table(100, 10, 3, seed=0, layer=0)


def test_rre_route_and_required_experts():
    table = routing.rre_route_table(30, 6, 2, seed=0, layer=0)
    tokens, domains = torch.tensor([[1, 2, 3], [4, 5, 1]]), torch.tensor([1, 0])
    routed = routing.rre_route(tokens, domains, table)
    assert torch.equal(routed, torch.stack([table[1, tokens[0]], table[0, tokens[1]]]))
    assert torch.equal(routing.required_experts(tokens, domains, table), torch.unique(routed))
    with pytest.raises(ValueError, match=r"domain_ids\[0\] = 2 is out of range"):
        routing.rre_route(tokens, torch.tensor([2, 0]), table)
    with pytest.raises(ValueError, match=r"token_ids\[1, 2\] = 30 is out of range"):
        routing.rre_route(torch.tensor([[1, 2, 3], [4, 5, 30]]), domains, table)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_topk_route(score):
    logits = torch.randn(10, 6)
    weights, ids, probs = routing.topk_route(logits, 3, score=score, scaling=2.5)
    expected = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    torch.testing.assert_close(probs, expected)
    assert torch.equal(ids, expected.topk(3, -1).indices)
    torch.testing.assert_close(weights.sum(-1), torch.full((10,), 2.5))
    with pytest.raises(ValueError, match="k .7. must be at most"):
        routing.topk_route(logits, 7)


def test_capacity_drops_overflow_in_token_order():
    ids = torch.tensor([[0, 1], [0, 2], [0, -1], [1, 0]])
    kept = routing.apply_capacity(ids, 3, capacity=2)
    assert kept.tolist() == [[0, 1], [0, 2], [-1, -1], [1, -1]]


def test_balance_loss_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    ids = torch.tensor([[0, 1], [1, 2]])
    f = torch.tensor([1, 2, 1]) / 4.0
    P = probs.mean(0)
    loss = routing.load_balancing_loss(probs, ids, alpha=0.5)
    torch.testing.assert_close(loss, 0.5 * 3 * (f * P).sum())
    # uniform routing and probabilities give exactly alpha
    uniform = routing.load_balancing_loss(torch.full((6, 3), 1 / 3), torch.tensor([[0], [1], [2]] * 2), alpha=0.01)
    torch.testing.assert_close(uniform, torch.tensor(0.01))
