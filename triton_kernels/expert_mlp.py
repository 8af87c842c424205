"""The fused expert MLP on Triton: the gate/up grouped GEMM with the gate in its epilogue (fp32
accumulators -> act(gate) * up -> rounded once), then the down grouped GEMM."""
from __future__ import annotations

import torch

from .grouped_gemm import gated_grouped_gemm, grouped_gemm


def expert_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, group_sizes: torch.Tensor,
               activation: str, trans_b: bool, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up, h = gated_grouped_gemm(x, w_gate_up, group_sizes, activation, trans_b, limit)
    return grouped_gemm(h, w_down, group_sizes, trans_b), gate_up


def gated_backward(gate_up: torch.Tensor, dh: torch.Tensor, activation: str, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise, so torch's own fused GPU kernels serve: the reference's formula (imported on
    first use: the kernels do not load the reference module)."""
    from ..reference import gated_backward as torch_gated_backward

    return torch_gated_backward(gate_up, dh, activation, limit)
