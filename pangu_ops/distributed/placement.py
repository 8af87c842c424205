"""Expert placement that follows the load: load statistics, a planner with redundant experts, and
the placement the expert-parallel dispatcher routes by.

A placement puts R physical experts on W ranks, R / W consecutive physical experts per rank
(physical expert p lives on rank p // (R / W)); `phy2log[p]` is the logical expert it holds. A
logical expert may have several physical replicas (identical weights, gradients summed over them
before the optimizer step: `sync_replica_grads`). The planner's output has the shapes and meaning
of DeepSeek's EPLB `rebalance_experts` (`phy2log [L, R]`, `log2phy [L, E, X]` -1 padded,
`logcnt [L, E]`), so plans interoperate.

The planner (`rebalance_experts`), for L layers at once:
  hierarchical policy (expert groups divide into nodes): pack the expert groups onto nodes
  (heaviest group first into the lightest node with room), replicate inside each node the expert
  with the most load per replica until the node's R / nodes slots are filled, pack the node's
  physical experts onto its ranks the same way, then refine: swap a replica of the heaviest rank
  with one of the lightest rank of its node while that lowers the heavier of the two. Every
  replica stays in its expert's node, so the hierarchical dispatcher never sends a token across
  nodes for a replica.
  global policy (otherwise): the same with the whole world as one node.
Beyond EPLB: `current=` keeps every expert that stays on a rank in the slot it already has (only
new (rank, expert) pairs move), and `max_bytes` bounds the bytes moved: layers are rebalanced in
order of load taken off their heaviest rank per byte moved, the others keep their placement.
`pays=` prices the moves in time instead: a layer is rebalanced only where the seconds it saves
over the coming steps exceed the seconds its bytes take to move (e.g. the cost model's
`functools.partial(sim.rebalance_gain, profile, layer, steps=100)`), best seconds per byte first.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .agreement import agree, collective_device
from .all_to_all import collective


# ---- the planner (numpy: a few ms for 58 layers x 256 experts) ----

def _pack(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Items [X, n] into num_packs packs of n / num_packs items each, every row at once: heaviest
    item first, into the lightest pack with room. Returns (pack [X, n], position in pack [X, n])."""
    rows, n = weight.shape
    cap = n // num_packs
    order = np.argsort(-weight, axis=1, kind="stable")
    pack_load = np.zeros((rows, num_packs))
    pack_count = np.zeros((rows, num_packs), dtype=np.int64)
    pack = np.empty((rows, n), dtype=np.int64)
    slot = np.empty((rows, n), dtype=np.int64)
    r = np.arange(rows)
    for i in range(n):
        item = order[:, i]
        p = np.argmin(np.where(pack_count < cap, pack_load, np.inf), axis=1)
        pack[r, item], slot[r, item] = p, pack_count[r, p]
        pack_load[r, p] += weight[r, item]
        pack_count[r, p] += 1
    return pack, slot


def _replicate(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray]:
    """Logical experts [X, n] onto num_physical >= n physical ones: each extra replica goes to the
    expert with the most load per replica. Returns (phy2log [X, P], count [X, n])."""
    rows, n = weight.shape
    phy2log = np.tile(np.arange(num_physical), (rows, 1))
    count = np.ones((rows, n), dtype=np.int64)
    r = np.arange(rows)
    for p in range(n, num_physical):
        e = np.argmax(weight / count, axis=1)
        phy2log[:, p] = e
        count[r, e] += 1
    return phy2log, count


def _refine(weight: np.ndarray, pack: np.ndarray, num_packs: int, rounds: int = 8) -> None:
    """In place, every row at once: while swapping an item of the heaviest pack with one of another
    pack lowers the heavier of the two below the heaviest's load, do the best such swap (packs keep
    their sizes)."""
    rows, n = weight.shape
    cap = n // num_packs
    r = np.arange(rows)
    for _ in range(rounds):
        members = np.argsort(pack, axis=1, kind="stable").reshape(rows, num_packs, cap)  # items of each pack
        w = np.take_along_axis(weight, members.reshape(rows, -1), axis=1).reshape(rows, num_packs, cap)
        load = w.sum(2)
        hi = load.argmax(1)
        w_hi = w[r, hi]  # [rows, cap]
        delta = w_hi[:, :, None, None] - w[:, None, :, :]  # [row, a in hi, other pack, b]
        worst = np.maximum(load[r, hi][:, None, None, None] - delta, load[:, None, :, None] + delta)
        worst[r, :, hi, :] = np.inf
        flat = worst.reshape(rows, -1)
        best = flat.argmin(1)
        better = flat[r, best] < load[r, hi] * (1 - 1e-9)
        if not better.any():
            return
        a, other, b = np.unravel_index(best[better], (cap, num_packs, cap))
        rb = r[better]
        ia, ib = members[rb, hi[better], a], members[rb, other, b]
        pack[rb, ia], pack[rb, ib] = other, hi[better]


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _plan(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_ranks: int,
          refine: bool) -> np.ndarray:
    """The hierarchical policy over [L, E] loads (global: num_groups = num_nodes = 1): phy2log [L, R]."""
    L, E = weight.shape
    group_size, groups_per_node = E // num_groups, num_groups // num_nodes
    per_node, per_rank, ranks_per_node = E // num_nodes, num_physical // num_ranks, num_ranks // num_nodes
    # 1. expert groups onto nodes; "node-major" ids: the experts of node 0 first, and so on
    group_pack, group_slot = _pack(weight.reshape(L, num_groups, group_size).sum(-1), num_nodes)
    log2nl = ((group_pack * groups_per_node + group_slot) * group_size)[:, :, None] + np.arange(group_size)
    log2nl = log2nl.reshape(L, E)
    nl2log = _inverse(log2nl)
    node_weight = np.take_along_axis(weight, nl2log, axis=1).reshape(L * num_nodes, per_node)
    # 2. replicas inside each node
    phy2nl, count = _replicate(node_weight, num_physical // num_nodes)
    phy_weight = np.take_along_axis(node_weight / count, phy2nl, axis=1)
    # 3. the node's physical experts onto its ranks, then refined
    pack, slot = _pack(phy_weight, ranks_per_node)
    if refine:
        _refine(phy_weight, pack, ranks_per_node)
        order = np.lexsort((np.broadcast_to(np.arange(pack.shape[1]), pack.shape), pack), axis=1)
        slot = np.empty_like(pack)
        np.put_along_axis(slot, order, np.broadcast_to(np.arange(pack.shape[1]) % per_rank, pack.shape), axis=1)
    where = pack * per_rank + slot  # node-local physical position of each node physical expert
    at = _inverse(where)
    phy2nl = np.take_along_axis(phy2nl, at, axis=1).reshape(L, num_nodes, -1)
    phy2nl = (phy2nl + (np.arange(num_nodes) * per_node)[None, :, None]).reshape(L, num_physical)
    return np.take_along_axis(nl2log, phy2nl, axis=1)


def _keep_slots(phy2log: np.ndarray, current: np.ndarray, per_rank: int) -> np.ndarray:
    """phy2log with each rank's experts reordered so that an expert the rank already holds keeps
    its current slot."""
    out = phy2log.copy()
    L, R = phy2log.shape
    for l in range(L):
        for r0 in range(0, R, per_rank):
            new, cur = list(phy2log[l, r0:r0 + per_rank]), current[l, r0:r0 + per_rank]
            row = [-1] * per_rank
            for s, e in enumerate(cur):
                if e in new:
                    row[s] = e
                    new.remove(e)
            for s in range(per_rank):
                if row[s] < 0:
                    row[s] = new.pop(0)
            out[l, r0:r0 + per_rank] = row
    return out


def rank_loads(load: Tensor | np.ndarray, phy2log: Tensor | np.ndarray, num_ranks: int) -> np.ndarray:
    """[L, W] tokens each rank computes under phy2log, a logical expert's load split evenly over
    its replicas."""
    load, phy2log = _np2(load, np.float64), _np2(phy2log, np.int64)
    L, E = load.shape
    count = np.stack([np.bincount(row, minlength=E) for row in phy2log]).astype(np.float64)
    per_phy = np.take_along_axis(load / np.maximum(count, 1), phy2log, axis=1)
    return per_phy.reshape(L, num_ranks, -1).sum(-1)


def balancedness(load: Tensor | np.ndarray, phy2log: Tensor | np.ndarray, num_ranks: int) -> np.ndarray:
    """[L] mean / max tokens per rank (1.0: perfectly balanced); vLLM's EPLB metric."""
    per_rank = rank_loads(load, phy2log, num_ranks)
    return per_rank.mean(1) / np.maximum(per_rank.max(1), 1e-12)


def _np2(t: Tensor | np.ndarray, dtype) -> np.ndarray:
    a = t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
    return (a[None] if a.ndim == 1 else a).astype(dtype)


def _tables(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(log2phy [L, E, X] -1 padded, logcnt [L, E]) of phy2log."""
    L, R = phy2log.shape
    logcnt = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])
    replica = np.zeros((L, R), dtype=np.int64)
    log2phy = np.full((L, num_experts, max(1, int(logcnt.max()))), -1, dtype=np.int64)
    seen = np.zeros((L, num_experts), dtype=np.int64)
    for p in range(R):
        e = phy2log[:, p]
        replica[:, p] = seen[np.arange(L), e]
        log2phy[np.arange(L), e, replica[:, p]] = p
        seen[np.arange(L), e] += 1
    return log2phy, logcnt


def rebalance_experts(load: Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int, *,
                      current: Tensor | None = None, expert_bytes: int = 1, max_bytes: int | None = None,
                      pays=None, refine: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Plan the physical experts of L MoE layers (module doc).

    Args:
        load: `[L, E]` (or `[E]`) tokens per logical expert over a window (`layer_loads`).
        num_replicas: R >= E physical experts per layer, a multiple of num_ranks.
        num_groups: expert groups that must share a node (DeepSeek-V3's group-limited routing);
            without such routing pass E (every expert its own group: the finest packing onto
            nodes). When they divide into num_nodes the hierarchical policy is used, else the
            global one (1 group: one node).
        num_nodes, num_ranks: the expert-parallel group's nodes and ranks (num_nodes | num_ranks).
        current: `[L, R]` phy2log in force now: experts that stay on a rank keep their slots.
        expert_bytes, max_bytes: bytes one expert's move costs (weights + optimizer state), and
            the most to move (None: no bound; 0: nothing moves). Needs `current`.
        pays: `pays(before, after, bytes_moved) -> seconds` saved net of the move, for one layer
            whose max / mean tokens per rank goes from `before` to `after` by moving `bytes_moved`
            bytes (`sim.rebalance_gain` with its profile, layer and steps bound): layers where it is
            not positive keep their placement. Needs `current`.
        refine: the swap refinement after packing (False: EPLB's greedy packing alone).

    Returns `(phy2log [L, R], log2phy [L, E, X], logcnt [L, E])`, int64 (X: most replicas of one
    expert; -1 pads log2phy).
    """
    weight = _np2(load, np.float64)
    L, E = weight.shape
    if num_ranks <= 0 or num_nodes <= 0 or num_ranks % num_nodes:
        raise ValueError(f"num_nodes ({num_nodes}) must divide num_ranks ({num_ranks}), both positive")
    if num_replicas < E or num_replicas % num_ranks:
        raise ValueError(f"num_replicas ({num_replicas}) must be >= the experts ({E}) and a multiple of num_ranks "
                         f"({num_ranks})")
    if num_groups <= 0 or E % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the experts ({E})")
    if (weight < 0).any() or not np.isfinite(weight).all():
        raise ValueError("load must be finite and non-negative")
    if (max_bytes is not None or pays is not None) and current is None:
        raise ValueError("max_bytes and pays= weigh the moves from a current placement: pass current=")
    hierarchical = num_groups % num_nodes == 0 and (num_replicas // num_nodes) % (num_ranks // num_nodes) == 0 \
        and E % num_nodes == 0
    if hierarchical:
        phy2log = _plan(weight, num_replicas, num_groups, num_nodes, num_ranks, refine)
    else:
        phy2log = _plan(weight, num_replicas, 1, 1, num_ranks, refine)
    if current is not None:
        cur = _np2(current, np.int64)
        if cur.shape != (L, num_replicas):
            raise ValueError(f"current must be [L, R] = [{L}, {num_replicas}], got {list(cur.shape)}")
        per_rank = num_replicas // num_ranks
        phy2log = _keep_slots(phy2log, cur, per_rank)
        if max_bytes is not None or pays is not None:
            moved = np.array([moves(cur[l], phy2log[l], num_ranks) for l in range(L)]) * expert_bytes
            before, after = rank_loads(weight, cur, num_ranks), rank_loads(weight, phy2log, num_ranks)
            if pays is None:  # load taken off the heaviest rank
                gain = before.max(1) - after.max(1)
            else:
                imbalance = lambda r: float(r.max() / max(r.mean(), 1e-12))  # noqa: E731
                gain = np.array([pays(imbalance(before[l]), imbalance(after[l]), int(moved[l])) for l in range(L)])
            budget = np.inf if max_bytes is None else max_bytes
            keep = np.ones(L, dtype=bool)
            spent = 0
            for l in sorted(range(L), key=lambda l: -gain[l] / max(moved[l], 1)):
                if gain[l] > 0 and spent + moved[l] <= budget:
                    keep[l], spent = False, spent + moved[l]
            phy2log[keep] = cur[keep]
    log2phy, logcnt = _tables(phy2log, E)
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)


def moves(old: Tensor | np.ndarray, new: Tensor | np.ndarray, num_ranks: int) -> int:
    """Experts a rank must receive to go from phy2log `old` to `new` ([R] each): the (rank,
    logical expert) pairs of new that old lacks, counted with multiplicity."""
    old, new = _np2(old, np.int64)[0], _np2(new, np.int64)[0]
    per_rank = old.shape[0] // num_ranks
    total = 0
    for r in range(num_ranks):
        have = list(old[r * per_rank:(r + 1) * per_rank])
        for e in new[r * per_rank:(r + 1) * per_rank]:
            if e in have:
                have.remove(e)
            else:
                total += 1
    return total


# ---- one layer's placement, as the dispatcher uses it ----

@dataclass(frozen=True)
class Placement:
    """R physical experts of one layer on `num_ranks` ranks, R / num_ranks consecutive ones each;
    `phy2log[p]`: the logical expert (0-based within the dispatcher's experts) physical p holds."""

    phy2log: Tensor  # [R] int64
    num_ranks: int

    def __post_init__(self):
        phy2log = torch.as_tensor(self.phy2log, dtype=torch.int64, device="cpu")
        object.__setattr__(self, "phy2log", phy2log)
        if phy2log.dim() != 1 or phy2log.numel() % self.num_ranks:
            raise ValueError(f"phy2log must be [R] with R a multiple of the {self.num_ranks} ranks, "
                             f"got {list(phy2log.shape)}")

    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int) -> "Placement":
        """One physical expert per logical one, E / W consecutive experts per rank (no replicas)."""
        return cls(torch.arange(num_experts, device="cpu"), num_ranks)

    @property
    def num_physical(self) -> int:
        return self.phy2log.numel()

    @property
    def per_rank(self) -> int:
        return self.num_physical // self.num_ranks

    def experts_of(self, rank: int) -> Tensor:
        """[R / W] the logical experts rank `rank` holds, in slot order."""
        return self.phy2log[rank * self.per_rank:(rank + 1) * self.per_rank]

    def check(self, num_experts: int) -> None:
        """Every logical expert has at least one replica, and no id is out of range."""
        if self.phy2log.numel() and (int(self.phy2log.min()) < 0 or int(self.phy2log.max()) >= num_experts):
            raise ValueError(f"placement: phy2log holds ids outside [0, {num_experts})")
        missing = set(range(num_experts)) - set(self.phy2log.tolist())
        if missing:
            raise ValueError(f"placement: logical experts {sorted(missing)[:8]} have no physical replica")

    def replica_choice(self, rank: int, ranks_per_node: int) -> tuple[Tensor, Tensor]:
        """Rank `rank`'s choice of replicas: (candidates [E, X] physical ids, count [E]); a token's
        slot for expert e goes to candidates[e, (token + rank) % count[e]]. Candidates: the
        replicas on this rank if any, else those on its node if any, else all (locality first)."""
        E = int(self.phy2log.max()) + 1 if self.phy2log.numel() else 0
        node = rank // ranks_per_node
        rank_of = torch.arange(self.num_physical, device="cpu") // self.per_rank  # (host tensors, as phy2log)
        cands, counts = [], []
        for e in range(E):
            phys = torch.nonzero(self.phy2log == e).flatten()
            for tier in (rank_of[phys] == rank, rank_of[phys] // ranks_per_node == node):
                if bool(tier.any()):
                    phys = phys[tier]
                    break
            cands.append(phys)
            counts.append(phys.numel())
        width = max(counts, default=1)
        table = torch.full((E, width), -1, dtype=torch.int64, device="cpu")
        for e, phys in enumerate(cands):
            table[e, :phys.numel()] = phys
        return table, torch.tensor(counts, dtype=torch.int64, device="cpu")

    def fingerprint(self) -> int:
        """A small non-negative int that differs between placements (for the ranks' agreement)."""
        return zlib.crc32(self.phy2log.numpy().tobytes()) ^ (self.num_ranks << 20)


def layer_loads(layers, group=None, reset: bool = False) -> Tensor:
    """[L, E] the layers' `expert_load` (tokens per logical expert counted since the last reset),
    all-reduced over `group` (the expert-parallel group; None: this rank's counts only)."""
    load = torch.stack([layer.expert_load.to(torch.float64).cpu() for layer in layers])
    if group is not None:
        dist.all_reduce(load, group=group)
    if reset:
        for layer in layers:
            layer.reset_expert_load()
    return load


# ---- the executor: experts and their optimizer state to a new placement ----

ECSS_REPLICAS = ("replicated experts under ECSS (an expert pool) are not supported: plan with num_replicas = the "
                 "number of experts (moves only) for ECSS layers")

def _moe_layers(model_or_layers) -> list:
    from ..nn.moe import MoEFeedForward

    if isinstance(model_or_layers, torch.nn.Module):
        return [m for m in model_or_layers.modules() if isinstance(m, MoEFeedForward) and m.dispatcher is not None]
    return list(model_or_layers)


def _current(layer) -> Placement:
    d = layer.dispatcher
    return d.placement if d.placement is not None else Placement.contiguous(d.num_experts, d.topology.world_size)


def _transfers(old: Placement, new: Placement) -> list[tuple[int, int, int, int]]:
    """(source rank, source slot, destination rank, destination slot) for every slot of `new`; an
    expert the destination already holds comes from its own old slot, else from a holder of it
    (spread over the holders by destination rank and slot). The same list on every rank."""
    holders: dict[int, list[tuple[int, int]]] = {}
    for r in range(old.num_ranks):
        for s, e in enumerate(old.experts_of(r).tolist()):
            holders.setdefault(e, []).append((r, s))
    out = []
    for d in range(new.num_ranks):
        mine = {}
        for s, e in enumerate(old.experts_of(d).tolist()):
            mine.setdefault(e, s)  # any own copy serves every new slot of that expert
        for j, e in enumerate(new.experts_of(d).tolist()):
            if e in mine:
                out.append((d, mine[e], d, j))
            else:
                r, s = holders[e][(d + j) % len(holders[e])]
                out.append((r, s, d, j))
    return out


def _move_rows(old_rows: Tensor, transfers, me: int, world: int, group) -> Tensor:
    """The new [slots, ...] tensor of rank `me`: rows kept locally, the others received in one
    all-to-all (rows sent in destination order, received in source order)."""
    flat = old_rows.reshape(old_rows.shape[0], -1)
    sends = sorted((d, j, s) for (r, s, d, j) in transfers if r == me and d != me)
    recvs = sorted((r, j) for (r, s, d, j) in transfers if d == me and r != me)
    send_splits = [sum(1 for d, _, _ in sends if d == p) for p in range(world)]
    recv_splits = [sum(1 for r, _ in recvs if r == p) for p in range(world)]
    # through the group's collective device (ECSS's host state under NCCL: staged on the GPU)
    device = collective_device(group)
    out_rows = torch.empty(sum(recv_splits), flat.shape[1], dtype=flat.dtype, device=device)
    inp = flat[[s for _, _, s in sends]] if sends else flat.new_empty(0, flat.shape[1])
    dist.all_to_all_single(out_rows, inp.to(device).contiguous(), recv_splits, send_splits, group=group)
    out_rows = out_rows.to(flat.device)
    slots = sum(1 for (_, _, d, _) in transfers if d == me)
    new = flat.new_empty(slots, flat.shape[1])
    for (r, s, d, j) in transfers:
        if d == me and r == me:
            new[j] = flat[s]
    if recvs:  # received in (source rank, destination slot) order
        new[torch.tensor([j for _, j in recvs], device=new.device)] = out_rows
    return new.reshape(slots, *old_rows.shape[1:])


@dataclass
class MoveStats:
    """What one `rebalance` moved on this rank."""

    bytes_sent: int = 0
    experts_received: int = 0
    seconds: float = 0.0


def rebalance(model_or_layers, placements, *, optimizer: torch.optim.Optimizer | None = None,
              store=None) -> MoveStats:
    """Moves every expert-parallel MoE layer's experts to `placements[i]` (a `Placement`, or a
    `[R]` phy2log row of `rebalance_experts`' output), with the optimizer's per-expert state
    (AdamW's exp_avg / exp_avg_sq, any state tensor shaped like the weight), over the layers'
    expert-parallel groups (one all-to-all per tensor).

    Two phases: every rank first receives its new experts into new tensors (the old ones serve
    meanwhile); only when all ranks have them (a final agreement) does each rank swap them in and
    route by the new placement. A rank that dies before that leaves the old placement valid on
    the others, which raise `CommunicationError`; placements that differ between ranks raise
    `ValueError` on every rank before anything moves. The layers' expert weights become new
    Parameters (their shapes may change), put in the optimizer's groups and state in place of the
    old ones (other references to the old ones, e.g. a DDP wrapper's, must be rebuilt); their
    gradients are dropped (call it between optimizer steps); `expert_load` restarts from zero.
    Layers whose experts an `ecss.ExpertStore` keeps on the host (`store`): their host state moves
    instead (master weights, moments, step counts, compute copy), and their device pools restart
    empty."""
    start = time.perf_counter()
    layers = _moe_layers(model_or_layers)
    if len(placements) != len(layers):
        raise ValueError(f"{len(placements)} placements for {len(layers)} expert-parallel MoE layers")
    news = [p if isinstance(p, Placement) else Placement(p, layer.dispatcher.topology.world_size)
            for p, layer in zip(placements, layers)]
    stats = MoveStats()
    staged = []
    for i, (layer, new) in enumerate(zip(layers, news)):
        d = layer.dispatcher
        t = d.topology
        held = store.layer_of(layer) if store is not None else None
        error = None
        try:  # everything that can refuse is checked here, agreed on, before any rank moves anything
            if new.num_ranks != t.world_size:
                raise ValueError(f"layer {i}: placement for {new.num_ranks} ranks, its group has {t.world_size}")
            new.check(d.num_experts)
            if held is not None:
                store.check_movable(layer)
                if bool((torch.bincount(new.phy2log) > 1).any()):
                    raise ValueError(ECSS_REPLICAS)
        except ValueError as e:
            error = e
        with collective(f"rebalance layer {i} (agreeing on the placement)", t):
            agree(f"rebalance layer {i} on {t}", {"placement": 0 if error else new.fingerprint()}, t.control_group,
                  t.ranks, collective_device(t.control_group), error)
        transfers = _transfers(_current(layer), new)
        if held is not None:  # ECSS: the experts live on the host
            tensors = {"master": held.master, "exp_avg": held.exp_avg, "exp_avg_sq": held.exp_avg_sq,
                       "steps": held.steps[:, None], "compute": held.compute}
        else:
            tensors = {"w_gate_up": layer.w_gate_up, "w_down": layer.w_down}
        state = {}
        if optimizer is not None and held is None:
            for name, p in tensors.items():
                for key, v in optimizer.state.get(p, {}).items():
                    if isinstance(v, Tensor) and v.dim() and v.shape[0] == p.shape[0]:
                        state[(name, key)] = v
        moved = {}
        with collective(f"rebalance layer {i} (moving the experts)", t):
            for key, old in [*tensors.items(), *state.items()]:
                moved[key] = _move_rows(old.detach(), transfers, t.rank, t.world_size, t.group)
        sent = sum(1 for (r, _, d_, _) in transfers if r == t.rank and d_ != t.rank)
        stats.experts_received += sum(1 for (r, _, d_, _) in transfers if d_ == t.rank and r != t.rank)
        stats.bytes_sent += sum(v[0].numel() * v.element_size() * sent for v in [*tensors.values(), *state.values()])
        staged.append((layer, new, tensors, state, moved, held))
    for layer, *_ in staged[:1]:  # phase 2: everyone has everything, or nobody swaps
        t = layer.dispatcher.topology
        with collective("rebalance (committing)", t):
            agree(f"rebalance commit on {t}", {"received": 1}, t.control_group, t.ranks,
                  collective_device(t.control_group))
    for layer, new, tensors, state, moved, held in staged:
        if held is not None:
            store.replace_experts(layer, moved["master"], moved["exp_avg"], moved["exp_avg_sq"],
                                  moved["steps"][:, 0].contiguous(), moved["compute"])
            tensors = {}
        for name, old in tensors.items():
            # a new Parameter (its shape may change: autograd keeps the old one's), in the
            # optimizer's groups and state in place of the old one
            fresh = torch.nn.Parameter(moved[name], requires_grad=old.requires_grad)
            setattr(layer, name, fresh)
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["params"] = [fresh if q is old else q for q in group["params"]]
                if old in optimizer.state:
                    optimizer.state[fresh] = optimizer.state.pop(old)
        for (name, key), v in state.items():
            optimizer.state[getattr(layer, name)][key] = moved[(name, key)]
        layer.dispatcher.set_placement(new)
        layer.reset_expert_load()
    stats.seconds = time.perf_counter() - start
    return stats


def sync_replica_grads(model_or_layers) -> None:
    """Sums the expert weights' gradients over the replicas of each replicated logical expert
    (all-reduce over the layer's expert-parallel group), so that replicas, identical before the
    step, stay identical after it: call after backward, before the optimizer step."""
    for layer in _moe_layers(model_or_layers):
        d = layer.dispatcher
        if d.placement is None:
            continue
        count = torch.bincount(d.placement.phy2log, minlength=d.num_experts)
        replicated = torch.nonzero(count > 1).flatten()
        if not replicated.numel():
            continue
        if layer.expert_pool is not None:
            raise ValueError(ECSS_REPLICAS)
        row_of = torch.full((d.num_experts,), -1, dtype=torch.long, device="cpu")  # (host, as phy2log)
        row_of[replicated] = torch.arange(replicated.numel(), device="cpu")
        local_rows = row_of[d.placement.experts_of(d.topology.rank)]
        mine = torch.nonzero(local_rows >= 0).flatten()
        for p in (layer.w_gate_up, layer.w_down):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            total = torch.zeros(replicated.numel(), p[0].numel(), dtype=torch.float32, device=p.device)
            total.index_add_(0, local_rows[mine].to(p.device), grad[mine.to(p.device)].flatten(1).float())
            with collective("summing the replicas' gradients", d.topology):
                dist.all_reduce(total, group=d.topology.group)
            grad[mine.to(p.device)] = total[local_rows[mine].to(p.device)].view(-1, *p.shape[1:]).to(grad.dtype)
            p.grad = grad
