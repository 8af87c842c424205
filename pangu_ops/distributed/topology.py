"""Ranks grouped into nodes, and the process groups of a hierarchical all-to-all."""
from __future__ import annotations

import datetime
import os

import torch.distributed as dist

from .agreement import agree, collective_device


def _new_group(ranks: list[int], timeout: datetime.timedelta | None):
    return dist.new_group(ranks, timeout=timeout) if timeout is not None else dist.new_group(ranks)


class Topology:
    """`world_size` ranks as nodes of `ranks_per_node` consecutive ranks (rank = node * R + local).

    Builds, once, the group of all its ranks (and a twin for control messages), the intra-node group of every node and the inter-node
    group of every local index (the ranks with the same local index on each node). `dist.new_group`
    is collective, so every rank must construct the Topology (and call `split`) in the same order
    as its other groups. `ranks_per_node` defaults to the launcher's LOCAL_WORLD_SIZE (torchrun
    sets it). `timeout` bounds every collective on these groups: a peer that died or hangs makes
    the others raise instead of waiting forever (default: the default group's timeout).
    """

    def __init__(self, world_size: int | None = None, ranks_per_node: int | None = None, *,
                 timeout: datetime.timedelta | float | None = None):
        if not dist.is_initialized():
            raise RuntimeError("Topology needs torch.distributed initialised (init_process_group / torchrun)")
        world = dist.get_world_size()
        if ranks_per_node is None:
            ranks_per_node = min(int(os.environ.get("LOCAL_WORLD_SIZE", world)), world)
        if isinstance(timeout, (int, float)):
            timeout = datetime.timedelta(seconds=timeout)
        error = None
        if world_size is not None and world_size != world:
            error = ValueError(f"world_size {world_size} differs from the process group's {world}")
        elif not isinstance(ranks_per_node, int) or ranks_per_node <= 0 or world % ranks_per_node:
            error = ValueError(f"ranks_per_node ({ranks_per_node}) must divide the number of ranks ({world})")
        # every rank builds the same groups, or all of them raise (new_group with other members hangs)
        agree("Topology", {"ranks_per_node": ranks_per_node if error is None else 0,
                           "timeout (ms)": int(timeout.total_seconds() * 1000) if timeout else 0},
              None, list(range(world)), collective_device(), error)
        self.timeout = timeout
        self._build(list(range(world)), ranks_per_node)

    def _build(self, ranks: list[int], ranks_per_node: int) -> None:
        """Creates this topology's groups (collective over the whole world) and keeps this rank's."""
        W, R = len(ranks), ranks_per_node
        if R <= 0 or W % R:
            raise ValueError(f"ranks_per_node ({R}) must divide the number of ranks ({W})")
        self.ranks, self.world_size, self.ranks_per_node, self.num_nodes = ranks, W, R, W // R
        me = dist.get_rank()
        self.rank = ranks.index(me) if me in ranks else -1
        self.node, self.local_rank = divmod(self.rank, R)
        self.group = _new_group(ranks, self.timeout)
        # small control messages (split sizes) travel apart from the data: on gloo a group is its
        # own set of connections, so they do not queue behind another chunk's rows in flight
        self.control_group = _new_group(ranks, self.timeout)
        self.intra_group = self.inter_group = None
        for n in range(self.num_nodes):  # every rank takes part in creating every group
            group = _new_group(ranks[n * R:(n + 1) * R], self.timeout)
            if n == self.node:
                self.intra_group = group
        for l in range(R):
            group = _new_group(ranks[l::R], self.timeout)
            if l == self.local_rank:
                self.inter_group = group

    def split(self, group_size: int) -> "Topology":
        """This rank's part of the world cut into groups of `group_size` consecutive ranks (e.g. the
        devices of one RRE domain, whose tokens never leave them), with its own node structure:
        a group inside one node has one node; a group spanning nodes keeps `ranks_per_node`.
        Collective: every rank calls it with the same size."""
        W, R = self.world_size, self.ranks_per_node
        error = None
        if not isinstance(group_size, int) or group_size <= 0 or W % group_size:
            error = ValueError(f"group_size ({group_size}) must divide the world size ({W})")
        elif R % group_size and group_size % R:
            error = ValueError(f"group_size ({group_size}) must divide ranks_per_node ({R}) or be a multiple of it")
        world = dist.get_world_size()
        agree("Topology.split", {"group_size": group_size if error is None else 0}, None, list(range(world)),
              collective_device(), error)
        sub_r = min(group_size, R)
        mine = None
        for g in range(W // group_size):
            sub = object.__new__(Topology)
            sub.timeout = self.timeout
            sub._build(self.ranks[g * group_size:(g + 1) * group_size], sub_r)
            if sub.rank >= 0:
                mine = sub
        return mine

    @property
    def intra_ranks(self) -> range:
        """This topology's ranks in this rank's intra-node group, in group order."""
        return range(self.node * self.ranks_per_node, (self.node + 1) * self.ranks_per_node)

    @property
    def inter_ranks(self) -> range:
        """This topology's ranks in this rank's inter-node group (one per node), in group order."""
        return range(self.local_rank, self.world_size, self.ranks_per_node)

    def global_rank(self, node: int, local_rank: int) -> int:
        return self.ranks[node * self.ranks_per_node + local_rank]

    def __repr__(self) -> str:
        return (f"Topology(world_size={self.world_size}, ranks_per_node={self.ranks_per_node}, "
                f"rank={self.rank} = node {self.node} local {self.local_rank})")
