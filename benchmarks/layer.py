"""The MoE layer the usual way, as a baseline: a loop over experts with index_select / index_add
(the HF transformers Mixtral block), against pangu_ops' MoEFeedForward on the same weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pangu_ops import routing
from pangu_ops.nn import MoEFeedForward


def loop_moe(layer: MoEFeedForward, x: Tensor, expert_ids: Tensor, weights: Tensor | None) -> Tensor:
    """`layer`'s output computed expert by expert from explicit routing (`weights` None: all ones)."""
    flat = x.reshape(-1, layer.hidden)
    out = torch.zeros_like(flat)
    for e in range(layer.num_experts):
        token, slot = (expert_ids == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        gate, up = (flat.index_select(0, token) @ layer.w_gate_up[e]).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ layer.w_down[e]
        w = weights[token, slot].unsqueeze(1) if weights is not None else 1.0
        out = out.index_add(0, token, (y * w).to(out.dtype))
    if layer.shared is not None:
        out = out + layer.shared(flat)
    return out.view(x.shape)


def loop_forward(layer: MoEFeedForward, x: Tensor) -> Tensor:
    """A top-k layer's forward the usual way: router, top-k, expert loop."""
    flat = x.reshape(-1, layer.hidden)
    weights, ids, _ = routing.topk_route(layer.router_logits(flat), layer.topk, score=layer.score,
                                         normalize=layer.normalize, scaling=layer.routed_scaling)
    return loop_moe(layer, x, ids, weights.to(x.dtype))
