"""Expert placement: the planner's shapes and invariants (against EPLB's greedy policy on Zipf
loads), the dispatcher with replicas equal to the unreplicated layer, training with rebalancing
equal to training without (weights and AdamW state moved exactly, replicas kept identical), and
the executor's failures (a dying rank, placements that disagree).

Tolerances: fp32, 1e-5 relative and absolute: replicas change which rank computes a slot, and so
the order of the combine's sums (fp32 rounding)."""
import os

import numpy as np
import pytest
import torch

from pangu_ops import verify
from pangu_ops.distributed import CommunicationError, ExpertParallelDispatcher, Topology
from pangu_ops.distributed import placement as pl
from pangu_ops.distributed.placement import Placement, balancedness, rebalance_experts
from pangu_ops.nn import MoEFeedForward

from gloo import run_ranks

pytestmark = pytest.mark.usefixtures("on_the_cpu")  # the planner is host code; the ranks run on the CPU


def zipf(layers: int, experts: int, s: float, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, experts + 1) ** s
    return torch.tensor(np.stack([g.permutation(w) for _ in range(layers)]) * 1e4)


@pytest.mark.parametrize("L, E, R, groups, nodes, ranks", [(3, 16, 24, 4, 2, 4), (2, 12, 18, 1, 1, 6), (4, 8, 8, 2, 2, 4)])
def test_planner_shapes_and_invariants(L, E, R, groups, nodes, ranks):
    load = zipf(L, E, 1.1)
    phy2log, log2phy, logcnt = rebalance_experts(load, R, groups, nodes, ranks)
    assert phy2log.shape == (L, R) and logcnt.shape == (L, E) and log2phy.shape[:2] == (L, E)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert (logcnt >= 1).all() and (logcnt.sum(1) == R).all()
    for l in range(L):
        for e in range(E):
            phys = log2phy[l, e][log2phy[l, e] >= 0]
            assert phys.numel() == logcnt[l, e] and (phy2log[l, phys] == e).all()  # inverse of phy2log
        if groups % nodes == 0 and nodes > 1:  # hierarchical: every replica in one node, whole groups per node
            per_node = R // nodes
            node_of = torch.arange(R) // per_node
            for e in range(E):
                assert node_of[log2phy[l, e][log2phy[l, e] >= 0]].unique().numel() == 1
            for g in range(groups):
                members = torch.isin(phy2log[l], torch.arange(g * E // groups, (g + 1) * E // groups))
                assert node_of[members].unique().numel() == 1


@pytest.mark.parametrize("s", [1.0, 1.2])
@pytest.mark.parametrize("seed", [0, 3])
def test_balancedness_at_least_eplbs_greedy_policy(s, seed):
    """8 layers x 64 experts, 8 ranks in 2 nodes, 72 physical experts (the issue's EPLB row:
    max/mean 2.96 -> 1.11 at Zipf 1.2): never worse than EPLB's greedy policy on any layer."""
    load = zipf(8, 64, s, seed=seed)
    ours, _, _ = rebalance_experts(load, 72, 8, 2, 8)
    greedy, _, _ = rebalance_experts(load, 72, 8, 2, 8, refine=False)  # EPLB's policy alone
    before = balancedness(load, torch.arange(64).repeat(8, 1), 8)
    b_ours, b_greedy = balancedness(load, ours, 8), balancedness(load, greedy, 8)
    assert (b_ours >= b_greedy - 1e-12).all() and b_ours.mean() > b_greedy.mean()
    assert (1 / b_ours).mean() <= 1.12 < 2 < (1 / before).mean()


def test_current_and_budget():
    load = zipf(3, 16, 1.2)
    cur = torch.arange(16).repeat(3, 1)
    cur24 = torch.cat([cur, cur[:, :8]], 1)  # some placement with 24 physical experts
    still, _, _ = rebalance_experts(load, 24, 1, 1, 4, current=cur24, expert_bytes=100, max_bytes=0)
    assert torch.equal(still, cur24)  # budget 0: nothing moves
    moved, _, _ = rebalance_experts(load, 24, 1, 1, 4, current=cur24)
    free, _, _ = rebalance_experts(load, 24, 1, 1, 4)
    for l in range(3):  # the same experts per rank as without current=, kept slots where possible
        for r in range(4):
            assert sorted(moved[l, 6 * r:6 * r + 6].tolist()) == sorted(free[l, 6 * r:6 * r + 6].tolist())
        assert pl.moves(cur24[l], moved[l], 4) <= pl.moves(cur24[l], free[l], 4)
        kept = [(s, e) for s, e in enumerate(cur24[l].tolist()) if e in moved[l, s // 6 * 6:s // 6 * 6 + 6].tolist()]
        assert all(moved[l, s] == e for s, e in kept)
    one_layer = pl.moves(cur24[0], moved[0], 4) * 100
    some, _, _ = rebalance_experts(load, 24, 1, 1, 4, current=cur24, expert_bytes=100, max_bytes=one_layer)
    assert sum(not torch.equal(some[l], cur24[l]) for l in range(3)) >= 1
    assert sum(pl.moves(cur24[l], some[l], 4) for l in range(3)) * 100 <= one_layer


def test_planner_errors_name_the_argument():
    load = zipf(1, 8, 1.0)
    with pytest.raises(ValueError, match="num_replicas"):
        rebalance_experts(load, 6, 1, 1, 2)
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        rebalance_experts(load, 9, 1, 1, 2)
    with pytest.raises(ValueError, match="num_nodes"):
        rebalance_experts(load, 8, 1, 3, 4)
    with pytest.raises(ValueError, match="non-negative"):
        rebalance_experts(-load, 8, 1, 1, 2)
    with pytest.raises(ValueError, match="current="):
        rebalance_experts(load, 8, 1, 1, 2, max_bytes=0)
    with pytest.raises(ValueError, match="no physical replica"):
        Placement(torch.tensor([0, 1, 1, 2]), 2).check(4)


def test_replica_choice_prefers_rank_then_node():
    p = Placement(torch.tensor([0, 1, 2, 0, 3, 0, 1, 3]), 4)  # 2 per rank; 2 ranks per node
    table, count = p.replica_choice(rank=1, ranks_per_node=2)
    assert table[0, :count[0]].tolist() == [3]  # expert 0: the copy on this rank
    assert table[1, :count[1]].tolist() == [1]  # expert 1: on rank 0, same node (the other is on node 1)
    assert table[3, :count[3]].tolist() == [4, 7]  # expert 3: only on node 1, both copies
    table, count = p.replica_choice(rank=3, ranks_per_node=2)
    assert table[0, :count[0]].tolist() == [5]
    with torch.device("meta"):  # host tensors whatever the default device ("meta" stands in for a GPU's)
        table_on_gpu_default, count_on_gpu_default = p.replica_choice(rank=3, ranks_per_node=2)
        contiguous = Placement.contiguous(8, 4)
    assert torch.equal(table_on_gpu_default, table) and torch.equal(count_on_gpu_default, count)
    assert contiguous.phy2log.tolist() == list(range(8))


# ---- on gloo ranks ----

H, F_DIM, E, R = 16, 12, 8, 12
TOPK = dict(router="topk", topk=2, score="softmax", aux_loss_alpha=0.0)


def _skewed_placement(world: int) -> Placement:
    load = zipf(1, E, 1.3, seed=1)
    phy2log, _, _ = rebalance_experts(load, R, 2, 2, world)
    return Placement(phy2log[0], world)


def _layer(topo, strategy, placement=None, seed=0):
    torch.manual_seed(seed)
    full = MoEFeedForward(H, F_DIM, E, **TOPK)
    layer = MoEFeedForward(H, F_DIM, E, **TOPK,
                           dispatcher=ExpertParallelDispatcher(topo, E, strategy, placement=placement))
    ids = layer.local_expert_ids
    with torch.no_grad():
        layer.gate.weight.copy_(full.gate.weight)
        layer.w_gate_up.copy_(full.w_gate_up[ids])
        layer.w_down.copy_(full.w_down[ids])
    return full, layer


def _replicated_rank(rank: int):
    return {strategy: _replicated(rank, strategy) for strategy in ("flat", "hierarchical")}


def _replicated(rank: int, strategy: str):
    topo = Topology(ranks_per_node=2)
    _, plain = _layer(topo, strategy)
    _, replicated = _layer(topo, strategy, _skewed_placement(4))
    x = verify.randn((7 + 3 * rank, H), torch.float32, verify.generator(10 + rank)).requires_grad_()
    outs = []
    for layer in (plain, replicated):
        y, _ = layer(x)
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
        outs.append((y.detach(), g, layer.expert_load.clone()))
    return outs, replicated.local_expert_ids.tolist(), dict(replicated.dispatcher.stats)


def test_dispatcher_with_replicas_equals_the_unreplicated_layer():
    both = run_ranks(4, _replicated_rank)  # (one launch for both strategies)
    placement = _skewed_placement(4)
    for rank, strategy in ((r, s) for s in ("flat", "hierarchical") for r in range(4)):
        results = {r: both[r][strategy] for r in range(4)}
        (y0, g0, load0), (y1, g1, load1) = results[rank][0]
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-5)
        assert torch.equal(load0, load1) and int(load0.sum()) == 2 * (7 + 3 * rank)  # logical counts
        assert results[rank][1] == placement.experts_of(rank).tolist()
    assert (torch.bincount(placement.phy2log, minlength=E) > 1).any()  # the test really has replicas


def _train(topo, strategy, steps: int, rebalance_every: int | None, rank: int):
    """A few AdamW steps of an EP layer on skewed routing; every `rebalance_every` steps a new
    placement planned from the counted load. Returns the full logical weights and AdamW moments
    gathered from every rank's replicas, and whether replicas stayed identical."""
    import torch.distributed as dist

    _, layer = _layer(topo, strategy)
    with torch.no_grad():  # a skewed router: experts 0-2 get most tokens
        layer.gate.weight[:3] += 0.6
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        x = verify.randn((24, H), torch.float32, verify.generator(100 * step + rank))
        y, _ = layer(x)
        loss = (y.float() ** 2).mean()
        loss.backward()
        losses.append(float(loss))
        layer.gate.weight.grad /= 1  # (each rank's own router gradient: the dense weights are data parallel)
        dist.all_reduce(layer.gate.weight.grad, group=topo.group)
        pl.sync_replica_grads([layer])
        opt.step()
        opt.zero_grad()
        if rebalance_every and (step + 1) % rebalance_every == 0 and step + 1 < steps:
            load = pl.layer_loads([layer], group=topo.group)
            current = (layer.dispatcher.placement.phy2log if layer.dispatcher.placement is not None else None)
            num = R if current is None else current.numel()
            phy2log, _, _ = rebalance_experts(load, num, 2, 2, 4,
                                              current=None if current is None or current.numel() != num else current[None])
            pl.rebalance([layer], [phy2log[0]], optimizer=opt)
    ids = layer.local_expert_ids
    st = opt.state[layer.w_gate_up]
    out = {"w": {}, "m": {}, "v": {}}
    for j, e in enumerate(ids.tolist()):
        for name, t in (("w", layer.w_gate_up.detach()), ("m", st["exp_avg"]), ("v", st["exp_avg_sq"])):
            out[name].setdefault(e, []).append(t[j].clone())
    return out, losses, layer.dispatcher.placement is not None


def _training_rank(rank: int):
    out = {}
    for strategy in ("flat", "hierarchical"):
        topo = Topology(ranks_per_node=2)
        out[strategy] = _train(topo, strategy, 6, None, rank), _train(topo, strategy, 6, 2, rank)
    return out


@pytest.fixture(scope="module")
def training_runs():
    return run_ranks(4, _training_rank)  # (one launch for both strategies)


@pytest.mark.parametrize("strategy", ["flat", "hierarchical"])
def test_training_with_rebalancing_equals_training_without(strategy, training_runs):
    results = {r: training_runs[r][strategy] for r in range(4)}
    merged = {0: {}, 1: {}}
    for rank in range(4):
        for which in (0, 1):
            out, losses, _ = results[rank][which]
            for name, per_expert in out.items():
                for e, copies in per_expert.items():
                    merged[which].setdefault(name, {}).setdefault(e, []).extend(copies)
        assert np.allclose(results[rank][0][1], results[rank][1][1], rtol=1e-5, atol=1e-6)  # same losses
    assert results[0][1][2]  # the rebalanced run really ran on a placement
    for name in ("w", "m", "v"):
        for e in range(E):
            copies = merged[1][name][e]
            assert all(torch.equal(c, copies[0]) for c in copies), f"replicas of expert {e} differ in {name}"
            torch.testing.assert_close(copies[0], merged[0][name][e][0], rtol=1e-5, atol=1e-6)


def _move_rank(rank: int):
    """Moves a layer whose weights and AdamW state are known functions of the logical expert id:
    after the move every slot holds exactly its expert's rows."""
    topo = Topology(ranks_per_node=2)
    _, layer = _layer(topo, "flat")
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.randn(5, H))[0].sum().backward()
    opt.step()
    opt.zero_grad()
    target = _skewed_placement(4)
    before = {e: (layer.w_gate_up[j].detach().clone(), opt.state[layer.w_down]["exp_avg_sq"][j].clone())
              for j, e in enumerate(layer.local_expert_ids.tolist())}
    stats = pl.rebalance([layer], [target], optimizer=opt)
    after = {}
    for j, e in enumerate(layer.local_expert_ids.tolist()):
        after.setdefault(e, []).append((layer.w_gate_up[j].detach().clone(), opt.state[layer.w_down]["exp_avg_sq"][j].clone()))
    return before, after, stats.bytes_sent, stats.experts_received


def test_rebalance_moves_weights_and_optimizer_state_exactly():
    results = run_ranks(4, _move_rank)
    source = {}
    for rank in range(4):
        source.update(results[rank][0])
    assert len(source) == E
    received = 0
    for rank in range(4):
        for e, copies in results[rank][1].items():
            for w, v in copies:
                assert torch.equal(w, source[e][0]) and torch.equal(v, source[e][1])  # bitwise
        received += results[rank][3]
        assert results[rank][2] >= 0
    assert received > 0 and sum(results[r][2] for r in range(4)) > 0


def _fault_rank(rank: int, fault: str):
    topo = Topology(ranks_per_node=2, timeout=4)
    _, layer = _layer(topo, "hierarchical")
    w = layer.w_gate_up.detach().clone()
    target = _skewed_placement(4)
    if fault == "disagree" and rank == 1:
        target = Placement(target.phy2log.roll(1), 4)
    if fault == "dies" and rank == 3:
        pl._move_rows = lambda *a, **k: os._exit(0)  # dies in the middle of the move
    try:
        pl.rebalance([layer], [target])
    except (CommunicationError, ValueError) as err:
        unchanged = torch.equal(layer.w_gate_up, w) and layer.dispatcher.placement is None
        return type(err).__name__, str(err), unchanged
    return "no error", "", False


@pytest.mark.parametrize("fault", ["dies", "disagree"])
def test_rebalance_failures(fault):
    results = run_ranks(4, _fault_rank, fault)
    survivors = range(3) if fault == "dies" else range(4)
    for rank in survivors:
        kind, message, unchanged = results[rank]
        assert kind == ("CommunicationError" if fault == "dies" else "ValueError"), message
        assert unchanged, "the old placement must stay valid"
        if fault == "disagree":
            assert "disagree on placement" in message


# ---- ECSS with expert parallelism ----

ECSS_HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


def _ecss_ranks(rank: int):
    return {mode: _ecss_rank(rank, mode) for mode in ("plain", "ecss", "ecss+move")}


def _ecss_rank(rank: int, mode: str):
    """Three runs of 4 AdamW steps of an EP top-k layer whose router stays fixed: experts on the
    device with torch's AdamW ("plain"), on the host in an ExpertStore ("ecss"), and the same with
    the experts moved to other ranks after step 2 ("ecss+move"). Every expert gets rows every step
    (so lazy and dense AdamW agree). Returns {logical expert: fp32 weights [n]} of this rank."""
    from pangu_ops.ecss import ExpertStore

    topo = Topology(ranks_per_node=2)
    _, layer = _layer(topo, "hierarchical")
    layer.gate.weight.requires_grad_(False)
    store = opt = None
    around_move = {}
    if mode == "plain":
        opt = torch.optim.AdamW([layer.w_gate_up, layer.w_down], **ECSS_HYPER)
    else:
        store = ExpertStore(layer, **ECSS_HYPER)
    for step in range(4):
        x = verify.randn((32, H), torch.float32, verify.generator(300 * step + rank))
        if store is not None:
            store.prepare()
        y, _ = layer(x)
        (y ** 2).mean().backward()
        if store is not None:
            store.step()
        else:
            opt.step()
            opt.zero_grad()
        if mode == "ecss+move" and step == 1:
            moved = Placement(torch.tensor([5, 2, 7, 0, 1, 6, 3, 4]), 4)  # every expert to another rank
            host = store.layers[0]
            around_move["before"] = {e: (host.exp_avg_sq[j].clone(), int(host.steps[j]))
                                     for j, e in enumerate(layer.local_expert_ids.tolist())}
            with pytest.raises(ValueError, match="replicated experts under ECSS"):  # refused before anything moves
                pl.rebalance([layer], [_skewed_placement(4)], store=store)
            stats = pl.rebalance([layer], [moved], store=store)
            assert stats.experts_received == 2
            host = store.layers[0]
            around_move["after"] = {e: (host.exp_avg_sq[j].clone(), int(host.steps[j]))
                                    for j, e in enumerate(layer.local_expert_ids.tolist())}
    ids = layer.local_expert_ids.tolist()
    if store is None:
        flat = torch.cat([layer.w_gate_up.detach().reshape(len(ids), -1), layer.w_down.detach().reshape(len(ids), -1)], 1)
    else:
        flat = store.layers[0].master
    return {e: flat[j].clone() for j, e in enumerate(ids)}, around_move


def test_ecss_with_expert_parallelism_trains_like_the_device_and_moves_host_state():
    all_modes = run_ranks(4, _ecss_ranks)  # (one launch for the three runs)
    runs = {mode: {r: all_modes[r][mode] for r in range(4)} for mode in ("plain", "ecss", "ecss+move")}
    weights = {mode: {e: w for rank in range(4) for e, w in out[rank][0].items()} for mode, out in runs.items()}
    assert sorted(weights["ecss+move"]) == list(range(E))
    for e in range(E):  # (after the move other ranks compute, and sum, in another order: fp32 rounding)
        torch.testing.assert_close(weights["ecss"][e], weights["plain"][e], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights["ecss+move"][e], weights["ecss"][e], rtol=1e-5, atol=1e-6)
    assert runs["ecss+move"][0][0].keys() != runs["ecss"][0][0].keys()  # rank 0 holds other experts now
    before = {e: v for rank in range(4) for e, v in runs["ecss+move"][rank][1]["before"].items()}
    after = {e: v for rank in range(4) for e, v in runs["ecss+move"][rank][1]["after"].items()}
    assert sorted(after) == list(range(E))
    for e, (v, steps) in after.items():  # host moments and step counts moved bit for bit
        assert torch.equal(v, before[e][0]) and steps == before[e][1] == 2
