"""The cost model: a MoE layer's forward (or forward + backward) time as a sum of plain terms,
each from the profile, and chunked overlap as a pipeline.

For T tokens per rank, top-k of E experts, W ranks in N nodes of R = W / N ranks, S = T * k slots
per rank, routing uniform over the experts except for `imbalance` (max / mean rows per rank):
- dispatch and combine exchange, per rank and direction (rows of H values):
  flat: S (W - R) / W rows to other nodes and S (R - 1) / W to the rest of the node, one
  all-to-all; hierarchical: each token once per node it needs (n_hit = N (1 - (1 - 1/N)^k) nodes
  on average), T n_hit (N - 1) / N rows inter-node, then the gateway's fan-out S (R - 1) / R rows
  intra-node; each all-to-all pays its link's latency plus bytes / rate, and its split sizes a
  control collective; every dispatch and combine one agreement collective;
- local data movement: the permute / unpermute passes of each strategy over their rows;
- experts: the slowest rank's rows (S * imbalance) over its E / W experts;
- chunks: C pieces through dispatch -> experts -> combine; sequentially that costs the sum of the
  pieces (latencies and per-expert costs paid C times), pipelined the first piece plus (C - 1)
  times the slowest stage; the profile's `overlap` says how much of that saving a machine gets
  (ranks sharing cores cannot overlap much). The backward exchanges synchronously (no overlap).
On ranks sharing cores, compute is stretched by ranks / cores.

A decoder block (`block=True`, pre-norm as `nn.DecoderBlock`) adds, per rank, replicated (data
parallel) work around the layer: the attention's projections (8 T H^2 flops: q, k, v and out) and
the router (2 T H E, fp32) at the profile's dense GEMM rate, causal attention over sequences of
`seq` tokens (2 T seq H flops: scores and values, half of the full square) at its attention rate,
and the two norms and residual adds (about 10 passes over T x H values). Their backward multiplies
each flop term by its measured factor; none of it overlaps the exchange.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .profile import Profile

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Layer:
    """One MoE layer's problem as the model sees it."""

    tokens: int  # per rank
    hidden: int
    ffn: int
    experts: int
    topk: int
    dtype: str = "bfloat16"
    ranks: int = 1
    nodes: int = 1
    strategy: str = "flat"  # with ranks > 1
    chunks: int = 1
    imbalance: float = 1.0  # max / mean rows per rank (1: uniform; from a placement or a skew)
    backward: bool = False  # forward + backward
    block: bool = False  # a whole decoder block: attention, norms and router around the MoE layer
    seq: int = 0  # the block's sequence length (0: one sequence of `tokens`)

    def __post_init__(self):
        if self.ranks % self.nodes or self.experts % self.ranks:
            raise ValueError(f"ranks ({self.ranks}) must split into nodes ({self.nodes}) and divide the experts "
                             f"({self.experts})")
        if self.dtype not in ELEMENT_BYTES:
            raise ValueError(f"dtype must be one of {list(ELEMENT_BYTES)}, got {self.dtype!r}")


def expert_time(p: Profile, dtype: str, experts: int, rows: float, hidden: int, ffn: int, backward: bool) -> float:
    """expert_mlp over `experts` experts sharing `rows` rows evenly (the profile's rate curve)."""
    e = p.experts[dtype]
    if rows <= 0:
        return 0.0
    active = min(experts, rows)
    m = rows / active
    flops = 6.0 * rows * hidden * ffn * ((1.0 + e.bwd_factor) if backward else 1.0)
    slowdown = 1.0 + e.half_rows / m + e.half_width / min(hidden, ffn)
    return active * e.per_expert_s * (2.0 if backward else 1.0) + flops * slowdown / e.peak_flops


def move_time(p: Profile, rows: float, width: int, element_bytes: int, passes: int = 1) -> float:
    """`passes` permute / unpermute passes over `rows` rows (read + write)."""
    return passes * p.move_per_call_s + 2.0 * rows * width * element_bytes / p.move_bytes_per_s


def nodes_hit(nodes: int, topk: int) -> float:
    return nodes * (1.0 - (1.0 - 1.0 / nodes) ** topk)


def exchange_terms(p: Profile, c: Layer) -> dict[str, float]:
    """Dispatch and combine of the whole batch (one chunk): seconds per term. Collectives per
    step: flat, 2 data all-to-alls (one each way) and 3 control ones (each direction's agreement,
    the split sizes); hierarchical, 4 inter-node data all-to-alls (rows, ids and weights there, rows
    back), 2 intra-node ones (fan-out there and back) and 4 control ones."""
    W, N = c.ranks, c.nodes
    R = W // N
    S = c.tokens * c.topk
    row = c.hidden * ELEMENT_BYTES[c.dtype]
    inter, intra = p.link("inter", W), p.link("intra", W)
    if c.strategy == "flat":
        inter_rows, intra_rows = S * (W - R) / W, S * (R - 1) / W
        calls = {"inter": 2 if N > 1 else 0, "intra": 2 if N == 1 else 0}
        control = 3
    else:
        inter_rows, intra_rows = c.tokens * nodes_hit(N, c.topk) * (N - 1) / N, S * (R - 1) / R
        calls = {"inter": 4 if N > 1 else 0, "intra": 2 if R > 1 else 0}
        control = 4
    out = {"inter bytes": 2 * inter_rows * row / inter.bytes_per_s, "intra bytes": 2 * intra_rows * row / intra.bytes_per_s}
    fixed = p.step_fixed(c.strategy, W)
    if fixed is not None:
        out["collectives (measured fixed cost)"] = fixed
    else:
        out.update({"inter latency": calls["inter"] * inter.latency_s, "intra latency": calls["intra"] * intra.latency_s,
                    "control collectives": control * p.collective_s})
    return out


def local_terms(p: Profile, c: Layer) -> float:
    """The permute / unpermute passes of one direction (dispatch or combine)."""
    S = c.tokens * c.topk
    if c.ranks == 1:
        return move_time(p, S, c.hidden, ELEMENT_BYTES[c.dtype])
    node_rows = c.tokens * nodes_hit(c.nodes, c.topk)
    passes = 3 if c.strategy == "flat" else 4
    rows = node_rows + (passes - 1) * S
    return move_time(p, rows / passes, c.hidden, ELEMENT_BYTES[c.dtype], passes)


def block_terms(p: Profile, c: Layer) -> dict[str, float]:
    """A decoder block's work besides the MoE layer, per rank (seconds per term, unscaled)."""
    if not (p.dense and p.attention):
        raise ValueError(f"profile {p.name!r} has no dense GEMM / attention rates: recalibrate (pangu-ops plan "
                         "--calibrate) to predict decoder blocks")
    T, H = c.tokens, c.hidden
    seq = min(c.seq or T, T)
    dense, router, attn = p.dense[c.dtype], p.dense["float32"], p.attention[c.dtype]
    return {"attention GEMMs": dense.time(8.0 * T * H * H, 2, c.backward),
            "attention": attn.time(2.0 * T * seq * H, 1, c.backward),
            "router": router.time(2.0 * T * H * c.experts, 1, c.backward),
            "norms and residuals": move_time(p, 5.0 * T, H, ELEMENT_BYTES[c.dtype], 4) * (2 if c.backward else 1)}


def predict(p: Profile, c: Layer) -> dict[str, float]:
    """Seconds per term and `total` for layer (or block) problem `c` on profile `p`."""
    out = _predict_layer(p, c)
    if c.block:
        terms = {k: v * p.compute_scale(c.ranks) for k, v in block_terms(p, c).items()}
        out.update(terms)
        out["total"] += sum(terms.values())
    return out


def _predict_layer(p: Profile, c: Layer) -> dict[str, float]:
    scale = p.compute_scale(c.ranks)
    E_local = c.experts // c.ranks
    rows = c.tokens * c.topk * c.imbalance
    experts = expert_time(p, c.dtype, E_local, rows, c.hidden, c.ffn, False) * scale
    local = 2 * local_terms(p, c) * scale  # dispatch + combine
    out = {"experts": experts, "local moves": local}
    if c.ranks == 1:
        if c.backward:
            out["experts"] = expert_time(p, c.dtype, E_local, rows, c.hidden, c.ffn, True) * scale
            out["local moves"] = 2 * local
        out["total"] = sum(out.values())
        return out
    both_ways = exchange_terms(p, c)
    comm = sum(both_ways.values())  # dispatch + combine
    out.update(both_ways)
    C = c.chunks
    if C == 1:
        forward = comm + experts + local
    else:
        piece = replace(c, tokens=max(1, c.tokens // C), chunks=1)
        comm_c = sum(exchange_terms(p, piece).values())
        exp_c = expert_time(p, c.dtype, E_local, rows / C, c.hidden, c.ffn, False) * scale
        local_c = local / C + 2 * p.move_per_call_s * scale
        sequential = C * (comm_c + exp_c + local_c)
        pipelined = comm_c + exp_c + local_c + (C - 1) * max(comm_c, exp_c + local_c)
        forward = sequential - p.overlap * (sequential - pipelined)
        out["chunking"] = forward - (comm + experts + local)
    if c.backward:  # experts' backward, the exchanges again (synchronous), local passes again
        bwd_experts = expert_time(p, c.dtype, E_local, rows, c.hidden, c.ffn, True) * scale - experts
        out["backward"] = bwd_experts + comm + local + (C - 1) * sum(
            v for k, v in both_ways.items() if "bytes" not in k)
        forward += out["backward"]
    out["total"] = forward
    return out


def candidates(c: Layer, max_chunks: int = 8) -> list[Layer]:
    """Every strategy x chunks (1, 2, 4, ... max_chunks) of problem c (one rank: itself)."""
    if c.ranks == 1:
        return [c]
    strategies = ["flat", "hierarchical"] if c.nodes > 1 else ["flat"]
    out = []
    for s in strategies:
        C = 1
        while C <= max_chunks and C <= c.tokens:
            out.append(replace(c, strategy=s, chunks=C))
            C *= 2
    return out


def best_chunks(p: Profile, c: Layer, max_chunks: int = 8) -> int:
    """The chunk count the model predicts fastest for c's strategy (the adaptive overlap)."""
    same = [x for x in candidates(c, max_chunks) if x.strategy == c.strategy]
    return min(same, key=lambda x: predict(p, x)["total"]).chunks


def rebalance_gain(p: Profile, c: Layer, before: float, after: float, bytes_moved: float, steps: int) -> float:
    """Seconds a rebalance saves over the next `steps` steps of layer problem `c` (negative: it
    does not pay): its slowest rank's time at max / mean load `before` minus at `after`, per step,
    against moving `bytes_moved` bytes (all ranks') over the inter-node links once. What the
    placement planner's moves cost in time, for `rebalance_experts(..., max_bytes=)` or to decide
    whether to rebalance at all."""
    saved = predict(p, replace(c, imbalance=before))["total"] - predict(p, replace(c, imbalance=after))["total"]
    link = p.link("inter" if c.nodes > 1 else "intra", c.ranks)
    move = link.latency_s + bytes_moved / c.ranks / link.bytes_per_s  # the ranks move their shares at once
    return steps * saved - move
