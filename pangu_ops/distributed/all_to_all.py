"""Hierarchical all-to-all with the semantics of `dist.all_to_all_single` (uneven splits).

Two phases over a `Topology` of N nodes x R ranks (Tutel's 2DH, Pangu Ultra MoE's hierarchical EP):
  A. intra-node: rank (n, l) sends its local peer (n, l') every chunk bound for a rank with local
     index l' on any node (chunks ordered by destination node);
  B. inter-node: rank (n, l') sends rank (m, l') the chunks of all of node n's ranks bound for
     (m, l'), in one message per destination node instead of one per destination rank.
The chunks then arrive ordered by source node, then source local rank: the global source order,
so the result is bit-identical to the flat all-to-all. Each rank sends N - 1 inter-node messages
instead of (N - 1) * R. (Cutting inter-node *bytes* needs token deduplication, which the expert-
parallel dispatcher does on top of this.)
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .. import checks
from .agreement import agree, all_gather_into_tensor, collective_device
from .topology import Topology


class CommunicationError(RuntimeError):
    """A collective of the expert-parallel exchange failed: a peer rank died, hung past the
    topology's timeout, or the ranks disagree on what they exchange."""


@contextlib.contextmanager
def collective(what: str, topology: Topology):
    """Turns the backend's failure of a collective (gloo: "Timed out waiting ...", "Connection
    closed by peer") into a CommunicationError naming the step, this rank and the timeout."""
    try:
        yield
    except CommunicationError:
        raise
    except RuntimeError as err:
        timeout = f"{topology.timeout.total_seconds():g} s" if topology.timeout else "the default group's"
        raise CommunicationError(
            f"{what} failed on rank {topology.rank} of {topology}: a peer rank died, hung or exceeded the "
            f"timeout ({timeout}). Backend error: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err


def exchange_split_sizes(input_split_sizes: list[int], topology: Topology) -> torch.Tensor:
    """[W, W] matrix of rows sent: entry [i, j] is what rank i sends rank j (one all-gather, on the
    group's collective device: NCCL takes CUDA tensors only)."""
    device = collective_device(topology.group)
    mine = torch.tensor(input_split_sizes, dtype=torch.int64, device=device)
    everyone = torch.empty(topology.world_size * topology.world_size, dtype=torch.int64, device=device)
    with collective("exchanging the split sizes", topology):
        all_gather_into_tensor(everyone, mine, group=topology.group)
    return everyone.view(topology.world_size, topology.world_size)


def _chunks(sizes: list[int]) -> list[tuple[int, int]]:
    starts, pos = [], 0
    for s in sizes:
        starts.append((pos, s))
        pos += s
    return starts


def _gather_chunks(t: torch.Tensor, chunks: list[tuple[int, int]]) -> torch.Tensor:
    """Rows of the listed (start, length) chunks of t, in list order, as one tensor (one gather)."""
    if not chunks:
        return t[:0]
    index = torch.cat([torch.arange(s, s + n) for s, n in chunks]).to(t.device)
    return t.index_select(0, index)


def hierarchical_all_to_all(output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int],
                            input_split_sizes: list[int], topology: Topology,
                            stats: dict | None = None) -> torch.Tensor:
    """Fills `output` exactly as `dist.all_to_all_single(output, input, output_split_sizes,
    input_split_sizes)` would, in two phases (see the module docstring). `stats`, when given,
    accumulates the bytes and messages this rank sent intra- and inter-node."""
    W, R, N = topology.world_size, topology.ranks_per_node, topology.num_nodes
    checks.size("input_split_sizes", len(input_split_sizes), W, "length (world size)")
    checks.size("output_split_sizes", len(output_split_sizes), W, "length (world size)")
    checks.size("input", input.shape[0], sum(input_split_sizes), "rows (sum of input_split_sizes)")
    checks.size("output", output.shape[0], sum(output_split_sizes), "rows (sum of output_split_sizes)")
    with collective("the hierarchical all-to-all (agreeing on the rows)", topology):
        agree("hierarchical_all_to_all", {"row shape (input.shape[1:]) elements": bytes_per_row(input) // input.element_size(),
                                          "dtype": input.dtype}, topology.group, topology.ranks, input.device)
    sizes = exchange_split_sizes(input_split_sizes, topology).tolist()  # sizes[src][dst]
    if [sizes[src][topology.rank] for src in range(W)] != list(output_split_sizes):
        raise ValueError("output_split_sizes do not match what the other ranks send to this rank")
    n, l = topology.node, topology.local_rank
    rank = topology.rank

    # Phase A: group my chunks by destination local index l', then by destination node m.
    my_chunks = _chunks(sizes[rank])
    order_a = [my_chunks[m * R + lp] for lp in range(R) for m in range(N)]
    send_a = _gather_chunks(input, order_a)
    split_a = [sum(sizes[rank][m * R + lp] for m in range(N)) for lp in range(R)]
    recv_a_split = [sum(sizes[n * R + src_l][m * R + l] for m in range(N)) for src_l in range(R)]
    recv_a = input.new_empty((sum(recv_a_split),) + tuple(input.shape[1:]))
    with collective("the intra-node phase of the hierarchical all-to-all", topology):
        dist.all_to_all_single(recv_a, send_a, recv_a_split, split_a, group=topology.intra_group)

    # recv_a holds, per local source l_s (in order), its chunks bound for (m, l), m in order.
    # Phase B: regroup by destination node m, local sources in order, and send across nodes.
    pos, where = 0, {}
    for src_l in range(R):
        for m in range(N):
            size = sizes[n * R + src_l][m * R + l]
            where[(src_l, m)] = (pos, size)
            pos += size
    send_b = _gather_chunks(recv_a, [where[(src_l, m)] for m in range(N) for src_l in range(R)])
    split_b = [sum(sizes[n * R + src_l][m * R + l] for src_l in range(R)) for m in range(N)]
    recv_b_split = [sum(sizes[src_n * R + src_l][rank] for src_l in range(R)) for src_n in range(N)]
    with collective("the inter-node phase of the hierarchical all-to-all", topology):
        dist.all_to_all_single(output, send_b, recv_b_split, split_b, group=topology.inter_group)

    if stats is not None:
        row_bytes = bytes_per_row(input)
        add_stats(stats, sent_stats(peer_kinds(topology, topology.intra_ranks), split_a, row_bytes))
        add_stats(stats, sent_stats(peer_kinds(topology, topology.inter_ranks), split_b, row_bytes))
    return output


def add_stats(stats: dict, sent: dict) -> None:
    """Accumulates one exchange's byte and message counts into `stats`."""
    for key, value in sent.items():
        stats[key] = stats.get(key, 0) + value


def bytes_per_row(t: torch.Tensor) -> int:
    """Bytes of one row (dim 0 slice) of t."""
    return t[0:1].numel() * t.element_size() if t.dim() > 1 else t.element_size()


def peer_kinds(topology: Topology, members) -> list[str | None]:
    """For each topology rank in `members`: None (this rank), "intra" (its node) or "inter"."""
    R = topology.ranks_per_node
    return [None if r == topology.rank else "intra" if r // R == topology.node else "inter" for r in members]


def sent_stats(peers: list[str | None], splits: list[int], row_bytes: int) -> dict:
    """Bytes and messages of sending splits[g] rows to peer g, split intra/inter-node (nothing to
    this rank itself, no message for an empty split)."""
    sent = {"intra_bytes": 0, "inter_bytes": 0, "intra_messages": 0, "inter_messages": 0}
    for peer, s in zip(peers, splits):
        if peer and s:
            sent[f"{peer}_bytes"] += s * row_bytes
            sent[f"{peer}_messages"] += 1
    return sent


def flat_all_to_all_stats(input_split_sizes: list[int], topology: Topology, row_bytes: int) -> dict:
    """Bytes and messages the flat all-to-all sends from this rank, split intra/inter-node."""
    return sent_stats(peer_kinds(topology, range(topology.world_size)), input_split_sizes, row_bytes)
