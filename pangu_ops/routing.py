"""Routing: Random Routed Experts (PanGu-Σ), learned top-k (Mixtral, Qwen, DeepSeek-V3 / Pangu Ultra
MoE: softmax/sigmoid scores, normalisation, routed scaling, group-limited choice, the aux-loss-free
correction bias), hash routing by token id (DeepSeek-V4), balance losses.

RRE routes without a gate, in two levels: the sample's domain picks its group of experts, the
token's vocabulary id picks one expert of that group through a table drawn at initialisation —
random, balanced (every expert of a domain gets the same number of vocabulary ids, ±1), independent
per layer and per domain, reproducible from a seed.
"""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks


def _generator(seed: int, layer: int, domain: int) -> torch.Generator:
    """An independent, reproducible stream per (seed, layer, domain)."""
    return torch.Generator().manual_seed(zlib.crc32(f"pangu-rre/{seed}/{layer}/{domain}".encode()))


def rre_domain_row(vocab_size: int, first_expert: int, num_experts: int, *, seed: int, layer: int,
                   domain: int) -> Tensor:
    """One domain's row of the table: `[vocab_size]` ids in `[first_expert, first_expert + num_experts)`,
    each expert receiving vocab_size // num_experts or one more vocabulary ids, at random."""
    checks.positive_int("vocab_size", vocab_size)
    checks.positive_int("num_experts", num_experts)
    balanced = torch.arange(vocab_size, device="cpu") % num_experts  # counts differ by at most one (made on the CPU)
    shuffled = balanced[torch.randperm(vocab_size, generator=_generator(seed, layer, domain), device="cpu")]
    return shuffled + first_expert


def rre_route_table(vocab_size: int, num_experts: int, num_domains: int, *, seed: int, layer: int) -> Tensor:
    """`[num_domains, vocab_size]` int64 table of global expert ids. Domain d owns experts
    `[d * E_d, (d + 1) * E_d)` with `E_d = num_experts // num_domains`."""
    checks.positive_int("num_domains", num_domains)
    checks.positive_int("num_experts", num_experts)
    if num_experts % num_domains:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by num_domains ({num_domains})")
    per_domain = num_experts // num_domains
    return torch.stack([rre_domain_row(vocab_size, d * per_domain, per_domain, seed=seed, layer=layer, domain=d)
                        for d in range(num_domains)])


def rre_lookup(token_ids: torch.Tensor, domain_ids: torch.Tensor, table: torch.Tensor,
               num_experts: int | None = None) -> torch.Tensor:
    """`table[domain_ids[b], token_ids[b, s]]` ([B, S] for a [D, V] table, [B, S, k] for a
    [D, V, k] one) after checking the domain and token ids, and that every expert found is in
    [0, num_experts) (only >= 0 when num_experts is None)."""
    num_domains, vocab = table.shape[:2]
    if not checks.has_values(token_ids):  # shape inference: the lookup alone
        return table[domain_ids.long()[:, None], token_ids.long()]
    bad = (domain_ids < 0) | (domain_ids >= num_domains)
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        raise ValueError(f"domain_ids[{b}] = {int(domain_ids[b])} is out of range [0, num_domains={num_domains})")
    bad = (token_ids < 0) | (token_ids >= vocab)
    if bool(bad.any()):
        b, s = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"token_ids[{b}, {s}] = {int(token_ids[b, s])} is out of range [0, vocab_size={vocab})")
    experts = table[domain_ids.long()[:, None], token_ids.long()]
    bad = experts < 0 if num_experts is None else (experts < 0) | (experts >= num_experts)
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        b, s = where[:2]
        slot = "".join(f", {j}" for j in where[2:])
        bound = "a non-negative expert id" if num_experts is None else f"an expert id in [0, num_experts={num_experts})"
        raise ValueError(f"table[{int(domain_ids[b])}, {int(token_ids[b, s])}{slot}] = {int(experts[tuple(where)])} "
                         f"is not {bound}")
    return experts


def rre_route(token_ids: Tensor, domain_ids: Tensor, table: Tensor) -> Tensor:
    """`[B, S]` expert ids: `table[domain_ids[b], token_ids[b, s]]`."""
    checks.tensor("token_ids", token_ids, 2, "[B, S]", checks.INDEX_DTYPES)
    checks.tensor("domain_ids", domain_ids, 1, "[B]", checks.INDEX_DTYPES)
    checks.tensor("table", table, 2, "[num_domains, vocab_size]", checks.INDEX_DTYPES)
    checks.size("domain_ids", domain_ids.shape[0], token_ids.shape[0], "length (B = token_ids.shape[0])")
    return rre_lookup(token_ids, domain_ids, table)


def required_experts(token_ids: Tensor, domain_ids: Tensor, table: Tensor) -> Tensor:
    """Sorted global ids of the experts a batch will touch, known before any compute (ECSS fetches
    only these from host memory)."""
    return torch.unique(rre_route(token_ids, domain_ids, table))


SCORES = ("softmax", "sigmoid", "sqrtsoftplus")


def router_scores(logits: Tensor, score: str = "softmax") -> Tensor:
    """Per-expert scores [T, E] in fp32: "softmax" (Mixtral, Qwen), "sigmoid" (DeepSeek-V3, Pangu
    Ultra MoE) or "sqrtsoftplus" (DeepSeek-V4: sqrt(softplus(logit)))."""
    checks.tensor("logits", logits, 2, "[T, E]", checks.FLOAT_DTYPES)
    if score == "softmax":
        return logits.float().softmax(-1)
    if score == "sigmoid":
        return logits.float().sigmoid()
    if score == "sqrtsoftplus":
        return F.softplus(logits.float()).sqrt()
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def _gate_weights(scores: Tensor, expert_ids: Tensor, normalize: bool, scaling: float) -> Tensor:
    """The chosen experts' scores, rescaled to sum to 1 when `normalize`, times `scaling`."""
    weights = scores.gather(1, expert_ids)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling


def topk_route(logits: Tensor, k: int, *, score: str = "softmax", normalize: bool = True, scaling: float = 1.0,
               correction_bias: Tensor | None = None, n_group: int = 1,
               topk_group: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Learned top-k routing. Returns (weights [T, k] fp32, expert_ids [T, k] int64, scores [T, E]
    fp32).

    score: see `router_scores`. normalize: rescale the k weights to sum to 1 (Mixtral's softmax
    over the top-k logits is softmax + normalize; Qwen's `norm_topk_prob`). scaling: the routed
    scaling factor (DeepSeek-V3 2.5, Pangu Ultra MoE). correction_bias [E]: DeepSeek-V3's
    aux-loss-free balancing bias, added to the scores for the choice of experts only (the weights
    are the unbiased scores). n_group / topk_group: group-limited routing: the experts form n_group
    equal groups, each scored by the sum of its two best (biased) scores, and only the experts of
    the topk_group best groups can be chosen."""
    scores = router_scores(logits, score)
    num_experts = scores.shape[1]
    checks.positive_int("k", k)
    if k > num_experts:
        raise ValueError(f"k ({k}) must be at most the number of experts ({num_experts})")
    choice = scores
    if correction_bias is not None:
        checks.tensor("correction_bias", correction_bias, 1, "[E]", checks.FLOAT_DTYPES)
        checks.size("correction_bias", correction_bias.shape[0], num_experts, "length (E = logits.shape[1])")
        choice = scores + correction_bias.float()
    topk_group = n_group if topk_group is None else topk_group
    if n_group > 1 and topk_group < n_group:
        checks.positive_int("topk_group", topk_group)
        if num_experts % n_group:
            raise ValueError(f"n_group ({n_group}) must divide the number of experts ({num_experts})")
        if k > topk_group * (num_experts // n_group):
            raise ValueError(f"k ({k}) is more than the {topk_group} groups of {num_experts // n_group} experts hold")
        grouped = choice.view(-1, n_group, num_experts // n_group)
        group_scores = grouped.topk(min(2, grouped.shape[2]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_scores.topk(topk_group, -1).indices,
                                                                         True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(-1, num_experts)
    expert_ids = choice.topk(k, dim=-1).indices
    return _gate_weights(scores, expert_ids, normalize, scaling), expert_ids, scores


def hash_table(vocab_size: int, num_experts: int, k: int, *, seed: int, layer: int = 0) -> Tensor:
    """A frozen token-id -> experts table `[vocab_size, k]` (int64) for hash routing: k distinct
    experts per token id, drawn uniformly (every expert gets V*k/E ids in expectation),
    reproducible from (seed, layer). DeepSeek-V4 checkpoints bring their own (`tid2eid`)."""
    checks.positive_int("k", k)
    if k > num_experts:
        raise ValueError(f"k ({k}) must be at most the number of experts ({num_experts})")
    gen = _generator(seed, layer, -1)
    chunk = max(1, (1 << 22) // num_experts)  # bounded memory for large vocabularies
    return torch.cat([torch.rand(min(chunk, vocab_size - v), num_experts, generator=gen, device="cpu").argsort(-1)[:, :k]
                      for v in range(0, vocab_size, chunk)]) if vocab_size else torch.empty(0, k, dtype=torch.long, device="cpu")


def hash_route(logits: Tensor, token_ids: Tensor, table: Tensor, *, score: str = "softmax", normalize: bool = True,
               scaling: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Hash routing (DeepSeek-V4's hash MoE layers): the experts of a token are `table[token_id]`
    ([V, k], frozen), weighted by the router's scores of those experts as in `topk_route`.
    Returns (weights [T, k] fp32, expert_ids [T, k] int64, scores [T, E] fp32)."""
    scores = router_scores(logits, score)
    checks.tensor("table", table, 2, "[vocab_size, k]", checks.INDEX_DTYPES)
    flat = token_ids.reshape(-1)
    checks.size("token_ids", flat.shape[0], scores.shape[0], "numel (T = logits.shape[0])")
    expert_ids = rre_lookup(flat[None, :], flat.new_zeros(1), table[None], scores.shape[1])[0].long()
    return _gate_weights(scores, expert_ids, normalize, scaling), expert_ids, scores


def load_balancing_loss(probs: Tensor, expert_ids: Tensor, *, alpha: float = 1e-2,
                        group: "torch.distributed.ProcessGroup | None" = None) -> Tensor:
    """`alpha * E * sum_i f_i * P_i`: f_i the share of the routed (non-dropped) slots that went to
    expert i, P_i the mean router probability of expert i (normalised per token, so that softmax
    and sigmoid scores weigh alike).

    With `group` (the expert-parallel group: Pangu Ultra MoE's EP-group loss) the slot counts,
    probability sums and token counts are all-reduced over the group before the product, so the
    loss balances what each device actually receives; with one rank it is the micro-batch loss.
    Gradients flow to every rank's own probabilities."""
    checks.tensor("probs", probs, 2, "[T, E]", checks.FLOAT_DTYPES)
    checks.tensor("expert_ids", expert_ids, 2, "[T, k]", checks.INDEX_DTYPES)
    num_experts = probs.shape[1]
    counts = _slot_counts(expert_ids.reshape(-1).long(), num_experts)
    p = probs.float()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
    prob_sum = p.sum(0)
    tokens = torch.tensor([float(probs.shape[0])], device=probs.device)
    if group is not None:
        import torch.distributed as dist

        others = prob_sum.detach().clone()
        for t in (counts, tokens, others):
            dist.all_reduce(t, group=group)
        # The group's sum in value; the gradient of this rank's loss reaches this rank's own
        # probabilities only (an autograd all-reduce would sum every rank's identical gradient).
        prob_sum = prob_sum + (others - prob_sum.detach())
    f = counts / counts.sum().clamp_min(1.0)
    P = prob_sum / tokens.clamp_min(1.0)
    return alpha * num_experts * (f * P).sum()


def _slot_counts(flat: Tensor, num_experts: int) -> Tensor:
    """Slots per expert of flat expert ids (-1 ignored), with static shapes (torch.compile-able)."""
    return torch.zeros(num_experts, device=flat.device).scatter_add_(0, flat.clamp_min(0), (flat >= 0).float())


def apply_capacity(expert_ids: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Drops (sets to -1) the slots beyond the first `capacity` of each expert, in slot order
    (token, then j): the capacity-factor routing of GShard/Switch. Dropped slots stay dropped."""
    checks.tensor("expert_ids", expert_ids, 2, "[T, k]", checks.INDEX_DTYPES)
    checks.non_negative_int("capacity", capacity)
    flat = expert_ids.reshape(-1).long()
    bins = torch.where(flat >= 0, flat, num_experts)  # dropped slots in a last bin
    order = torch.argsort(bins, stable=True)
    sizes = _slot_counts(bins, num_experts + 1).long()
    starts = sizes.cumsum(0) - sizes
    rank = torch.empty_like(flat).scatter_(0, order, torch.arange(flat.numel(), device=flat.device) - starts[bins[order]])
    keep = (flat >= 0) & (rank < capacity)
    return torch.where(keep, flat, -1).view_as(expert_ids).to(expert_ids.dtype)
