"""Ranks grouped into nodes, and the process groups of a hierarchical all-to-all."""
from __future__ import annotations

import os

import torch.distributed as dist


class Topology:
    """`world_size` ranks as nodes of `ranks_per_node` consecutive ranks (rank = node * R + local).

    Builds, once, the intra-node group of every node and the inter-node group of every local index
    (the ranks with the same local index on each node); `dist.new_group` is collective, so every
    rank must construct the Topology, in the same order as its other groups.
    `ranks_per_node` defaults to the launcher's LOCAL_WORLD_SIZE (torchrun sets it).
    """

    def __init__(self, world_size: int | None = None, ranks_per_node: int | None = None):
        if not dist.is_initialized():
            raise RuntimeError("Topology needs torch.distributed initialised (init_process_group / torchrun)")
        self.world_size = dist.get_world_size() if world_size is None else world_size
        if self.world_size != dist.get_world_size():
            raise ValueError(f"world_size {self.world_size} differs from the process group's {dist.get_world_size()}")
        if ranks_per_node is None:
            ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        if ranks_per_node <= 0 or self.world_size % ranks_per_node:
            raise ValueError(f"ranks_per_node ({ranks_per_node}) must divide world_size ({self.world_size})")
        self.ranks_per_node = ranks_per_node
        self.num_nodes = self.world_size // ranks_per_node
        self.rank = dist.get_rank()
        self.node, self.local_rank = divmod(self.rank, ranks_per_node)
        R, N = ranks_per_node, self.num_nodes
        self.intra_group = self.inter_group = None
        for n in range(N):  # every rank takes part in creating every group
            group = dist.new_group([n * R + l for l in range(R)])
            if n == self.node:
                self.intra_group = group
        for l in range(R):
            group = dist.new_group([n * R + l for n in range(N)])
            if l == self.local_rank:
                self.inter_group = group

    def global_rank(self, node: int, local_rank: int) -> int:
        return node * self.ranks_per_node + local_rank

    def __repr__(self) -> str:
        return (f"Topology(world_size={self.world_size}, ranks_per_node={self.ranks_per_node}, "
                f"rank={self.rank} = node {self.node} local {self.local_rank})")
