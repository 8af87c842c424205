"""ExpertParallelDispatcher on gloo ranks: an expert-parallel expert MLP, forward and backward,
equals the single-process computation with the same weights; the hierarchical strategy gives
bitwise the flat strategy's results while sending fewer inter-node bytes; chunked overlap gives
the unchunked results; top-k up to 8; a rank with zero tokens; bad input."""
import pytest
import torch

import pangu_ops
from pangu_ops import verify
from pangu_ops.distributed import STRATEGIES, ExpertParallelDispatcher, Topology

from gloo import run_ranks

H, F_DIM = 64, 10  # H: rows large next to their routing metadata, as in real models


def _problem(rank: int, E: int, topk: int, dtype=torch.float32):
    """Rank r's tokens (rank 1 has none), routing and the global expert weights (same everywhere)."""
    gen = verify.generator(100 + rank)
    case = verify.Case(0 if rank == 1 else 9 + 3 * rank, H, F_DIM, E, topk, drop=0.1)
    ids, w = verify.routing(case, gen)
    x = verify.randn((case.tokens, H), dtype, gen)
    wgen = verify.generator(7)
    w_gate_up = verify.randn((E, H, 2 * F_DIM), dtype, wgen, scale=0.3)
    w_down = verify.randn((E, F_DIM, H), dtype, wgen, scale=0.3)
    return x, ids, w, w_gate_up, w_down


def _grad_out(rank: int, shape, dtype):
    return verify.randn(tuple(shape), dtype, verify.generator(200 + rank))


def _moe(x, ids, w, w_gate_up, w_down):
    """Single process: permute -> expert MLP -> unpermute."""
    E = w_gate_up.shape[0]
    x_sorted, sizes, index = pangu_ops.permute(x, ids, E)
    return pangu_ops.unpermute(pangu_ops.expert_mlp(x_sorted, w_gate_up, w_down, sizes), index, w, x.shape[0],
                               topk=ids.shape[1])


def _ep_rank(rank: int, ranks_per_node: int, E: int, topk: int, dtype, chunks: int):
    """Both strategies on the same inputs: outputs, gradients (x, weights, local experts), stats,
    and what dispatch delivered."""
    topo = Topology(ranks_per_node=ranks_per_node)
    x0, ids, w0, w_gate_up, w_down = _problem(rank, E, topk, dtype)
    out = {}
    for strategy in STRATEGIES:
        ep = ExpertParallelDispatcher(topo, E, strategy)
        lo, hi = ep.first_local_expert, ep.first_local_expert + ep.local_experts
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        gate_up = w_gate_up[lo:hi].clone().requires_grad_()
        down = w_down[lo:hi].clone().requires_grad_()
        delivered = ep.dispatch(x.detach(), ids, w.detach())[:2]
        ep.stats.clear()
        y = ep.run(x, ids, w, lambda xs, sizes: pangu_ops.expert_mlp(xs, gate_up, down, sizes), chunks=chunks)
        stats = {phase: dict(s) for phase, s in ep.stats.items()}
        y.backward(_grad_out(rank, y.shape, dtype))
        out[strategy] = dict(y=y.detach(), dx=x.grad, dw=w.grad, dgate_up=gate_up.grad, ddown=down.grad,
                             stats=stats, delivered=delivered)
    return out


@pytest.mark.parametrize("nodes, ranks_per_node, E, topk, dtype, chunks", [
    (2, 2, 8, 1, torch.float32, 1),
    (2, 2, 8, 8, torch.float32, 1),
    (2, 2, 8, 4, torch.bfloat16, 2),
    (2, 4, 16, 8, torch.float32, 3),
], ids=["2x2-top1", "2x2-top8", "2x2-top4-bf16-2chunks", "2x4-top8-3chunks"])
def test_expert_parallel(nodes, ranks_per_node, E, topk, dtype, chunks):
    world = nodes * ranks_per_node
    results = run_ranks(world, _ep_rank, ranks_per_node, E, topk, dtype, chunks)

    # hierarchical == flat, bitwise: delivered rows, outputs, every gradient
    for rank in range(world):
        flat, hier = results[rank]["flat"], results[rank]["hierarchical"]
        for a, b in zip(flat["delivered"], hier["delivered"]):
            assert torch.equal(a, b), f"rank {rank}: dispatch differs between strategies"
        for key in ("y", "dx", "dw", "dgate_up", "ddown"):
            assert torch.equal(flat[key], hier[key]), f"rank {rank}: {key} differs between strategies"

    # == the single-process MoE (within the dtype's rounding: the sums associate differently, and
    # the expert gradients sum all ranks' rows in one GEMM instead of rank by rank)
    def close(what, actual, expected, roundings):
        _, err, ok, why = verify.compare(what, actual.float(), expected.float(), dtype, roundings)
        assert ok, f"{what}: max error {err:g} {why}"

    grads_up, grads_down = torch.zeros(E, H, 2 * F_DIM), torch.zeros(E, F_DIM, H)
    for rank in range(world):
        x, ids, w, w_gate_up, w_down = _problem(rank, E, topk, dtype)
        for t in (x, w, w_gate_up, w_down):
            t.requires_grad_()
        y = _moe(x, ids, w, w_gate_up, w_down)
        y.backward(_grad_out(rank, y.shape, dtype))
        got = results[rank]["flat"]
        close(f"rank {rank} y", got["y"], y, 4)
        close(f"rank {rank} dx", got["dx"], x.grad, 6)
        close(f"rank {rank} dweights", got["dw"], w.grad, 6)
        grads_up += w_gate_up.grad.float()
        grads_down += w_down.grad.float()
        if rank == 1:
            assert got["y"].shape[0] == 0  # the rank with no tokens took part all the same
    per = E // world
    for rank in range(world):  # each rank's expert gradients sum every rank's tokens
        got = results[rank]["flat"]
        close(f"rank {rank} dw_gate_up", got["dgate_up"], grads_up[rank * per:(rank + 1) * per], 8)
        close(f"rank {rank} dw_down", got["ddown"], grads_down[rank * per:(rank + 1) * per], 8)

    # fewer inter-node bytes: a token crosses to a node once however many of its experts live there
    inter = {s: sum(results[r][s]["stats"]["dispatch"].get("inter_bytes", 0) for r in range(world))
             for s in STRATEGIES}
    assert inter["flat"] > 0
    if topk == 8:  # ~4 of a token's 8 experts on the other node: 1 row + metadata instead of 4
        assert 2 * inter["hierarchical"] <= inter["flat"], inter


def _bad_input_rank(rank: int):
    topo = Topology(ranks_per_node=1)
    ep = ExpertParallelDispatcher(topo, 4, "hierarchical")
    x = torch.randn(3, 5)
    errors = []
    for ids, w in [(torch.tensor([[0], [4], [1]]), None),         # id beyond the experts
                   (torch.tensor([[0], [-2], [1]]), None),        # negative but not -1
                   (torch.tensor([[0, 1], [1, 2]]), None),        # rows differ from x
                   (torch.tensor([[0], [1], [2]]), torch.ones(3, 2))]:  # weights shape
        with pytest.raises(ValueError) as err:
            ep.dispatch(x, ids, w)
        errors.append(str(err.value))
    with pytest.raises(ValueError, match="divisible"):
        ExpertParallelDispatcher(topo, 3)
    with pytest.raises(ValueError, match="strategy"):
        ExpertParallelDispatcher(topo, 4, "ring")
    return errors


def test_bad_input_is_named():
    errors = run_ranks(2, _bad_input_rank)[0]
    assert "expert_ids[1, 0] = 4" in errors[0] and "[0, 4)" in errors[0]
    assert "expert_ids[1, 0] = -2" in errors[1]
    assert "expert_ids" in errors[2] and "rows" in errors[2]
    assert "weights" in errors[3]


def _mismatch_rank(rank: int, strategy: str, mismatch: str):
    """Rank 3 of 4 (2 nodes x 2) differs from the others in one thing; every rank must raise a
    ValueError naming it and rank 3 (before: gloo aborted the receiving processes)."""
    odd = rank == 3
    try:
        topo = Topology(ranks_per_node=4 if odd and mismatch == "topology" else 2, timeout=20)
        ep = ExpertParallelDispatcher(topo, 8, strategy)
        hidden = H + 8 if odd and mismatch == "hidden" else H
        dtype = torch.bfloat16 if odd and mismatch == "dtype" else torch.float32
        topk = 3 if odd and mismatch == "topk" else 2
        x = torch.randn(6, hidden, dtype=dtype)
        ids = torch.randint(0, 8, (6, topk))
        if odd and mismatch == "expert id":
            ids[2, 1] = 8
        if mismatch == "output width":
            x_local, sizes, handle = ep.dispatch(x, ids, torch.rand(6, topk))
            ep.combine(x_local[:, :H - 4] if odd else x_local, handle)
        else:
            ep.dispatch(x, ids, torch.rand(6, topk))
    except ValueError as err:
        return str(err)
    return "no error"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mismatch, says", [
    ("hidden", f"hidden size (x.shape[1]): rank 3 has {H + 8}, the other ranks {H}"),
    ("dtype", "x dtype: rank 3 has bfloat16, the other ranks float32"),
    ("topk", "top-k (expert_ids.shape[1]): rank 3 has 3, the other ranks 2"),
    ("output width", f"output width (y_local.shape[1]): rank 3 has {H - 4}, the other ranks {H}"),
    ("topology", "ranks_per_node: rank 3 has 4, the other ranks 2"),
    ("expert id", "rank 3 rejected its input"),
])
def test_ranks_that_disagree_all_raise_a_clear_error(strategy, mismatch, says):
    if mismatch == "topology" and strategy == "hierarchical":
        pytest.skip("the Topology is built before the strategy matters")
    results = run_ranks(4, _mismatch_rank, strategy, mismatch)
    assert sorted(results) == [0, 1, 2, 3], "a rank died"
    for rank in range(3):
        assert says in results[rank], (rank, results[rank])
    assert says in results[3] or mismatch == "expert id", results[3]
    if mismatch == "expert id":  # rank 3 raises its own error
        assert "expert_ids[2, 1] = 8 is out of range" in results[3], results[3]
