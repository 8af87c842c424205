"""How an op call reaches its kernel: through the torch.library custom op, or straight to it.

Every op is a `torch.library.custom_op` (schema, fake kernel, autograd): that is what
torch.compile, torch.export, `opcheck`, fake tensors, functorch transforms and dispatch modes
see. In plain eager mode the same kernels are reached without the dispatcher's Python layers:
custom_op's wrapper costs ~25 us a call and, on its first call, imports torch._dynamo (over a
second, more on a loaded machine). `Op.__call__` takes that short path only when nothing but
plain autograd is watching: not compiling, no dispatch mode, no functorch transform, every
tensor argument a plain `torch.Tensor`. It runs the same kernel (`backends.kernel`) and, when a
gradient is wanted, the same `setup_context` / `backward` through a `torch.autograd.Function`:
both paths give bit-identical values and gradients.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .. import backends

_functorch_active = torch._C._are_functorch_transforms_active
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _plain_eager(args: tuple) -> bool:
    if torch.compiler.is_compiling() or _dispatch_modes() or _functorch_active():
        return False
    return all(type(a) is torch.Tensor for a in args if isinstance(a, torch.Tensor))


def _wants_grad(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


class Op:
    """A pangu op callable like its custom op, `op(*args)`, with the eager short path above.

    `custom`: the custom op (fake kernel registered); `kernel`: the backend kernel's name
    (`backends.kernel(kernel, device)`, whose device is that of the first argument);
    `setup_context(ctx, inputs, output)` and `backward(ctx, *grads)`: its autograd formula,
    registered on the custom op and used by the eager path (None: an op only called inside other
    ops' backward passes, not itself differentiable).
    """

    def __init__(self, custom: Any, kernel: str, setup_context: Callable | None = None,
                 backward: Callable | None = None):
        self.custom, self.kernel = custom, kernel
        self._function = None
        if backward is None:
            return
        custom.register_autograd(backward, setup_context=setup_context)

        def forward(*args):
            return backends.kernel(kernel, args[0].device)(*args)

        self._function = type(f"{kernel}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        })

    def __call__(self, *args):
        if not _plain_eager(args):
            return self.custom(*args)
        if _wants_grad(args):
            if self._function is None:  # not differentiable: the custom op says so
                return self.custom(*args)
            return self._function.apply(*args)
        return backends.kernel(self.kernel, args[0].device)(*args)
