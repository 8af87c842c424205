"""Mixture-of-Experts feed-forward layers built from pangu_ops ops."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checks, routing
from ..ops import expert_mlp, moe_experts, permute, router_logits, rre_dispatch, unpermute
from ..ops.expert_mlp import fp32_weight_grads


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP: dense layers and shared experts."""

    def __init__(self, hidden: int, ffn: int, **factory):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False, **factory)
        self.down = nn.Linear(ffn, hidden, bias=False, **factory)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


@dataclass
class Route:
    """The router's decision for T tokens: each token's experts either as ids or as a table lookup
    (left to the fused `rre_dispatch`), and their gate weights."""

    weights: Tensor | None  # [T, k]; None: all ones (RRE)
    aux_loss: Tensor
    expert_ids: Tensor | None = None  # [T, k] global expert ids, -1 dropped
    lookup: tuple[Tensor, Tensor, Tensor] | None = None  # (token_ids [B, S], table rows [B], table [D, V(, k)])


class MoEFeedForward(nn.Module):
    """SwiGLU experts behind a router, dropless by default.

    router="topk": a learned linear router in fp32 (`routing.topk_route`: softmax / sigmoid /
    sqrt-softplus scores, top-k, normalised weights or not, routed scaling, group-limited choice with
    `n_group` / `topk_group`, and with `correction_bias=True` DeepSeek-V3's aux-loss-free balancing
    bias, moved by `update_correction_bias`), the balance loss (`aux_loss_alpha`; over `ep_group`
    when given: the EP-group loss), optional `capacity_factor` dropping each expert's overflow slots.
    Mixtral = softmax + normalize; Qwen-MoE = softmax, normalize = `norm_topk_prob`; DeepSeek-V3 /
    Pangu Ultra MoE = sigmoid + groups + correction bias + scaling.
    router="rre": PanGu-Σ's Random Routed Experts: `num_domains` domains owning equal shares of the
    experts, a fixed balanced route table per layer (`seed`, `layer`), top-1, no gate, no loss;
    `forward` then needs `token_ids` and `domain_ids`.
    router="hash": hash routing by token id (DeepSeek-V4's hash MoE layers): a frozen
    `[vocab_size, topk]` table (`routing.hash_table`, or a checkpoint's, in the `hash_table`
    buffer) picks each token's experts, the learned router's scores weigh them; the lookup runs
    inside `rre_dispatch`'s fused permute; `forward` needs `token_ids`.
    Shared experts: `num_shared_experts` (width `shared_ffn`, default `ffn * num_shared_experts`),
    gated per token by `sigmoid(x @ w)` with `shared_gate=True` (Qwen2-MoE).

    Experts are stored stacked: `w_gate_up [E, H, 2F]` (gate | up), `w_down [E, F, H]`.
    `forward(x [..., H], token_ids=None, domain_ids=None) -> (y [..., H], aux_loss)`.

    ECSS: with `expert_pool` (an `ecss.ExpertPool`, which `ecss.ExpertStore` installs) the stored
    experts are a device pool's slots, and every route goes through its `slot_map(expert_ids)`.

    Expert parallelism: with `dispatcher` (a `pangu_ops.distributed.ExpertParallelDispatcher`)
    the layer stores only this rank's experts (global ids `expert_range`) and sends its tokens to
    the other ranks' experts and back, in `ep_chunks` overlapped chunks ("auto": as many as the
    cost model, `pangu_ops.sim`, predicts fastest for each batch). The router (top-k) is
    replicated: keep it in sync as any data-parallel weight. RRE: the dispatcher serves one
    domain's experts on that domain's group of ranks (`Topology.split`, `first_expert`), and a
    rank's batch must hold only that domain's samples: its tokens never leave the group.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, *, router: str = "topk", topk: int = 2,
                 score: str = "softmax", normalize: bool = True, routed_scaling: float = 1.0, n_group: int = 1,
                 topk_group: int | None = None, correction_bias: bool = False,
                 num_shared_experts: int = 0, shared_ffn: int | None = None, shared_gate: bool = False,
                 capacity_factor: float | None = None, aux_loss_alpha: float = 1e-2,
                 ep_group=None, num_domains: int = 1, vocab_size: int | None = None, seed: int = 0, layer: int = 0,
                 dispatcher=None, ep_chunks: int | str = 1, expert_pool=None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        table_device = torch.get_default_device() if device is None else device  # (tables are drawn on the CPU)
        if router not in ("topk", "rre", "hash"):
            raise ValueError(f"router must be 'topk', 'rre' or 'hash', got {router!r}")
        if score not in routing.SCORES:
            raise ValueError(f"score must be one of {routing.SCORES}, got {score!r}")
        self.hidden, self.ffn, self.router_kind = hidden, ffn, router
        self.topk = 1 if router == "rre" else topk
        self.score, self.normalize, self.routed_scaling = score, normalize, routed_scaling
        self.n_group, self.topk_group = n_group, topk_group
        self.capacity_factor, self.aux_loss_alpha, self.ep_group = capacity_factor, aux_loss_alpha, ep_group
        self.seed, self.layer = seed, layer
        self.dispatcher, self.ep_chunks = dispatcher, ep_chunks
        self._num_experts = num_experts
        if dispatcher is not None:
            _check_dispatcher(dispatcher, num_experts, num_domains if router == "rre" else 1)
        stored = num_experts if dispatcher is None else dispatcher.local_experts
        self.w_gate_up = nn.Parameter(torch.empty(stored, hidden, 2 * ffn, **factory))
        self.w_down = nn.Parameter(torch.empty(stored, ffn, hidden, **factory))
        nn.init.normal_(self.w_gate_up, std=hidden ** -0.5)
        nn.init.normal_(self.w_down, std=ffn ** -0.5)
        self.gate = nn.Linear(hidden, num_experts, bias=False, **factory) if router != "rre" else None
        if correction_bias:
            if router != "topk":
                raise ValueError("correction_bias needs router='topk'")
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, device=device))
        else:
            self.e_score_correction_bias = None
        self._load: Tensor | None = None  # slots per expert since the last update_correction_bias
        # tokens (slots) per logical expert routed by this rank since the last reset: what the
        # placement planner balances (distributed.placement); counted on the device, no host sync
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        self.expert_pool = expert_pool  # ECSS: global expert ids -> slots of a device pool
        if router != "topk" and vocab_size is None:
            raise ValueError(f"router={router!r} needs vocab_size")
        if router == "hash":
            self.register_buffer("hash_table", routing.hash_table(vocab_size, num_experts, topk, seed=seed,
                                                                  layer=layer).to(table_device))
        if router == "rre":
            self.register_buffer("table", routing.rre_route_table(vocab_size, num_experts, num_domains, seed=seed,
                                                                  layer=layer).to(table_device))
            # domain_index[d]: the table row of domain d, -1 where the domain has no experts here.
            self.register_buffer("domain_index", torch.arange(num_domains, device=device))
        shared_ffn = ffn * num_shared_experts if shared_ffn is None else shared_ffn
        self.shared = SwiGLU(hidden, shared_ffn, **factory) if num_shared_experts and shared_ffn else None
        self.shared_gate = nn.Linear(hidden, 1, bias=False, **factory) if shared_gate and self.shared else None

    @property
    def num_experts(self) -> int:
        """All the layer's experts (on every rank when expert-parallel)."""
        return self.w_gate_up.shape[0] if self.dispatcher is None else self._num_experts

    @property
    def expert_range(self) -> tuple[int, int]:
        """Global ids [first, last + 1) of the experts this layer stores (expert-parallel with a
        placement: `local_expert_ids`, which need not be consecutive)."""
        first = 0 if self.dispatcher is None else self.dispatcher.first_local_expert
        return first, first + self.w_gate_up.shape[0]

    @property
    def local_expert_ids(self) -> Tensor:
        """[stored experts] the global logical id of each stored expert (row of w_gate_up), on the host."""
        if self.dispatcher is None:
            return torch.arange(self.w_gate_up.shape[0], device="cpu")
        return self.dispatcher.local_expert_ids

    def reset_expert_load(self) -> None:
        """Restarts the count (after a rebalance, or a change of the layer's experts)."""
        self.expert_load = torch.zeros(self.num_experts, dtype=torch.int64, device=self.expert_load.device)

    def forward(self, x: Tensor, token_ids: Tensor | None = None, domain_ids: Tensor | None = None):
        checks.tensor("x", x, x.dim(), "[..., H]", checks.FLOAT_DTYPES)
        checks.size("x", x.shape[-1], self.hidden, "last dimension (hidden)")
        flat = x.reshape(-1, self.hidden)
        route = self.route(flat, token_ids, domain_ids)
        y = self._dispatch(flat, route)
        if self.shared is not None:
            shared = self.shared(flat)
            y = y + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(flat)) * shared)
        return y.view(x.shape), route.aux_loss

    def route(self, flat: Tensor, token_ids: Tensor | None = None, domain_ids: Tensor | None = None) -> Route:
        """The router's decision for the tokens `flat [T, H]` (plus the balance loss, zero unless
        training a top-k router with `aux_loss_alpha`)."""
        tokens = flat.shape[0]
        aux = flat.new_zeros((), dtype=torch.float32)
        if self.router_kind == "rre":
            token_ids, rows = self._rre_ids(token_ids, domain_ids, tokens)
            if self.dispatcher is None:  # the table lookup fused into the permute
                return Route(None, aux, lookup=(token_ids, rows, self.table))
            serves = self.dispatcher.first_expert // self.dispatcher.num_experts
            if bool((domain_ids != serves).any()):
                b = int((domain_ids != serves).nonzero()[0])
                raise ValueError(f"domain_ids[{b}] = {int(domain_ids[b])}: this rank's expert-parallel group "
                                 f"serves domain {serves} only (its tokens never leave the domain's group)")
            return Route(None, aux, expert_ids=routing.rre_route(token_ids, rows, self.table).reshape(-1, 1))
        if self.router_kind == "hash":
            if token_ids is None:
                raise ValueError("a hash-routed layer needs token_ids")
            checks.size("token_ids", token_ids.numel(), tokens, "numel (tokens of x)")
            token_ids = token_ids.reshape(1, -1)
            weights, expert_ids, _ = routing.hash_route(self.router_logits(flat), token_ids, self.hash_table,
                                                        score=self.score, normalize=self.normalize,
                                                        scaling=self.routed_scaling)
            # locally, the table lookup fused into the permute; across ranks, the ids
            lookup = (token_ids, token_ids.new_zeros(1), self.hash_table[None]) if self.dispatcher is None else None
            return Route(weights, aux, expert_ids=expert_ids, lookup=lookup)
        experts = self.gate.out_features  # all of them (the stored ones may be an ECSS pool)
        weights, expert_ids, probs = routing.topk_route(
            self.router_logits(flat), self.topk, score=self.score, normalize=self.normalize,
            scaling=self.routed_scaling, correction_bias=self.e_score_correction_bias, n_group=self.n_group,
            topk_group=self.topk_group)
        if self.e_score_correction_bias is not None and self.training:
            load = routing._slot_counts(expert_ids.reshape(-1), experts).detach()
            self._load = load if self._load is None else self._load + load
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * tokens * self.topk / experts)
            expert_ids = routing.apply_capacity(expert_ids, experts, capacity)
        if self.training and self.aux_loss_alpha:
            aux = routing.load_balancing_loss(probs, expert_ids, alpha=self.aux_loss_alpha, group=self.ep_group)
        return Route(weights, aux, expert_ids=expert_ids)

    def _dispatch(self, flat: Tensor, route: Route) -> Tensor:
        """Tokens to their experts and back, combined: across ranks (dispatcher), or here by the
        fused table lookup or by expert ids, through the ECSS pool's slots when there is one."""
        if self.dispatcher is not None:
            self._count(route.expert_ids)
            return self.dispatcher.run(flat, route.expert_ids, route.weights, self._chunk_experts(),
                                       chunks=self.ep_chunks, ffn=self.ffn)
        slots = None if self.expert_pool is None else self.expert_pool.slot_map(route.expert_ids)
        if route.lookup is not None:
            token_ids, rows, table = route.lookup
            x_sorted, sizes, index = rre_dispatch(flat, token_ids, rows, table if slots is None else slots.to(table.device)[table],
                                                  self.num_experts)
        elif slots is None:  # the whole routed computation in one call (one C++ call in CPU inference)
            y, sizes = moe_experts(flat, route.expert_ids, route.weights, self.w_gate_up, self.w_down)
            self.expert_load.add_(sizes)
            return y
        else:
            ids = route.expert_ids  # -1 stays dropped
            ids = torch.where(ids >= 0, slots.to(ids.device)[ids.long().clamp_min(0)], -1)
            x_sorted, sizes, index = permute(flat, ids, self.num_experts)
        if slots is None:  # group_sizes count the logical experts themselves
            self.expert_load.add_(sizes)
        elif route.expert_ids is not None:
            self._count(route.expert_ids)
        return unpermute(self._experts(x_sorted, sizes), index, route.weights, flat.shape[0], topk=self.topk)

    @torch.no_grad()
    def update_correction_bias(self, rate: float = 1e-3) -> None:
        """DeepSeek-V3's aux-loss-free balancing, once per optimizer step: every expert's
        `e_score_correction_bias` moves by `rate` towards balance, up where the expert received
        fewer slots than the mean over the training forward passes since the last update (all
        ranks of `ep_group` counted), down where more."""
        if self.e_score_correction_bias is None:
            raise RuntimeError("this layer has no correction bias (correction_bias=False)")
        if self._load is None:
            raise RuntimeError("no training forward pass since the last update_correction_bias")
        load, self._load = self._load, None
        if self.ep_group is not None:
            import torch.distributed as dist

            dist.all_reduce(load, group=self.ep_group)
        self.e_score_correction_bias += rate * torch.sign(load.mean() - load)

    def _count(self, expert_ids: Tensor) -> None:
        self.expert_load.add_(routing._slot_counts(expert_ids.reshape(-1).long(), self.expert_load.shape[0]).long())

    def _experts(self, x_sorted: Tensor, group_sizes: Tensor) -> Tensor:
        return expert_mlp(x_sorted, self.w_gate_up, self.w_down, group_sizes)

    def _pooled_experts(self, x_local: Tensor, group_sizes: Tensor) -> Tensor:
        """Expert parallel with an ECSS pool: the local experts that received rows, fetched into
        the pool now (a host read of the counts), computed from their slots."""
        active = torch.nonzero(group_sizes).flatten()
        on_host = active.cpu()
        slots = self.expert_pool.slot_map(on_host[:, None])[on_host].to(group_sizes.device)
        return expert_mlp(x_local, self.w_gate_up[slots], self.w_down[slots], group_sizes[active])

    def _chunk_experts(self):
        """The experts of `ep_chunks` chunks: with 16-bit weights, their gradients add up in fp32
        over the chunks and are rounded once (as with one chunk), not once per chunk. (With an
        ECSS pool: the pool's rows, gradients summed by autograd per chunk.)"""
        if self.expert_pool is not None:
            return self._pooled_experts
        if self.ep_chunks == 1 or self.w_gate_up.dtype == torch.float32 or not torch.is_grad_enabled():
            return self._experts
        grads = fp32_weight_grads(self.w_gate_up, self.w_down)
        return lambda x_sorted, sizes: expert_mlp(x_sorted, self.w_gate_up, self.w_down, sizes, fp32_grads=grads)

    def router_logits(self, flat: Tensor) -> Tensor:
        """The router runs in fp32 whatever the model's dtype (routing decisions are sensitive to
        rounding): `F.linear(flat.float(), weight.float())` without the fp32 copies (`router_logits`);
        gradients reach the gate weight."""
        return router_logits(flat, self.gate.weight)

    def _rre_ids(self, token_ids: Tensor | None, domain_ids: Tensor | None, tokens: int) -> tuple[Tensor, Tensor]:
        """token_ids [B, S] and the table rows of domain_ids [B], validated."""
        if token_ids is None or domain_ids is None:
            raise ValueError("an RRE layer needs token_ids [B, S] and domain_ids [B]")
        checks.tensor("domain_ids", domain_ids, 1, "[B]", checks.INDEX_DTYPES)
        token_ids = token_ids.reshape(domain_ids.shape[0], -1) if token_ids.dim() == 1 else token_ids
        checks.size("token_ids", token_ids.numel(), tokens, "numel (tokens of x)")
        return token_ids, self.table_rows(domain_ids)

    def table_rows(self, domain_ids: Tensor) -> Tensor:
        """The rows of `table` holding domain_ids' routes; a domain out of range, or without
        experts in this layer (extracted or removed), raises."""
        if not checks.has_values(domain_ids):
            # No host reads in a compiled graph (nor values in meta or fake tensors): a bad or
            # removed domain reaches rre_dispatch as a row out of range, which its kernel reports.
            return self.domain_index[domain_ids.long().clamp(0, self.domain_index.shape[0] - 1)]
        known = self.domain_index.shape[0]
        bad = (domain_ids < 0) | (domain_ids >= known)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ValueError(f"domain_ids[{b}] = {int(domain_ids[b])} is out of range [0, num_domains={known})")
        rows = self.domain_index[domain_ids.long()]
        if bool((rows < 0).any()):
            d = int(domain_ids[(rows < 0).nonzero()[0]])
            raise ValueError(f"domain {d} has no experts in this layer (extracted or removed)")
        return rows

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, ffn={self.ffn}, experts={self.num_experts}, router={self.router_kind}, "
                f"topk={self.topk}, shared={self.shared is not None}")


def _check_dispatcher(dispatcher, num_experts: int, num_domains: int) -> None:
    """The dispatcher must serve all the experts (top-k) or exactly one domain's (RRE)."""
    share = num_experts // num_domains
    if dispatcher.num_experts != share or dispatcher.first_expert % share:
        what = "all the layer's" if num_domains == 1 else "one domain's"
        raise ValueError(f"the dispatcher serves experts [{dispatcher.first_expert}, "
                         f"{dispatcher.first_expert + dispatcher.num_experts}); it must serve {what} {share} experts "
                         f"(num_experts={num_experts}, num_domains={num_domains})")


class RREMoE(MoEFeedForward):
    """PanGu-Σ's Random Routed Experts layer: `MoEFeedForward(router="rre")`."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, num_domains: int, vocab_size: int, *, seed: int = 0,
                 layer: int = 0, **kwargs):
        super().__init__(hidden, ffn, num_experts, router="rre", num_domains=num_domains, vocab_size=vocab_size,
                         seed=seed, layer=layer, **kwargs)
