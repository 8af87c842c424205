"""The EP-group balance loss over gloo ranks equals the micro-batch loss of all ranks' tokens
pooled (it balances what the group receives), and its gradient reaches every rank's router."""
import pytest
import torch
import torch.distributed as dist

from pangu_ops import routing

from gloo import run_ranks

WORLD = 2


def _inputs(rank: int):
    gen = torch.Generator().manual_seed(rank)
    logits = torch.randn(8 + 4 * rank, 5, generator=gen)  # ranks with different token counts
    return logits, routing.topk_route(logits, 2)[1]


def _worker(rank: int):
    logits, ids = _inputs(rank)
    logits.requires_grad_()
    loss = routing.load_balancing_loss(logits.softmax(-1), ids, alpha=0.1, group=dist.group.WORLD)
    loss.backward()
    return loss.item(), logits.grad.clone()


def test_ep_group_loss_pools_the_group():
    results = run_ranks(WORLD, _worker)
    pooled_logits = torch.cat([_inputs(r)[0] for r in range(WORLD)]).requires_grad_()
    pooled_ids = torch.cat([_inputs(r)[1] for r in range(WORLD)])
    expected = routing.load_balancing_loss(pooled_logits.softmax(-1), pooled_ids, alpha=0.1)
    expected.backward()
    rows = [0, 8, 20]
    for r in range(WORLD):
        loss, grad = results[r]
        assert loss == pytest.approx(expected.item(), rel=1e-6)
        torch.testing.assert_close(grad, pooled_logits.grad[rows[r]:rows[r + 1]], rtol=1e-5, atol=1e-7)
    assert all(results[r][1].abs().sum() > 0 for r in range(WORLD))


def test_one_rank_group_equals_micro_batch_loss():
    """With no group (one rank) the loss is the classic micro-batch loss."""
    logits, ids = _inputs(0)
    probs = logits.softmax(-1)
    f = torch.bincount(ids.flatten(), minlength=5).float() / ids.numel()
    torch.testing.assert_close(routing.load_balancing_loss(probs, ids, alpha=0.1), 0.1 * 5 * (f * probs.mean(0)).sum())
