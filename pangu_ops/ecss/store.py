"""The ECSS store: every MoE layer's experts on the host, with their optimizer state, and the
step protocol that moves them to and from the device pools.

(Use: the package doc, `pangu_ops.ecss`.)

Every RRE layer's experts live in host memory as fp32 master weights with their AdamW state
(m, v, and a step count per expert), plus a compute-dtype copy that uploads read. RRE routes by
(domain, token id) alone, so `prepare` knows each layer's required experts before any compute
(`routing.required_experts`). The device holds, per layer, a pool of `slots` expert rows in the
compute dtype that *is* the layer's weight (`w_gate_up [slots, H, 2F]`, `w_down [slots, F, H]`);
the layer routes through the pool's slot map (`MoEFeedForward(expert_pool=...)`), so
`rre_dispatch` stays one fused pass (a token routed to an expert that `prepare` did not load
raises, never computes with another's weights). Several micro-batches may be prepared and run
before one `step` (gradient accumulation): experts already resident and unchanged since their
upload are reused (the hits in `stats`; least recently used ones are evicted first, never one
holding gradients). `step` sends the pool rows of this step's experts' gradients to the host and
runs AdamW over those experts only (the op `pangu_ops.adamw_experts`; "lazy" Adam, as torch's
SparseAdam: an expert without gradient is not touched), writing the new compute-dtype copies that
the next upload reads. Device bytes per layer: the pool and its gradient,
`2 * slots * (expert's elements) * compute element size`, which `device_budget_bytes` bounds
(default: every expert fits).

Uploads go through a side CUDA stream from pinned memory where a GPU is the device (the next
batch's `prepare` can then run while the current one computes); on the CPU they are plain copies.
Top-k layers: their experts are known only after the router, so each forward reads the router's
choice on the host (one device sync per layer) and uploads the missing experts then, on the
critical path (`ExpertPool.slot_map`); eager mode only (the sync breaks a compiled graph).
Hash-routed layers are not served.

Expert parallelism (PanGu-Σ ran ECSS on top of it): an expert-parallel layer's store holds this
rank's experts (`MoEFeedForward.local_expert_ids`); the experts that the dispatcher brings rows
for are fetched into the pool when the rows arrive (one host read of the row counts per layer and
chunk, as for top-k layers). `placement.rebalance(..., store=store)` moves their host state
(master, moments, step counts, compute copy) between ranks with the experts.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import routing
from ..nn.moe import MoEFeedForward
from ..ops import adamw_experts
from .pool import ExpertPool


@dataclass
class StepStats:
    """One step of the store: what moved, what was reused, what the device holds."""

    resident_bytes: int = 0  # device pools + their gradients, all layers
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    hits: int = 0  # required experts found resident and up to date
    misses: int = 0  # required experts uploaded
    experts_updated: int = 0


@dataclass
class _Layer:
    name: str
    module: MoEFeedForward
    table: Tensor | None  # an RRE layer's own route table (global expert ids), on the host; None: top-k
    master: Tensor  # [E, n] fp32: w_gate_up | w_down of each expert, flattened
    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor  # [E] int64
    compute: Tensor  # [E, n] compute dtype: what uploads read
    pool: ExpertPool


class ExpertStore:
    """Host-side storage and optimizer of every RRE layer's experts (module docstring)."""

    def __init__(self, model: nn.Module, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, device: torch.device | str | None = None,
                 compute_dtype: torch.dtype | None = None, device_budget_bytes: int | None = None):
        self.model, self.lr, self.betas, self.eps, self.weight_decay = model, lr, betas, eps, weight_decay
        moe = [(n, m) for n, m in model.named_modules() if isinstance(m, MoEFeedForward)]
        if not moe:
            raise ValueError("the model has no MoE layer for an ExpertStore")
        for name, m in moe:
            if m.router_kind == "hash":
                raise ValueError(f"layer {name!r}: ExpertStore serves RRE and top-k layers, not hash-routed ones")
        first = moe[0][1].w_gate_up
        self.device = torch.device(device) if device is not None else first.device
        self.compute_dtype = compute_dtype or first.dtype
        pinned = self.device.type == "cuda"
        self._elt = elt = torch.empty(0, dtype=self.compute_dtype).element_size()
        per_slot = sum(2 * (m.w_gate_up[0].numel() + m.w_down[0].numel()) * elt for _, m in moe)  # weights + grads
        budget = per_slot * max(m.w_gate_up.shape[0] for _, m in moe) if device_budget_bytes is None \
            else device_budget_bytes
        self.budget = budget
        self.layers: list[_Layer] = []
        for name, m in moe:
            E = m.w_gate_up.shape[0]  # the experts stored here: all, or this rank's (expert parallel)
            with torch.no_grad():
                master = torch.cat([m.w_gate_up.detach().reshape(E, -1), m.w_down.detach().reshape(E, -1)], 1)
            master = master.to("cpu", torch.float32).contiguous()
            n = master.shape[1]
            # every layer gets the same share of the budget, in expert slots
            slots = min(E, budget // len(moe) // (2 * n * elt))
            compute = torch.empty(E, n, dtype=self.compute_dtype, device="cpu", pin_memory=pinned)
            compute.copy_(master)
            table = m.table.detach().to("cpu").clone() if m.router_kind == "rre" and m.dispatcher is None else None
            layer = _Layer(name, m, table, master, torch.zeros_like(master), torch.zeros_like(master),
                           torch.zeros(E, dtype=torch.long, device="cpu"), compute, ExpertPool(E, slots))
            if table is None:  # top-k / expert parallel: fetched on demand, during forward
                layer.pool.fetch = lambda expert_ids, layer=layer: self._fetch(layer, expert_ids)
            self.layers.append(layer)
            self._install_pool(layer)
        # device pools (as allocated) + their gradients, all layers: fixed once the pools exist
        self.resident_bytes = sum(2 * (l.module.w_gate_up.numel() + l.module.w_down.numel()) * elt for l in self.layers)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.stats = StepStats()

    # ---- the model's side ----

    def dense_parameters(self) -> list[nn.Parameter]:
        """The model's parameters the store does not manage (attention, embeddings, dense FFNs):
        for the user's own optimizer."""
        managed = {id(layer.module.w_gate_up) for layer in self.layers} | {id(layer.module.w_down) for layer in self.layers}
        return [p for p in self.model.parameters() if id(p) not in managed]

    def _install_pool(self, layer: _Layer) -> None:
        m = layer.module
        H, two_f = m.w_gate_up.shape[1:]
        F, out = m.w_down.shape[1:]
        slots = layer.pool.slots
        m.w_gate_up = nn.Parameter(torch.zeros(slots, H, two_f, dtype=self.compute_dtype, device=self.device))
        m.w_down = nn.Parameter(torch.zeros(slots, F, out, dtype=self.compute_dtype, device=self.device))
        layer.pool.clear()
        m.expert_pool = layer.pool

    def layer_of(self, module: MoEFeedForward) -> _Layer | None:
        return next((layer for layer in self.layers if layer.module is module), None)

    def check_movable(self, module: MoEFeedForward) -> _Layer:
        """The layer's host record; raises ValueError while its experts hold gradients (a move
        then would lose them: rebalance between `step()` and the next `prepare()`)."""
        layer = self.layer_of(module)
        if layer.pool.pending:
            raise ValueError(f"layer {layer.name!r}: experts hold gradients: rebalance between step() and prepare()")
        return layer

    def replace_experts(self, module: MoEFeedForward, master: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                        steps: Tensor, compute: Tensor) -> None:
        """A layer's host state for another set of experts (the executor of `placement.rebalance`
        moved them here); its device pool starts empty (every expert is uploaded again)."""
        layer = self.check_movable(module)
        E = master.shape[0]
        layer.master, layer.exp_avg, layer.exp_avg_sq, layer.steps = master, exp_avg, exp_avg_sq, steps
        layer.compute = compute.pin_memory() if self.device.type == "cuda" else compute
        layer.pool = ExpertPool(E, min(E, layer.pool.slots), layer.pool.fetch)
        self._install_pool(layer)

    # ---- the step protocol ----

    def prepare(self, token_ids: Tensor | None = None, domain_ids: Tensor | None = None) -> StepStats:
        """Starts a (micro-)batch: loads every RRE layer's experts for it onto the device and remaps
        the layers' route tables onto them. Checks everything first (token ids, domains, the
        budget): nothing is copied or changed when it raises. (Top-k layers fetch during forward.)"""
        rre = [layer for layer in self.layers if layer.table is not None]
        if rre and (token_ids is None or domain_ids is None):
            raise ValueError("prepare() needs token_ids and domain_ids for the model's RRE layers")
        if rre:
            token_ids = token_ids.reshape(domain_ids.shape[0], -1) if token_ids.dim() == 1 else token_ids
        plans = []
        for layer in rre:
            rows = layer.module.table_rows(domain_ids.to(layer.module.domain_index.device))
            required = routing.required_experts(token_ids.to("cpu"), rows.to("cpu"), layer.table)
            self._check_room(layer, required)
            plans.append((layer, required))
        stats = self.stats = StepStats()
        for layer, required in plans:
            self._load(layer, required, stats)
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return stats

    def _check_room(self, layer: _Layer, required: Tensor) -> None:
        """Raises if the pool cannot hold `required` with the experts prepared since the last step."""
        needed = layer.pool.needed(required.tolist())
        if needed > layer.pool.slots:
            need = needed * 2 * layer.master.shape[1] * self._elt
            raise ValueError(f"layer {layer.name!r}: this step needs {needed} experts = {need} B of device memory "
                             f"(weights + gradients), more than its share of device_budget_bytes ({layer.pool.slots} "
                             f"experts); raise the budget to at least {need * len(self.layers)} B or split the batch")

    def _fetch(self, layer: _Layer, expert_ids: Tensor) -> None:
        """A top-k layer's router chose `expert_ids` [T, k] (global, -1 dropped): load the missing
        ones (a host read of the choice, then the upload, both on the forward's critical path)."""
        chosen = torch.unique(expert_ids[expert_ids >= 0]).to("cpu")
        self._check_room(layer, chosen)
        self._load(layer, chosen, self.stats)
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def _load(self, layer: _Layer, required: Tensor, stats: StepStats) -> None:
        m, ids = layer.module, required.tolist()
        missing, slots = layer.pool.assign(ids)
        stats.hits += len(ids) - len(missing)
        stats.misses += len(missing)
        if missing:
            src = layer.compute[torch.tensor(missing, device="cpu")]
            slots = torch.tensor(slots, device=self.device)
            n1 = m.w_gate_up[0].numel()
            with torch.no_grad(), (torch.cuda.stream(self._stream) if self._stream is not None else nullcontext()):
                rows = src.to(self.device, non_blocking=True)
                m.w_gate_up.index_copy_(0, slots, rows[:, :n1].view(-1, *m.w_gate_up.shape[1:]))
                m.w_down.index_copy_(0, slots, rows[:, n1:].view(-1, *m.w_down.shape[1:]))
            stats.h2d_bytes += src.numel() * src.element_size()
        stats.resident_bytes = self.resident_bytes

    def step(self) -> StepStats:
        """After backward: this step's experts' gradients to the host, the fused AdamW over those
        experts, their new compute-dtype copies written for the next upload; the pool rows they
        occupy are then stale (re-uploaded when next required)."""
        stats = self.stats
        if not any(layer.pool.pending for layer in self.layers):
            raise RuntimeError("ExpertStore.step() without prepare() / a forward pass for this step")
        for layer in self.layers:
            if not layer.pool.pending:
                continue
            m = layer.module
            if m.w_gate_up.grad is None or m.w_down.grad is None:
                raise RuntimeError(f"layer {layer.name!r}: no gradient: call step() after backward()")
            ids = torch.tensor(sorted(layer.pool.pending), device="cpu")
            slots = torch.tensor([layer.pool.slot_of[e] for e in ids.tolist()], device=self.device)
            grads = torch.cat([m.w_gate_up.grad.index_select(0, slots).reshape(len(ids), -1),
                               m.w_down.grad.index_select(0, slots).reshape(len(ids), -1)], 1).to("cpu")
            stats.d2h_bytes += grads.numel() * grads.element_size()
            adamw_experts(layer.master, layer.exp_avg, layer.exp_avg_sq, layer.steps, grads, ids, layer.compute,
                          lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)
            stats.experts_updated += len(ids)
            layer.pool.release(ids.tolist())  # stale on the device now: re-uploaded when next required
            m.w_gate_up.grad = m.w_down.grad = None
        return stats

    # ---- checkpoints and the full model ----

    def state_dict(self) -> dict:
        return {"hyper": {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay},
                "layers": {l.name: {"master": l.master.clone(), "exp_avg": l.exp_avg.clone(),
                                    "exp_avg_sq": l.exp_avg_sq.clone(), "steps": l.steps.clone()} for l in self.layers}}

    def load_state_dict(self, state: dict) -> None:
        """Restores weights and optimizer state (bit-exact); every layer is checked before any is
        written. The device pools start empty (everything is uploaded again)."""
        layers = state["layers"]
        mine = {l.name: l for l in self.layers}
        if set(layers) != set(mine):
            raise ValueError(f"the state's layers {sorted(layers)} are not this store's {sorted(mine)}")
        for name, s in layers.items():
            for key in ("master", "exp_avg", "exp_avg_sq"):
                if s[key].shape != mine[name].master.shape:
                    raise ValueError(f"layer {name!r}: {key} is {tuple(s[key].shape)}, the store has "
                                     f"{tuple(mine[name].master.shape)}")
            if s["steps"].shape != mine[name].steps.shape:
                raise ValueError(f"layer {name!r}: steps is {tuple(s['steps'].shape)}, the store has "
                                 f"{tuple(mine[name].steps.shape)}")
        hyper = state["hyper"]
        self.lr, self.betas, self.eps, self.weight_decay = hyper["lr"], tuple(hyper["betas"]), hyper["eps"], \
            hyper["weight_decay"]
        for name, s in layers.items():
            layer = mine[name]
            for key in ("master", "exp_avg", "exp_avg_sq", "steps"):
                getattr(layer, key).copy_(s[key])
            layer.compute.copy_(layer.master)
            self._install_pool(layer)

    def restore_model(self) -> None:
        """Puts every layer's full expert weights (compute dtype) back into the model, on the store's
        device, and detaches the pools: the model then runs, saves and `extract_domain`s without the
        store (which must not be used afterwards)."""
        for layer in self.layers:
            m, E = layer.module, layer.master.shape[0]
            n1 = m.w_gate_up[0].numel()
            full = layer.compute.to(self.device)
            m.w_gate_up = nn.Parameter(full[:, :n1].reshape(E, *m.w_gate_up.shape[1:]).clone())
            m.w_down = nn.Parameter(full[:, n1:].reshape(E, *m.w_down.shape[1:]).clone())
            m.expert_pool = None
        self.layers = []


__all__ = ["ExpertStore", "StepStats"]
