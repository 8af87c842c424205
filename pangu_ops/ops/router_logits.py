"""pangu::router_logits — a learned router's logits `x @ weight^T` in fp32 whatever the inputs'
dtype (routing decisions are sensitive to rounding), without an fp32 copy of x.

Kernels: `reference.router_logits` (`F.linear(x.float(), weight.float())`), `csrc/router_logits.cpp`
(x and weight converted in cache-sized blocks, fp32 products and sums; bf16 on AMX-BF16 tiles, the
gradient split into two bf16 parts for dx). Backward: the op
`pangu::router_logits_backward` (x's gradient rounded once to x's dtype, the weight's once to its
dtype, as autograd rounds the fp32 gradients of the `.float()` copies). On devices whose backend has
no router kernel (GPUs, NPUs: the product is one call to their BLAS), the reference runs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from ._define import define


def _check(x: Tensor, weight: Tensor) -> None:
    checks.tensor("x", x, 2, "[T, H]", checks.FLOAT_DTYPES)
    checks.tensor("weight", weight, 2, "[E, H]", checks.FLOAT_DTYPES)
    checks.size("weight [E, H]", weight.shape[1], x.shape[1], "H (x.shape[1])")
    checks.same_device(x=x, weight=weight)


def _fake(x, weight):
    _check(x, weight)
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


def _check_backward(grad: Tensor, x: Tensor, weight: Tensor) -> None:
    _check(x, weight)
    checks.tensor("grad", grad, 2, "[T, E]", (torch.float32,))
    checks.size("grad [T, E]", tuple(grad.shape), (x.shape[0], weight.shape[0]), "the shape (T, E)")
    checks.same_device(grad=grad, x=x)


def _fake_backward(grad, x, weight, x_grad, weight_grad):
    _check_backward(grad, x, weight)
    return (x.new_empty(x.shape) if x_grad else x.new_empty(0),
            weight.new_empty(weight.shape) if weight_grad else weight.new_empty(0))


@define("router_logits_backward", fake=_fake_backward)
def router_logits_backward_op(grad: Tensor, x: Tensor, weight: Tensor, x_grad: bool,
                              weight_grad: bool) -> tuple[Tensor, Tensor]:
    """(grad_x in x's dtype, grad_weight in weight's dtype); each empty unless asked for."""


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    x_grad, weight_grad = ctx.needs_input_grad[:2]
    dx, dw = router_logits_backward_op(grad, x, weight, x_grad, weight_grad)
    return (dx if x_grad else None), (dw if weight_grad else None)


@define("router_logits", fake=_fake, setup_context=_setup_context, backward=_backward)
def router_logits_op(x: Tensor, weight: Tensor) -> Tensor:
    """logits [T, E] fp32: see `router_logits`."""


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x.float(), weight.float())` without the fp32 copies: logits `[T, E]` in fp32.

    Args:
        x: `[T, H]` tokens, float32 / bfloat16 / float16.
        weight: `[E, H]` the router's weight (any of those dtypes).

    Products and sums in fp32 (exact conversions; only the order of the sums differs from BLAS's).
    Differentiable in both: their gradients are computed in fp32 and rounded once to each input's
    dtype.
    """
    _check(x, weight)
    return router_logits_op(x, weight)
