"""hierarchical_all_to_all over gloo ranks is bit-identical to the flat all_to_all_single, with
uneven and zero splits; rows carry their sender and destination (DeepEP's test pattern)."""
import pytest
import torch
import torch.distributed as dist

from pangu_ops.distributed import Topology, flat_all_to_all_stats, hierarchical_all_to_all

from gloo import run_ranks


def _splits(world: int, seed: int) -> torch.Tensor:
    """[W, W] rows sent src -> dst: random, some zero."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 5, (world, world), generator=gen)
    sizes[torch.rand(world, world, generator=gen) < 0.25] = 0
    return sizes


def _exchange(rank: int, ranks_per_node: int, seed: int):
    topo = Topology(ranks_per_node=ranks_per_node)
    world = topo.world_size
    sizes = _splits(world, seed)
    send, recv = sizes[rank].tolist(), sizes[:, rank].tolist()
    # Row i of the chunk for dst: [sender, dst, i, random payload...]: exactly where each row came from.
    rows = [torch.cat([torch.tensor([[rank, dst, i]], dtype=torch.float32).expand(1, 3),
                       torch.randn(1, 5)], 1) for dst in range(world) for i in range(send[dst])]
    x = torch.cat(rows) if rows else torch.empty(0, 8)
    flat = torch.empty(sum(recv), 8)
    dist.all_to_all_single(flat, x, recv, send)
    hier = torch.empty(sum(recv), 8)
    stats = {}
    hierarchical_all_to_all(hier, x, recv, send, topo, stats=stats)
    return flat, hier, stats, flat_all_to_all_stats(send, topo, 8 * 4), send, recv


@pytest.mark.parametrize("nodes, ranks_per_node", [(2, 2), (2, 3)])
def test_hierarchical_equals_flat(nodes, ranks_per_node):
    world = nodes * ranks_per_node
    results = run_ranks(world, _exchange, ranks_per_node, 7 + world)
    for rank, (flat, hier, stats, flat_stats, send, recv) in results.items():
        assert torch.equal(hier, flat)  # bitwise
        expected_rows = [(src, rank, i) for src in range(world) for i in range(_splits(world, 7 + world)[src, rank])]
        assert [tuple(int(v) for v in row[:3]) for row in flat] == expected_rows
        assert stats["inter_messages"] <= nodes - 1  # one message per other node at most
    # the same bytes cross between nodes in all (a rank forwards its node's rows), in fewer messages
    total = {k: sum(r[2][k] for r in results.values()) for k in ("inter_bytes", "inter_messages")}
    flat_total = {k: sum(r[3][k] for r in results.values()) for k in ("inter_bytes", "inter_messages")}
    assert total["inter_bytes"] == flat_total["inter_bytes"]
    assert total["inter_messages"] <= flat_total["inter_messages"]


def _bad_sizes(rank: int):
    topo = Topology(ranks_per_node=1)
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="input: expected rows"):
        hierarchical_all_to_all(torch.empty(3, 2), x, [1, 2], [1, 1], topo)
    return True


def test_bad_split_sizes_raise():
    assert all(run_ranks(2, _bad_sizes).values())
