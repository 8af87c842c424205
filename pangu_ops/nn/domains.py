"""The Random Routed Experts operations PanGu-Σ promises, on any model holding RRE layers:
extract a domain's sub-model, add or remove a domain's experts. Other domains' outputs never
change: their experts, table rows and expert order stay as they were."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import routing
from .moe import MoEFeedForward


def rre_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward) and m.router_kind == "rre"]


def _domain_experts(layer: MoEFeedForward, domain: int) -> tuple[int, int]:
    """[first, end) of the experts of `domain` in `layer` (a domain's experts are contiguous)."""
    if not 0 <= domain < layer.domain_index.shape[0] or int(layer.domain_index[domain]) < 0:
        raise ValueError(f"domain {domain} has no experts in this layer")
    row = layer.table[int(layer.domain_index[domain])]
    return int(row.min()), int(row.max()) + 1


def _keep_experts(layer: MoEFeedForward, first: int, end: int) -> None:
    layer.w_gate_up = nn.Parameter(layer.w_gate_up.data[first:end].clone())
    layer.w_down = nn.Parameter(layer.w_down.data[first:end].clone())


def extract_domain(model: nn.Module, domain: int) -> nn.Module:
    """A copy of `model` whose RRE layers hold only `domain`'s experts and table row. On that
    domain's data its outputs equal the full model's; other domains raise a clear error."""
    sub = copy.deepcopy(model)
    for layer in rre_layers(sub):
        first, end = _domain_experts(layer, domain)
        row = layer.table[int(layer.domain_index[domain])] - first
        _keep_experts(layer, first, end)
        layer.table = row.unsqueeze(0)
        index = torch.full_like(layer.domain_index, -1)
        index[domain] = 0
        layer.domain_index = index
        layer.reset_expert_load()
    return sub


def remove_domain(model: nn.Module, domain: int) -> None:
    """Deletes `domain`'s experts and table row from every RRE layer, in place. Domain ids keep
    their meaning; the removed domain then raises a clear error."""
    for layer in rre_layers(model):
        first, end = _domain_experts(layer, domain)
        row = int(layer.domain_index[domain])
        parts = [(layer.w_gate_up.data[:first], layer.w_down.data[:first]),
                 (layer.w_gate_up.data[end:], layer.w_down.data[end:])]
        layer.w_gate_up = nn.Parameter(torch.cat([p[0] for p in parts]))
        layer.w_down = nn.Parameter(torch.cat([p[1] for p in parts]))
        table = torch.cat([layer.table[:row], layer.table[row + 1:]])
        layer.table = torch.where(table >= end, table - (end - first), table)
        index = layer.domain_index.clone()
        index[domain] = -1
        layer.domain_index = torch.where(index > row, index - 1, index)
        layer.reset_expert_load()


def add_domain(model: nn.Module, num_experts: int) -> int:
    """Appends a new domain with `num_experts` fresh experts to every RRE layer, in place, with its
    own balanced table row (drawn from each layer's seed). Returns the new domain id."""
    new_domain = None
    for layer in rre_layers(model):
        domain = layer.domain_index.shape[0]
        if new_domain is not None and domain != new_domain:
            raise ValueError("the model's RRE layers disagree on the number of domains")
        new_domain = domain
        first = layer.num_experts
        vocab = layer.table.shape[1]
        row = routing.rre_domain_row(vocab, first, num_experts, seed=layer.seed, layer=layer.layer, domain=domain)
        w_gate_up = torch.empty(num_experts, *layer.w_gate_up.shape[1:]).to(layer.w_gate_up)
        w_down = torch.empty(num_experts, *layer.w_down.shape[1:]).to(layer.w_down)
        nn.init.normal_(w_gate_up, std=layer.hidden ** -0.5)
        nn.init.normal_(w_down, std=layer.ffn ** -0.5)
        layer.w_gate_up = nn.Parameter(torch.cat([layer.w_gate_up.data, w_gate_up]))
        layer.w_down = nn.Parameter(torch.cat([layer.w_down.data, w_down]))
        layer.table = torch.cat([layer.table, row.unsqueeze(0).to(layer.table)])
        layer.domain_index = torch.cat([layer.domain_index, layer.domain_index.new_tensor([layer.table.shape[0] - 1])])
        layer.reset_expert_load()
    if new_domain is None:
        raise ValueError("the model has no RRE layer")
    return new_domain


def required_experts(model: nn.Module, token_ids: torch.Tensor, domain_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per RRE layer (in `rre_layers` order), the expert ids the batch will touch — known from the
    token ids alone, before any compute."""
    return [routing.required_experts(token_ids, layer.table_rows(domain_ids), layer.table)
            for layer in rre_layers(model)]
