"""One MoE layer's device pool under ECSS: which experts occupy its `slots` rows, which are
reused, which are evicted (least recently used first, never one holding gradients), and the slot
map the layer routes through (`MoEFeedForward(expert_pool=...)`)."""
from __future__ import annotations

import collections
from typing import Callable

import torch
from torch import Tensor


class ExpertPool:
    """Residency of `num_experts` experts in `slots` device rows.

    `slot_map(expert_ids)` is what the layer calls in its forward pass: `[E]` int64 on the host (the
    layer moves it), each expert's slot, `slots` (out of range: the dispatch kernels raise) for
    experts not resident. With `fetch` (top-k layers, whose experts are known only after the
    router) it first has `fetch` load the router's choice `expert_ids [T, k]`; RRE layers are loaded
    before the forward pass (`ExpertStore.prepare`) and call it with None.
    """

    def __init__(self, num_experts: int, slots: int, fetch: Callable[[Tensor], None] | None = None):
        self.num_experts, self.slots, self.fetch = num_experts, slots, fetch
        self.slot_of: dict[int, int] = {}  # expert -> slot (resident and up to date)
        self.lru: collections.OrderedDict[int, bool] = collections.OrderedDict()  # resident, oldest first
        self.pending: set[int] = set()  # experts used since the last optimizer step (holding gradients)

    def needed(self, required: list[int]) -> int:
        """Slots this step needs if `required` joins the experts already used since the last step."""
        return len(self.pending | set(required))

    def assign(self, required: list[int]) -> tuple[list[int], list[int]]:
        """Marks `required` used (most recently) and gives slots to those not resident:
        (missing experts, their slots) — the rows to upload. The caller checks `needed` first."""
        missing = [e for e in required if e not in self.slot_of]
        in_use = set(self.slot_of.values())
        free = [s for s in range(self.slots) if s not in in_use]
        wanted = set(required) | self.pending
        victims = [e for e in self.lru if e not in wanted]  # least recently used first
        for e in missing:
            if free:
                slot = free.pop()
            else:
                old = victims.pop(0)
                slot = self.slot_of.pop(old)
                del self.lru[old]
            self.slot_of[e] = slot
        for e in required:
            self.lru.pop(e, None)
            self.lru[e] = True
        self.pending |= set(required)
        return missing, [self.slot_of[e] for e in missing]

    def release(self, experts: list[int]) -> None:
        """After the optimizer step: these experts' device rows are stale (re-uploaded when next needed)."""
        for e in experts:
            self.lru.pop(e, None)
            self.slot_of.pop(e, None)
        self.pending = set()

    def clear(self) -> None:
        self.slot_of.clear()
        self.lru.clear()
        self.pending = set()

    def slot_map(self, expert_ids: Tensor | None = None) -> Tensor:
        if expert_ids is not None and self.fetch is not None:
            self.fetch(expert_ids)
        host = torch.device("cpu")  # (whatever the default device)
        remap = torch.full((self.num_experts,), self.slots, dtype=torch.long, device=host)
        if self.slot_of:
            experts, slots = torch.tensor(list(self.slot_of.items()), device=host).unbind(1)
            remap[experts] = slots
        return remap
