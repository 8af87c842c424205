"""ExpertParallelDispatcher on gloo ranks: an expert-parallel expert MLP, forward and backward,
equals the single-process computation with the same weights (flat and hierarchical; top-k up to
8; a rank with zero tokens)."""
import pytest
import torch

import pangu_ops
from pangu_ops import verify
from pangu_ops.distributed import ExpertParallelDispatcher, Topology

from gloo import run_ranks

E, H, F_DIM = 8, 12, 10


def _problem(rank: int, topk: int):
    """Rank r's tokens (rank 1 has none), routing and the global expert weights (same everywhere)."""
    gen = verify.generator(100 + rank)
    case = verify.Case(0 if rank == 1 else 9 + 3 * rank, H, F_DIM, E, topk, drop=0.1)
    ids, w = verify.routing(case, gen)
    x = verify.randn((case.tokens, H), torch.float32, gen)
    wgen = verify.generator(7)
    w_gate_up = verify.randn((E, H, 2 * F_DIM), torch.float32, wgen, scale=0.3)
    w_down = verify.randn((E, F_DIM, H), torch.float32, wgen, scale=0.3)
    return x, ids, w, w_gate_up, w_down


def _moe(x, ids, w, w_gate_up, w_down):
    """Single process: permute -> expert MLP -> unpermute."""
    x_sorted, sizes, index = pangu_ops.permute(x, ids, E)
    return pangu_ops.unpermute(pangu_ops.expert_mlp(x_sorted, w_gate_up, w_down, sizes), index, w, x.shape[0],
                               topk=ids.shape[1])


def _ep_rank(rank: int, ranks_per_node: int, strategy: str, topk: int):
    topo = Topology(ranks_per_node=ranks_per_node)
    ep = ExpertParallelDispatcher(topo, E, strategy)
    x, ids, w, w_gate_up, w_down = _problem(rank, topk)
    lo, hi = ep.first_local_expert, ep.first_local_expert + ep.local_experts
    x = x.requires_grad_()
    local_gate_up = w_gate_up[lo:hi].clone().requires_grad_()
    local_down = w_down[lo:hi].clone().requires_grad_()
    x_local, sizes, handle = ep.dispatch(x, ids, w)
    y = ep.combine(pangu_ops.expert_mlp(x_local, local_gate_up, local_down, sizes), handle)
    g = verify.randn(tuple(y.shape), torch.float32, verify.generator(200 + rank))
    y.backward(g)
    return y.detach(), x.grad, local_gate_up.grad, local_down.grad, dict(ep.stats)


@pytest.mark.parametrize("strategy", ["flat", "hierarchical"])
@pytest.mark.parametrize("topk", [2, 8])
def test_expert_parallel_equals_single_process(strategy, topk):
    world, ranks_per_node = 4, 2
    results = run_ranks(world, _ep_rank, ranks_per_node, strategy, topk)
    grads_up, grads_down = torch.zeros(E, H, 2 * F_DIM), torch.zeros(E, F_DIM, H)
    for rank in range(world):
        x, ids, w, w_gate_up, w_down = _problem(rank, topk)
        x.requires_grad_()
        w_gate_up.requires_grad_()
        w_down.requires_grad_()
        y = _moe(x, ids, w, w_gate_up, w_down)
        y.backward(verify.randn(tuple(y.shape), torch.float32, verify.generator(200 + rank)))
        got_y, got_dx, _, _, stats = results[rank]
        tol = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_y, y.detach(), **tol)
        torch.testing.assert_close(got_dx, x.grad, **tol)
        grads_up += w_gate_up.grad
        grads_down += w_down.grad
        if rank == 1:
            assert got_y.shape[0] == 0  # the rank with no tokens took part all the same
    per = E // world
    for rank in range(world):  # each rank's expert gradients sum every rank's tokens
        torch.testing.assert_close(results[rank][2], grads_up[rank * per:(rank + 1) * per], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[rank][3], grads_down[rank * per:(rank + 1) * per], rtol=1e-5, atol=1e-5)
    assert sum(results[r][4]["inter_bytes"] for r in range(world)) > 0
