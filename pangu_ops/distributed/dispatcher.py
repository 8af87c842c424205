"""Expert-parallel token dispatch: each rank owns E / W consecutive experts; tokens travel to the
ranks of their experts and back, differentiably, on torch.distributed.

dispatch: `permute` by global expert (rows then lie grouped by destination rank), one all-to-all
of the rows (flat, or `hierarchical_all_to_all`), then `permute` of the received rows by local
expert. combine: the inverse path, ending in `unpermute` with the gate weights (fp32 sums).
Strategy "hierarchical" sends one inter-node message per node instead of one per rank; the
per-node deduplication of tokens bound for several experts of one node (fewer inter-node bytes) is
not implemented yet.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..ops import _checks, permute, unpermute
from .all_to_all import add_stats, flat_all_to_all_stats, hierarchical_all_to_all
from .topology import Topology


class _AllToAll(torch.autograd.Function):
    """Rows of x to other ranks; the backward sends the gradient rows back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, dispatcher):
        ctx.splits, ctx.dispatcher = (out_splits, in_splits), dispatcher
        return dispatcher.exchange(x, out_splits, in_splits)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return ctx.dispatcher.exchange(grad, in_splits, out_splits, count=False), None, None, None


@dataclass
class DispatchHandle:
    sorted_index: Tensor  # from the global permute
    weights: Tensor | None
    num_tokens: int
    topk: int
    send_splits: list[int]
    recv_splits: list[int]
    local_index: Tensor  # from the permute by local expert
    received: int


class ExpertParallelDispatcher:
    def __init__(self, topology: Topology, num_experts: int, strategy: str = "flat"):
        if strategy not in ("flat", "hierarchical"):
            raise ValueError(f"strategy must be 'flat' or 'hierarchical', got {strategy!r}")
        if num_experts % topology.world_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the world size ({topology.world_size})")
        self.topology, self.num_experts, self.strategy = topology, num_experts, strategy
        self.local_experts = num_experts // topology.world_size
        self.stats: dict[str, int] = {}

    @property
    def first_local_expert(self) -> int:
        return self.topology.rank * self.local_experts

    def dispatch(self, x: Tensor, expert_ids: Tensor, weights: Tensor | None = None):
        """(x_local [S_local, H] grouped by local expert, group_sizes [E_local], handle)."""
        _checks.tensor("expert_ids", expert_ids, 2, "[T, k]", _checks.INDEX_DTYPES)
        W, E_loc = self.topology.world_size, self.local_experts
        x_sorted, group_sizes, sorted_index = permute(x, expert_ids, self.num_experts)
        per_expert = group_sizes.view(W, E_loc)
        received_per_expert = torch.empty_like(per_expert)
        dist.all_to_all_single(received_per_expert, per_expert)  # [source rank, local expert]
        send = per_expert.sum(1).tolist()
        recv = received_per_expert.sum(1).tolist()
        x_recv = _AllToAll.apply(x_sorted, recv, send, self)
        # received rows: by source rank, then local expert; regroup them by local expert
        local_ids = torch.repeat_interleave(torch.arange(E_loc, device=x.device).repeat(W),
                                            received_per_expert.flatten().to(x.device))
        x_local, local_sizes, local_index = permute(x_recv, local_ids.unsqueeze(1), E_loc)
        handle = DispatchHandle(sorted_index, weights, expert_ids.shape[0], expert_ids.shape[1], send, recv,
                                local_index, x_recv.shape[0])
        return x_local, local_sizes, handle

    def combine(self, y_local: Tensor, handle: DispatchHandle) -> Tensor:
        """[T, N]: each token's weighted sum of its experts' outputs, back on its own rank."""
        y_recv = unpermute(y_local, handle.local_index, None, handle.received, topk=1)
        y_sorted = _AllToAll.apply(y_recv, handle.send_splits, handle.recv_splits, self)
        return unpermute(y_sorted, handle.sorted_index, handle.weights, handle.num_tokens, topk=handle.topk)

    def exchange(self, x: Tensor, out_splits: list[int], in_splits: list[int], count: bool = True) -> Tensor:
        """One all-to-all of rows with this dispatcher's strategy; `count` adds it to `stats`
        (bytes and messages this rank sent intra- and inter-node; forward exchanges only)."""
        x = x.contiguous()
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        stats = self.stats if count else None
        if self.strategy == "hierarchical":
            return hierarchical_all_to_all(out, x, out_splits, in_splits, self.topology, stats=stats)
        dist.all_to_all_single(out, x, out_splits, in_splits)
        if stats is not None:
            row_bytes = x[0:1].numel() * x.element_size()
            add_stats(stats, flat_all_to_all_stats(in_splits, self.topology, row_bytes))
        return out
