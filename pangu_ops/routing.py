"""Routing: Random Routed Experts (PanGu-Σ), learned top-k (Pangu Ultra MoE), balance losses.

RRE routes without a gate, in two levels: the sample's domain picks its group of experts, the
token's vocabulary id picks one expert of that group through a table drawn at initialisation —
random, balanced (every expert of a domain gets the same number of vocabulary ids, ±1), independent
per layer and per domain, reproducible from a seed.
"""
from __future__ import annotations

import zlib

import torch
from torch import Tensor

from .ops import _checks


def _generator(seed: int, layer: int, domain: int) -> torch.Generator:
    """An independent, reproducible stream per (seed, layer, domain)."""
    return torch.Generator().manual_seed(zlib.crc32(f"pangu-rre/{seed}/{layer}/{domain}".encode()))


def rre_domain_row(vocab_size: int, first_expert: int, num_experts: int, *, seed: int, layer: int,
                   domain: int) -> Tensor:
    """One domain's row of the table: `[vocab_size]` ids in `[first_expert, first_expert + num_experts)`,
    each expert receiving vocab_size // num_experts or one more vocabulary ids, at random."""
    _checks.positive_int("vocab_size", vocab_size)
    _checks.positive_int("num_experts", num_experts)
    balanced = torch.arange(vocab_size) % num_experts  # counts differ by at most one
    shuffled = balanced[torch.randperm(vocab_size, generator=_generator(seed, layer, domain))]
    return shuffled + first_expert


def rre_route_table(vocab_size: int, num_experts: int, num_domains: int, *, seed: int, layer: int) -> Tensor:
    """`[num_domains, vocab_size]` int64 table of global expert ids. Domain d owns experts
    `[d * E_d, (d + 1) * E_d)` with `E_d = num_experts // num_domains`."""
    _checks.positive_int("num_domains", num_domains)
    _checks.positive_int("num_experts", num_experts)
    if num_experts % num_domains:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by num_domains ({num_domains})")
    per_domain = num_experts // num_domains
    return torch.stack([rre_domain_row(vocab_size, d * per_domain, per_domain, seed=seed, layer=layer, domain=d)
                        for d in range(num_domains)])


def rre_route(token_ids: Tensor, domain_ids: Tensor, table: Tensor) -> Tensor:
    """`[B, S]` expert ids: `table[domain_ids[b], token_ids[b, s]]`."""
    _checks.tensor("token_ids", token_ids, 2, "[B, S]", _checks.INDEX_DTYPES)
    _checks.tensor("domain_ids", domain_ids, 1, "[B]", _checks.INDEX_DTYPES)
    _checks.tensor("table", table, 2, "[num_domains, vocab_size]", _checks.INDEX_DTYPES)
    _checks.size("domain_ids", domain_ids.shape[0], token_ids.shape[0], "length (B = token_ids.shape[0])")
    return _checks.rre_lookup(token_ids, domain_ids, table)


def required_experts(token_ids: Tensor, domain_ids: Tensor, table: Tensor) -> Tensor:
    """Sorted global ids of the experts a batch will touch, known before any compute (ECSS fetches
    only these from host memory)."""
    return torch.unique(rre_route(token_ids, domain_ids, table))


def topk_route(logits: Tensor, k: int, *, score: str = "softmax", normalize: bool = True,
               scaling: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Learned top-k routing. Returns (weights [T, k] fp32, expert_ids [T, k] int64, probs [T, E]
    fp32). `score`: "softmax" or "sigmoid" (Pangu Ultra MoE); `normalize` rescales the k weights to
    sum to 1; `scaling` multiplies them (Pangu Ultra MoE's routed scaling factor, 2.5)."""
    _checks.tensor("logits", logits, 2, "[T, E]", _checks.FLOAT_DTYPES)
    _checks.positive_int("k", k)
    if k > logits.shape[1]:
        raise ValueError(f"k ({k}) must be at most the number of experts ({logits.shape[1]})")
    if score == "softmax":
        probs = logits.float().softmax(-1)
    elif score == "sigmoid":
        probs = logits.float().sigmoid()
    else:
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    weights, expert_ids = probs.topk(k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return weights * scaling, expert_ids, probs


def load_balancing_loss(probs: Tensor, expert_ids: Tensor, *, alpha: float = 1e-2,
                        group: "torch.distributed.ProcessGroup | None" = None) -> Tensor:
    """`alpha * E * sum_i f_i * P_i`: f_i the share of the routed (non-dropped) slots that went to
    expert i, P_i the mean router probability of expert i (normalised per token, so that softmax
    and sigmoid scores weigh alike).

    With `group` (the expert-parallel group: Pangu Ultra MoE's EP-group loss) the slot counts,
    probability sums and token counts are all-reduced over the group before the product, so the
    loss balances what each device actually receives; with one rank it is the micro-batch loss.
    Gradients flow to every rank's own probabilities."""
    _checks.tensor("probs", probs, 2, "[T, E]", _checks.FLOAT_DTYPES)
    _checks.tensor("expert_ids", expert_ids, 2, "[T, k]", _checks.INDEX_DTYPES)
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
    _checks.tensor("expert_ids", expert_ids, 2, "[T, k]", _checks.INDEX_DTYPES)
    _checks.non_negative_int("capacity", capacity)
    flat = expert_ids.reshape(-1).long()
    bins = torch.where(flat >= 0, flat, num_experts)  # dropped slots in a last bin
    order = torch.argsort(bins, stable=True)
    sizes = _slot_counts(bins, num_experts + 1).long()
    starts = sizes.cumsum(0) - sizes
    rank = torch.empty_like(flat).scatter_(0, order, torch.arange(flat.numel(), device=flat.device) - starts[bins[order]])
    keep = (flat >= 0) & (rank < capacity)
    return torch.where(keep, flat, -1).view_as(expert_ids).to(expert_ids.dtype)
