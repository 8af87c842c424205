"""Expert-parallel MoE layers on gloo ranks: MoEFeedForward (top-k, hierarchical, overlapped
chunks) and the RRE layer (each domain's tokens stay in its group of ranks) equal the
single-process layers with the same weights, forward and backward; a rank that dies or hangs
makes the others raise a CommunicationError within the topology's timeout."""
import os
import time

import pytest
import torch

from pangu_ops import verify
from pangu_ops.distributed import CommunicationError, ExpertParallelDispatcher, Topology
from pangu_ops.nn import MoEFeedForward, RREMoE

from gloo import run_ranks

H, F_DIM, E, VOCAB = 32, 16, 8, 50
TOPK = dict(router="topk", topk=4, score="sigmoid", routed_scaling=2.5, num_shared_experts=1, aux_loss_alpha=0.0)


def _full_layer(kind: str) -> MoEFeedForward:
    torch.manual_seed(0)
    if kind == "rre":
        return RREMoE(H, F_DIM, E, num_domains=2, vocab_size=VOCAB, seed=3)
    return MoEFeedForward(H, F_DIM, E, **TOPK)


def _inputs(rank: int, kind: str):
    gen = verify.generator(50 + rank)
    tokens = 0 if rank == 2 else 5 + 2 * rank
    x = verify.randn((tokens, H), torch.float32, gen)
    token_ids = torch.randint(0, VOCAB, (1, tokens), generator=gen)
    domain_ids = torch.tensor([rank // 2])  # RRE: ranks 0-1 serve domain 0, ranks 2-3 domain 1
    return x, dict(token_ids=token_ids, domain_ids=domain_ids) if kind == "rre" else {}


def _ep_layer_rank(rank: int, kind: str):
    topo = Topology(ranks_per_node=2)
    full = _full_layer(kind)
    if kind == "rre":  # one domain per node: its 4 experts on its 2 ranks
        ep = ExpertParallelDispatcher(topo.split(2), E // 2, "hierarchical", first_expert=(rank // 2) * (E // 2))
        layer = RREMoE(H, F_DIM, E, num_domains=2, vocab_size=VOCAB, seed=3, dispatcher=ep)
    else:
        ep = ExpertParallelDispatcher(topo, E, "hierarchical")
        layer = MoEFeedForward(H, F_DIM, E, **TOPK, dispatcher=ep, ep_chunks=2)
    lo, hi = layer.expert_range
    state = {k: (v[lo:hi] if k in ("w_gate_up", "w_down") else v) for k, v in full.state_dict().items()}
    layer.load_state_dict(state)
    x, extra = _inputs(rank, kind)
    x.requires_grad_()
    y, _ = layer(x, **extra)
    y.backward(verify.randn(tuple(y.shape), torch.float32, verify.generator(90 + rank)))
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, (lo, hi), dict(ep.stats)


@pytest.mark.parametrize("kind", ["topk", "rre"])
def test_expert_parallel_layer_equals_single_process(kind):
    world = 4
    results = run_ranks(world, _ep_layer_rank, kind)
    full = _full_layer(kind)
    for rank in range(world):
        x, extra = _inputs(rank, kind)
        x.requires_grad_()
        y, _ = full(x, **extra)
        y.backward(verify.randn(tuple(y.shape), torch.float32, verify.generator(90 + rank)))
        got_y, got_dx, _, _, _ = results[rank]
        torch.testing.assert_close(got_y, y.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_dx, x.grad, rtol=1e-5, atol=1e-5)
    # full.* grads now sum every rank's tokens: each rank's expert shard, and the replicated
    # weights' gradients summed over ranks (what a data-parallel all-reduce would give)
    for name, p in full.named_parameters():
        if name in ("w_gate_up", "w_down"):
            for rank in range(world):
                lo, hi = results[rank][3]
                torch.testing.assert_close(results[rank][2][name], p.grad[lo:hi], rtol=1e-5, atol=1e-5)
        else:
            summed = sum(results[rank][2][name] for rank in range(world))
            torch.testing.assert_close(summed, p.grad, rtol=1e-5, atol=1e-5)
    if kind == "rre":  # every domain's group is one node: nothing crossed a node boundary
        assert all(results[r][4].get("dispatch", {}).get("inter_bytes", 0) == 0 for r in range(world))
        assert sum(results[r][4]["dispatch"]["intra_bytes"] for r in range(world)) > 0


def _wrong_domain_rank(rank: int):
    topo = Topology(ranks_per_node=2)
    ep = ExpertParallelDispatcher(topo.split(2), E // 2, first_expert=(rank // 2) * (E // 2))
    layer = RREMoE(H, F_DIM, E, num_domains=2, vocab_size=VOCAB, seed=3, dispatcher=ep)
    with pytest.raises(ValueError, match="serves domain"):
        layer(torch.randn(4, H), token_ids=torch.arange(4)[None], domain_ids=torch.tensor([1 - rank // 2]))
    with pytest.raises(ValueError, match="one domain's 4 experts"):
        RREMoE(H, F_DIM, E, num_domains=2, vocab_size=VOCAB, dispatcher=ExpertParallelDispatcher(topo, E))
    return True


def test_rre_rank_rejects_another_domains_tokens():
    assert all(run_ranks(4, _wrong_domain_rank).values())


def _failing_peer_rank(rank: int, failure: str):
    topo = Topology(ranks_per_node=2, timeout=3)
    ep = ExpertParallelDispatcher(topo, 4, "hierarchical")
    if rank == 3:
        if failure == "dies":
            os._exit(0)
        time.sleep(12)  # hangs past the others' timeout
        return "hung"
    start = time.monotonic()
    try:
        ep.dispatch(torch.randn(6, 8), torch.tensor([[0, 3]] * 6), torch.ones(6, 2))
    except CommunicationError as err:
        return str(err), time.monotonic() - start
    return "no error", 0.0


@pytest.mark.parametrize("failure", ["hangs", "dies"])
def test_a_failing_peer_raises_a_clear_error(failure):
    results = run_ranks(4, _failing_peer_rank, failure)
    for rank in range(3):
        message, waited = results[rank]
        assert "a peer rank died, hung or exceeded the timeout (3 s)" in message, message
        assert f"rank {rank} of Topology" in message
        assert waited < 10


def _bf16_chunks_rank(rank: int, chunks: int):
    topo = Topology(ranks_per_node=2)
    torch.manual_seed(0)
    layer = MoEFeedForward(H, F_DIM, E, **TOPK, dispatcher=ExpertParallelDispatcher(topo, E, "hierarchical"),
                           ep_chunks=chunks, dtype=torch.bfloat16)
    gen = verify.generator(70 + rank)
    x = verify.randn((96, H), torch.bfloat16, gen)
    y, _ = layer(x)
    y.backward(verify.randn(tuple(y.shape), torch.bfloat16, verify.generator(80 + rank)))
    return {"w_gate_up": layer.w_gate_up.grad.float(), "w_down": layer.w_down.grad.float()}


def _bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """bf16's spacing at |t| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(t.abs().clamp_min(2.0 ** -126))) - 7)


def test_bf16_expert_grads_do_not_depend_on_ep_chunks():
    """Chunks' expert-weight gradients add up in fp32 and are rounded once: 4 chunks give the
    1-chunk gradients to within one bf16 rounding (only the fp32 summation order differs);
    rounding each chunk's gradient to bf16 and summing in bf16 missed by up to 7% of the RMS."""
    one, four = run_ranks(4, _bf16_chunks_rank, 1), run_ranks(4, _bf16_chunks_rank, 4)
    for rank in range(4):
        for name in ("w_gate_up", "w_down"):
            a, b = one[rank][name], four[rank][name]
            assert a.abs().max() > 0
            bad = (a - b).abs() > _bf16_ulp(torch.maximum(a.abs(), b.abs()))
            assert not bad.any(), f"rank {rank} {name}: {int(bad.sum())} of {a.numel()} entries differ by more than one bf16 rounding"
