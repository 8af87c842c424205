"""pangu::adamw_experts — AdamW over a list of experts' rows of host optimizer state, in place (the
optimizer step of ECSS, PanGu-Σ's experts stored on the host).

Kernels: `reference.adamw_experts`, `csrc/adamw.cpp` (one fused pass per element: decoupled weight
decay, both moments, bias correction by each expert's own step count, the fp32 master update and
its compute-dtype copy). "Lazy" Adam, as torch's SparseAdam: an expert that is not listed is not
touched. Not differentiable (an optimizer step).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from ._define import define

STATE_DTYPES = (torch.float32,)


def _check(master: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, steps: Tensor, grads: Tensor, expert_ids: Tensor,
           compute: Tensor | None, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    checks.tensor("master", master, 2, "[E, n]", STATE_DTYPES)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        checks.tensor(name, t, 2, "[E, n] like master", STATE_DTYPES)
        checks.size(f"{name} [E, n]", tuple(t.shape), tuple(master.shape), "the shape of master")
    checks.tensor("steps", steps, 1, "[E]", (torch.int64,))
    checks.size("steps", steps.shape[0], master.shape[0], "length (E = master.shape[0])")
    checks.tensor("expert_ids", expert_ids, 1, "[S]", checks.INDEX_DTYPES)
    checks.tensor("grads", grads, 2, "[S, n]", checks.FLOAT_DTYPES)
    checks.size("grads [S, n]", tuple(grads.shape), (expert_ids.shape[0], master.shape[1]),
                "the shape (len(expert_ids), master.shape[1])")
    if compute is not None:
        checks.tensor("compute", compute, 2, "[E, n]", checks.FLOAT_DTYPES)
        checks.size("compute [E, n]", tuple(compute.shape), tuple(master.shape), "the shape of master")
    for name, t in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("compute", compute)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous: it is updated in place")
    checks.same_device(master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, steps=steps, grads=grads,
                       expert_ids=expert_ids, compute=compute)
    for name, value, low, high in (("lr", lr, 0.0, None), ("beta1", beta1, 0.0, 1.0), ("beta2", beta2, 0.0, 1.0),
                                   ("eps", eps, 0.0, None), ("weight_decay", weight_decay, 0.0, None)):
        if not (value >= low and (high is None or value < high)):  # (NaN fails both)
            raise ValueError(f"{name} must be in [{low}, {high if high is not None else 'inf'}), got {value}")


def _fake(master, exp_avg, exp_avg_sq, steps, grads, expert_ids, compute, lr, beta1, beta2, eps, weight_decay):
    _check(master, exp_avg, exp_avg_sq, steps, grads, expert_ids, compute, lr, beta1, beta2, eps, weight_decay)


@define("adamw_experts", fake=_fake, mutates_args=("master", "exp_avg", "exp_avg_sq", "steps", "compute"))
def adamw_experts_op(master: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, steps: Tensor, grads: Tensor,
                     expert_ids: Tensor, compute: Tensor | None, lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float) -> None:
    """In place: see `adamw_experts`."""


def adamw_experts(master: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, steps: Tensor, grads: Tensor,
                  expert_ids: Tensor, compute: Tensor | None = None, *, lr: float,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """torch.optim.AdamW's update (non-amsgrad) of the listed experts, in place.

    Args:
        master, exp_avg, exp_avg_sq: `[E, n]` fp32, contiguous: weights (flattened per expert) and
            moments.
        steps: `[E]` int64, each expert's own step count (bias correction), incremented.
        grads: `[S, n]` fp32/bf16/fp16: the gradient of expert `expert_ids[i]` in row i.
        expert_ids: `[S]` int32/int64, distinct, in `[0, E)`.
        compute: `[E, n]` fp32/bf16/fp16 or None: receives the listed experts' new weights in its
            dtype (what the next upload reads).

    `p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`. Experts listed twice or out of
    range raise before anything is written.
    """
    _check(master, exp_avg, exp_avg_sq, steps, grads, expert_ids, compute, lr, betas[0], betas[1], eps, weight_decay)
    adamw_experts_op(master, exp_avg, exp_avg_sq, steps, grads.contiguous(), expert_ids.long(), compute, lr,
                     betas[0], betas[1], eps, weight_decay)
