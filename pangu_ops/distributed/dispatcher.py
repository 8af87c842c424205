"""Expert-parallel token dispatch: each rank owns `num_experts / W` consecutive experts, or the
physical experts a `Placement` gives it (replicas of hot experts allowed); tokens travel to the
ranks of their experts and back, differentiably, on torch.distributed.

With a placement, each slot's logical expert is first mapped to one of its physical replicas,
deterministically and by locality (`Placement.replica_choice`: a replica on the token's rank,
else on its node, else spread by token); everything below then runs on physical experts.

Every local step is a pangu_ops kernel (C++ on CPU, Triton on GPU, each with its reference):
`permute` groups rows by destination (expert, rank or node, dropping slots marked -1, one copy
per distinct destination) and `unpermute` sums them back in fp32.

strategy="flat": `permute` by global expert, one all-to-all of the slot rows over all ranks,
`permute` of the received rows by local expert. combine reverses it.

strategy="hierarchical" (DeepEP's form of Pangu Ultra MoE's hierarchical EP):
  1. `permute` by destination *node*: a token goes once to each node holding any of its experts,
     with its routing restricted to that node (node-local expert ids, -1 elsewhere, weights);
  2. inter-node all-to-all among the ranks of one local index (rank (n, l) -> (m, l), "gateway");
  3. the gateway fans each token out to its node's experts (`permute` by node-local expert) and
     one intra-node all-to-all carries the rows to the experts' ranks;
  4. the expert's rank regroups the rows by local expert (`permute`).
combine: back to the gateway, which sums the node's weighted expert outputs for each token
(`unpermute`: one partial row per token and node), then across to the token's rank, which sums
the nodes' partials (`unpermute`). A token needing j experts on a remote node crosses once, not j
times, each way.

Both strategies give bit-identical results: the rows each expert receives are the same, in the
same order (by local expert, source rank, token, slot), and combine adds in the same order in
both: per node, the node's slots in slot order, then the nodes in order (the flat strategy forms
the same per-node partial sums on the token's rank). Partial sums travel in the output's dtype.

`run(..., chunks=c)` splits the tokens into c chunks and interleaves them: chunk i+1's all-to-all
is in flight while the experts compute chunk i (asynchronous work handles; forward only, the
backward exchanges synchronously).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .. import checks
from ..ops import permute, unpermute
from .agreement import agree, collective_device
from .all_to_all import add_stats, bytes_per_row, collective, peer_kinds, sent_stats
from .placement import Placement
from .topology import Topology

STRATEGIES = ("flat", "hierarchical")


@dataclass
class _Exchange:
    """All-to-alls over `group`, whose ranks are the topology's ranks `members` and `peers` of
    this one: 'intra' or 'inter' node (None: this rank itself), counted in `stats[phase]`."""
    group: object
    members: list
    peers: list
    what: str
    topology: Topology
    stats: dict

    def start(self, x: Tensor, out_splits: list[int], in_splits: list[int], phase: str | None = None):
        x = x.contiguous()
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        with collective(self.what, self.topology):
            work = dist.all_to_all_single(out, x, out_splits, in_splits, group=self.group, async_op=True)
        if phase is not None:
            add_stats(self.stats.setdefault(phase, {}), sent_stats(self.peers, in_splits, bytes_per_row(x)))
        return out, (work, self)

    def wait(self, work) -> None:
        with collective(self.what, self.topology):
            work.wait()

    def sizes(self, counts: Tensor) -> Tensor:
        """counts [G, ...] (row g: what goes to group rank g) -> what each group rank sends here,
        over the topology's control group."""
        full = counts.new_zeros((self.topology.world_size,) + tuple(counts.shape[1:]))
        full[self.members] = counts
        out = torch.empty_like(full)
        with collective(f"{self.what} (sizes)", self.topology):
            dist.all_to_all_single(out, full, group=self.topology.control_group)
        return out[self.members]


class _AllToAll(torch.autograd.Function):
    """Rows of x to the group's ranks. The forward starts the exchange and appends its work to
    `pending`: the caller waits before reading the output. The backward exchanges the gradient
    rows back the same way and waits. `phase` names the forward exchange in the stats."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, exchange, pending, phase):
        ctx.splits, ctx.exchange = (out_splits, in_splits), exchange
        out, work = exchange.start(x, out_splits, in_splits, phase)
        pending.append(work)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_x, (work, exchange) = ctx.exchange.start(grad, in_splits, out_splits)
        exchange.wait(work)
        return grad_x, None, None, None, None, None


def _a2a(x: Tensor | None, out_splits, in_splits, exchange: _Exchange, pending: list, phase: str):
    return None if x is None else _AllToAll.apply(x, out_splits, in_splits, exchange, pending, phase)


def _wait(pending: list) -> None:
    for work, exchange in pending:
        exchange.wait(work)
    pending.clear()


@dataclass
class DispatchHandle:
    """What `combine` needs to bring a `dispatch`'s rows home."""
    num_tokens: int
    topk: int
    num_nodes: int
    node_index: Tensor        # node rows (one per token and destination node): their slot t * N + m
    local_index: Tensor       # received rows -> rows grouped by local expert
    received: int             # rows this rank received
    back: list                # combine's exchanges: (exchange, splits sent, splits received)
    partial_index: Tensor     # expert-output rows -> slot r * k + j of the node-row sums
    partial_weights: Tensor | None
    partial_rows: int


class ExpertParallelDispatcher:
    """Sends tokens to the ranks of their experts and their outputs back (see the module doc).

    `num_experts` experts, `first_expert` the first one (RRE mode: a domain's experts, on a
    `Topology.split` group), split evenly over the topology's ranks, or as `placement` says
    (`set_placement`; its logical ids count from first_expert). `stats[phase]` accumulates,
    for "dispatch" and "combine" (forward exchanges only), the bytes and messages this rank sent
    to other ranks of its node ("intra_*") and of other nodes ("inter_*"), metadata included.
    """

    def __init__(self, topology: Topology, num_experts: int, strategy: str = "flat", *, first_expert: int = 0,
                 placement: Placement | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        checks.positive_int("num_experts", num_experts)
        checks.non_negative_int("first_expert", first_expert)
        if placement is None and num_experts % topology.world_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the world size ({topology.world_size})")
        self.topology, self.num_experts, self.strategy = topology, num_experts, strategy
        self.first_expert = first_expert
        self.set_placement(placement)
        self.stats: dict[str, dict[str, int]] = {}
        t = topology
        self._flat = self._exchange(t.group, range(t.world_size), "the flat all-to-all")
        self._inter = self._exchange(t.inter_group, t.inter_ranks, "the inter-node all-to-all")
        self._intra = self._exchange(t.intra_group, t.intra_ranks, "the intra-node all-to-all")

    def _exchange(self, group, members, what) -> _Exchange:
        return _Exchange(group, list(members), peer_kinds(self.topology, members), what, self.topology, self.stats)

    def set_placement(self, placement: Placement | None) -> None:
        """Route by `placement` from now on (None: num_experts / W consecutive experts per rank).
        Every rank must set the same one (the next dispatch checks), with the experts it names
        already in the layer (`placement.rebalance` moves them)."""
        W = self.topology.world_size
        if placement is not None:
            if placement.num_ranks != W:
                raise ValueError(f"placement is for {placement.num_ranks} ranks, the topology has {W}")
            placement.check(self.num_experts)
            choice, count = placement.replica_choice(self.topology.rank, self.topology.ranks_per_node)
            self._choice = {"cpu": (choice, count)}
        self.placement = placement
        self.num_physical = self.num_experts if placement is None else placement.num_physical
        self.local_experts = self.num_physical // W
        self.experts_per_node = self.local_experts * self.topology.ranks_per_node

    @property
    def first_local_expert(self) -> int:
        """Global id of this rank's first expert (without a placement)."""
        if self.placement is not None:
            raise ValueError("with a placement a rank's experts need not be consecutive: use local_expert_ids")
        return self.first_expert + self.topology.rank * self.local_experts

    @property
    def local_expert_ids(self) -> Tensor:
        """[local_experts] global logical ids of this rank's (physical) experts, in slot order, on the host."""
        if self.placement is None:
            return torch.arange(self.local_experts, device="cpu") + self.first_local_expert
        return self.placement.experts_of(self.topology.rank) + self.first_expert

    def _physical(self, ids: Tensor) -> Tensor:
        """Logical ids [T, k] (-1 dropped) -> the physical replica each slot uses."""
        key = str(ids.device)
        if key not in self._choice:
            self._choice[key] = tuple(t.to(ids.device) for t in self._choice["cpu"])
        choice, count = self._choice[key]
        safe = ids.clamp_min(0)
        token = torch.arange(ids.shape[0], device=ids.device)[:, None] + self.topology.rank
        pick = choice[safe, token % count[safe]]
        return torch.where(ids >= 0, pick, -1)

    # ---- public API ----

    def dispatch(self, x: Tensor, expert_ids: Tensor, weights: Tensor | None = None):
        """(x_local [S_local, H] grouped by local expert, group_sizes [E_local] int64, handle)."""
        return _complete(self._dispatch(x, expert_ids, weights))

    def combine(self, y_local: Tensor, handle: DispatchHandle) -> Tensor:
        """[T, N]: each token's weighted sum of its experts' outputs, back on its own rank."""
        return _complete(self._combine(y_local, handle))

    def run(self, x: Tensor, expert_ids: Tensor, weights: Tensor | None,
            experts: Callable[[Tensor, Tensor], Tensor], *, chunks: int | str = 1, ffn: int | None = None) -> Tensor:
        """combine(experts(x_local, group_sizes), handle) of dispatch(x, expert_ids, weights), with
        the tokens in `chunks` chunks whose communication overlaps the experts' compute of the
        previous chunk (chunks=1: no overlap). Every rank must pass the same `chunks`.
        chunks="auto": the count the cost model (`pangu_ops.sim`) predicts fastest for the largest
        rank's tokens (one small all-reduce) and the experts' width `ffn` (default: x's width), on
        this device's profile (`sim.default_profile`)."""
        if chunks == "auto":
            chunks = self.auto_chunks(x, expert_ids.shape[1], ffn or x.shape[1])
        checks.positive_int("chunks", chunks)
        T = x.shape[0]
        bounds = [T * c // chunks for c in range(chunks + 1)]

        def piece(c: int):
            a, b = bounds[c], bounds[c + 1]
            x_local, sizes, handle = yield from self._dispatch(x[a:b], expert_ids[a:b],
                                                               None if weights is None else weights[a:b], chunks)
            return (yield from self._combine(experts(x_local, sizes), handle))

        # Round-robin: each chunk runs to its next exchange, starts it and lets the next chunk
        # run; the same schedule on every rank, so the collectives match.
        queue, results = deque((c, piece(c), []) for c in range(chunks)), [None] * chunks
        while queue:
            c, gen, pending = queue.popleft()
            _wait(pending)
            try:
                queue.append((c, gen, next(gen)))
            except StopIteration as done:
                results[c] = done.value
        return torch.cat(results) if chunks > 1 else results[0]

    def auto_chunks(self, x: Tensor, topk: int, ffn: int) -> int:
        """The chunk count the cost model picks for this exchange (the same on every rank)."""
        from .. import sim

        t = self.topology
        tokens = torch.tensor([x.shape[0]], dtype=torch.int64, device=collective_device(t.control_group))
        with collective("chunks='auto' (the largest rank's tokens)", t):
            dist.all_reduce(tokens, op=dist.ReduceOp.MAX, group=t.control_group)
        dtype = str(x.dtype).replace("torch.", "")
        problem = sim.Layer(max(1, int(tokens)), x.shape[1], ffn, self.num_physical, topk,
                            dtype if dtype in sim.model.ELEMENT_BYTES else "float32", t.world_size, t.num_nodes,
                            self.strategy)
        return sim.best_chunks(sim.default_profile(x.device), problem)

    # ---- the steps (generators: each yields the list of exchanges it started, to be waited) ----

    def _validate(self, x: Tensor, expert_ids: Tensor, weights: Tensor | None) -> Tensor:
        checks.tensor("x", x, 2, "[T, H]", checks.FLOAT_DTYPES)
        checks.tensor("expert_ids", expert_ids, 2, "[T, k]", checks.INDEX_DTYPES)
        checks.size("expert_ids", expert_ids.shape[0], x.shape[0], "rows (tokens of x)")
        if weights is not None:
            checks.tensor("weights", weights, 2, "[T, k]", checks.FLOAT_DTYPES)
            if weights.shape != expert_ids.shape:
                raise ValueError(f"weights must be [T, k] = {list(expert_ids.shape)}, got {list(weights.shape)}")
        checks.same_device(x=x, expert_ids=expert_ids, weights=weights)
        lo, hi = self.first_expert, self.first_expert + self.num_experts
        checks.expert_ids_values(expert_ids, self.num_experts, first=lo, op="dispatch",
                                  experts=f"one of this dispatcher's experts [{lo}, {hi})")
        ids = expert_ids.long()
        ids = torch.where(ids >= 0, ids - lo, -1)
        return ids if self.placement is None else self._physical(ids)

    def _agree(self, step: str, signature: dict, error: Exception | None) -> None:
        """All ranks check that they exchange the same kind of rows (or all raise), before any row
        travels: a disagreement would otherwise abort the receivers inside the backend."""
        t = self.topology
        with collective(f"{step} (agreeing on the rows)", t):
            agree(f"{step} on {t}", signature, t.control_group, t.ranks, collective_device(t.control_group), error)

    def _dispatch(self, x: Tensor, expert_ids: Tensor, weights: Tensor | None, chunks: int = 1):
        error = ids = None
        try:
            ids = self._validate(x, expert_ids, weights)
        except (TypeError, ValueError) as e:
            error = e
        ok = error is None
        self._agree("dispatch", {
            "hidden size (x.shape[1])": x.shape[1] if ok else 0, "x dtype": x.dtype if ok else None,
            "top-k (expert_ids.shape[1])": expert_ids.shape[1] if ok else 0,
            "weights dtype": None if not ok or weights is None else weights.dtype,
            "num_experts": self.num_experts, "first_expert": self.first_expert, "strategy": self.strategy,
            "placement": 0 if self.placement is None else self.placement.fingerprint(),
            "ranks_per_node": self.topology.ranks_per_node, "chunks": chunks}, error)
        T, k = ids.shape
        t, E_loc, N = self.topology, self.local_experts, self.topology.num_nodes
        pending: list = []
        x_node, node_sizes, node_index, row_ids, row_weights = node_rows(x, ids, weights, N, self.experts_per_node)
        if self.strategy == "flat":
            # by expert from the node rows, so that the backward sums a token's gradient rows in
            # the hierarchical strategy's order (per node, then across nodes)
            x_sorted, per_expert, partial_index = permute(x_node, row_ids, self.num_physical)
            partial = dict(partial_index=partial_index, partial_weights=row_weights, partial_rows=row_ids.shape[0])
            per_rank = per_expert.view(t.world_size, E_loc)
            from_rank = self._flat.sizes(per_rank)  # [source rank, local expert]
            send, recv = per_rank.sum(1).tolist(), from_rank.sum(1).tolist()
            x_recv = _a2a(x_sorted, recv, send, self._flat, pending, "dispatch")
            yield pending
            back = [(self._flat, send, recv)]
            keys, buckets = torch.arange(E_loc, device=x.device).repeat(t.world_size), E_loc
            key_sizes = from_rank.flatten()
        else:
            from_node = self._inter.sizes(node_sizes)
            send_n, recv_n = node_sizes.tolist(), from_node.tolist()
            x_recv = _a2a(x_node, recv_n, send_n, self._inter, pending, "dispatch")
            ids_recv = _a2a(row_ids, recv_n, send_n, self._inter, pending, "dispatch")
            w_recv = _a2a(row_weights, recv_n, send_n, self._inter, pending, "dispatch")
            yield pending
            ids_recv, x_fan, fan_index, per_key = fan_out(x_recv, ids_recv, from_node.to(x.device), t.node, N,
                                                          self.experts_per_node)
            per_key = per_key.view(t.ranks_per_node, E_loc * N)
            from_gateway = self._intra.sizes(per_key)  # [gateway, (local expert, source node)]
            send_i, recv_i = per_key.sum(1).tolist(), from_gateway.sum(1).tolist()
            x_recv = _a2a(x_fan, recv_i, send_i, self._intra, pending, "dispatch")
            yield pending
            back = [(self._intra, send_i, recv_i), (self._inter, send_n, recv_n)]
            partial = dict(partial_index=fan_index, partial_weights=w_recv, partial_rows=ids_recv.shape[0])
            # received: by gateway, then (local expert, source node); regroup by (expert, source
            # node), stable, i.e. by expert and source rank as in the flat strategy
            keys, buckets = torch.arange(E_loc * N, device=x.device).repeat(t.ranks_per_node), E_loc * N
            key_sizes = from_gateway.flatten()
        x_local, sizes, local_index = regroup(x_recv, keys, key_sizes.to(x.device), buckets)
        sizes = sizes.view(E_loc, -1).sum(1)
        handle = DispatchHandle(T, k, N, node_index, local_index, x_recv.shape[0], back, **partial)
        return x_local, sizes, handle

    def _combine(self, y_local: Tensor, handle: DispatchHandle):
        error = None
        try:
            checks.tensor("y_local", y_local, 2, "[S_local, N]", checks.FLOAT_DTYPES)
            checks.size("y_local", y_local.shape[0], handle.local_index.shape[0], "rows (rows dispatched here)")
        except (TypeError, ValueError) as e:
            error = e
        ok = error is None
        self._agree("combine", {"output width (y_local.shape[1])": y_local.shape[1] if ok else 0,
                                "y_local dtype": y_local.dtype if ok else None}, error)
        pending: list = []
        y = unpermute(y_local, handle.local_index, None, handle.received, topk=1)  # arrival order
        (exchange, send, recv), *rest = handle.back
        y = _a2a(y, send, recv, exchange, pending, "combine")
        yield pending
        partial = unpermute(y, handle.partial_index, handle.partial_weights, handle.partial_rows, topk=handle.topk)
        for exchange, send, recv in rest:
            partial = _a2a(partial, send, recv, exchange, pending, "combine")
            yield pending
        return unpermute(partial, handle.node_index, None, handle.num_tokens, topk=handle.num_nodes)


# ---- the local steps: pangu_ops kernels and torch ops only (no communication, no host reads),
# so that they compile with torch.compile(fullgraph=True) ----

def node_rows(x: Tensor, ids: Tensor, weights: Tensor | None, num_nodes: int, experts_per_node: int):
    """Node rows: `permute` of x by destination node (one row per token and node it needs), with
    each row's expert ids restricted to the node (-1: slot on another node, or dropped) and
    weights. Returns (x_node, node_sizes, node_index, row_ids, row_weights)."""
    T, k = ids.shape
    N = num_nodes
    node_of = torch.where(ids >= 0, ids // experts_per_node, N)
    needs = torch.zeros(T, N + 1, dtype=torch.bool, device=ids.device).scatter_(1, node_of, True)[:, :N]
    node_ids = torch.where(needs, torch.arange(N, device=ids.device), -1)
    x_node, node_sizes, node_index = permute(x, node_ids, N)
    token, node = node_index // N, node_index % N
    ids_t = ids[token]
    on_node = (ids_t >= 0) & (node_of[token] == node[:, None])
    row_ids = torch.where(on_node, ids_t, -1).to(torch.int32)
    row_weights = None if weights is None else weights[token]
    return x_node, node_sizes, node_index, row_ids, row_weights


def fan_out(x_recv: Tensor, ids_recv: Tensor, from_node: Tensor, node: int, num_nodes: int, experts_per_node: int):
    """The gateway's step: each received node row fanned out to its node's experts (`permute` by
    node-local expert, i.e. by (rank, local expert)). `from_node[m]`: rows received from node m.
    Returns (node-local ids, x_fan, fan_index, rows per (node-local expert, source node))."""
    N, EPN = num_nodes, experts_per_node
    ids_recv = torch.where(ids_recv >= 0, ids_recv - node * EPN, -1)
    x_fan, _, fan_index = permute(x_recv, ids_recv, EPN)
    src_node = torch.repeat_interleave(torch.arange(N, device=x_recv.device), from_node)
    key = torch.where(ids_recv >= 0, ids_recv.long() * N + src_node[:, None], EPN * N)  # -1: the spare bucket
    per_key = torch.zeros(EPN * N + 1, dtype=torch.int64, device=x_recv.device)
    per_key.scatter_add_(0, key.flatten(), torch.ones_like(key.flatten()))
    return ids_recv, x_fan, fan_index, per_key[:-1]


def regroup(x_recv: Tensor, keys: Tensor, key_sizes: Tensor, buckets: int):
    """Received rows arrive in runs: `key_sizes[i]` rows of key `keys[i]`; `permute` them by key
    (stable). Returns permute's (rows, sizes per key, index)."""
    row_keys = torch.repeat_interleave(keys, key_sizes)
    return permute(x_recv, row_keys[:, None], buckets)


def _complete(steps):
    """Runs a step generator to its end, waiting for each batch of exchanges it starts."""
    try:
        pending = next(steps)
        while True:
            _wait(pending)
            pending = steps.send(None)
    except StopIteration as done:
        return done.value


__all__ = ["DispatchHandle", "ExpertParallelDispatcher", "STRATEGIES"]
