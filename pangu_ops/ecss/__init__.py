"""ECSS — PanGu-Σ's Expert Computation and Storage Separation: experts stored on the host,
computed on the device.

    store = ExpertStore(model, lr=1e-4, weight_decay=0.1, device="cuda", device_budget_bytes=8 << 30)
    dense_opt = torch.optim.AdamW(store.dense_parameters(), lr=1e-4)  # everything but the experts
    for token_ids, domain_ids, labels in batches:
        store.prepare(token_ids, domain_ids)   # this batch's experts onto the device (before forward)
        loss = loss_fn(model(token_ids, domain_ids), labels)
        loss.backward()
        store.step()                           # their gradients to the host, lazy AdamW there
        dense_opt.step(); dense_opt.zero_grad()

Modules: `store` (host state, the step protocol, checkpoints), `pool` (one layer's device pool:
residency, eviction, the slot map the layer routes through). The host optimizer is the op
`pangu_ops.adamw_experts` (kernel in csrc/adamw.cpp, reference in pangu_ops.reference).
"""
from .pool import ExpertPool
from .store import ExpertStore, StepStats

__all__ = ["ExpertPool", "ExpertStore", "StepStats"]
