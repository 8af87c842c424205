"""How an op is defined, and how a call reaches its kernel.

`define` turns a signature (a typed Python function whose body is never run) into the op: the
`torch.library.custom_op` `pangu::<name>` with that schema, its fake kernel, its autograd formula,
and an `Op` that calls it. An op file then states only what is particular to it: argument checks,
the fake kernel's output shapes, the backward. The kernels come from the backend registry by the
op's name (`backends.kernel(name, device)`): `reference.<name>`, `torch.ops.pangu_cpu.<name>`,
`pangu_ops.triton_kernels.<name>`, ...

The custom op is what torch.compile, torch.export, `opcheck`, meta and fake tensors, functorch
transforms and dispatch and function modes see. In plain eager mode the same kernels are reached
without the dispatcher's Python layers: custom_op's wrapper costs ~25 us a call and, on its first
call, imports torch._dynamo (over a second, more on a loaded machine). `Op.__call__` takes that
short path only when nothing but plain autograd is watching (not compiling, no dispatch mode, no
torch function mode but `torch.device`'s, no functorch transform, every tensor argument a plain
`torch.Tensor` or `nn.Parameter`) and the
tensors' device has a backend that loads under the current setting; anything else goes through the
custom op. Both paths run the same kernel and, when a gradient is wanted, the same `setup_context` /
`backward`: they give bit-identical values and gradients.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import torch

from .. import backends

from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext

_functorch_active = torch._C._are_functorch_transforms_active
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
# Parameters are plain tensors to the dispatcher (their __torch_function__ is disabled)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _only_device_contexts() -> bool:
    """`with torch.device(...)` is a torch function mode that only picks factories' default
    device: the kernels place every output by their inputs, so it needs no custom op."""
    return all(isinstance(mode, DeviceContext) for mode in _get_current_function_mode_stack())


def _plain_eager(args: tuple) -> bool:
    if torch.compiler.is_compiling() or _dispatch_modes() or _functorch_active():
        return False
    if _function_modes() and not _only_device_contexts():
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and type(a) not in _PLAIN:
            return False
    return True


def _wants_grad(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


class Op:
    """A pangu op callable like its custom op, `op(*args)`, with the eager short path above.

    `custom`: the custom op (fake kernel registered); `name`: the kernel's name in every backend
    (whose device is that of the first argument); `setup_context(ctx, inputs, output)` and
    `backward(ctx, *grads)`: its autograd formula, registered on the custom op and used by the eager
    path (None: an op only called inside other ops' backward passes, or not differentiable).
    """

    def __init__(self, custom: Any, name: str, setup_context: Callable | None = None,
                 backward: Callable | None = None):
        self.custom, self.name = custom, name
        self._function = None
        if backward is None:
            return
        custom.register_autograd(backward, setup_context=setup_context)

        # the old-style Function (forward takes ctx): with a separate setup_context, every apply
        # binds its arguments through inspect.signature (~50 us a call)
        def forward(ctx, kernel, *args):
            ctx.needs_input_grad = ctx.needs_input_grad[1:]  # as the op's own inputs (no kernel)
            out = kernel(*args)
            setup_context(ctx, args, out)
            return out

        def backward_with_kernel(ctx, *grads):
            return None, *backward(ctx, *grads)

        self._function = type(f"{name}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward_with_kernel),
        })

    def _eager_kernel(self, args: tuple) -> Callable | None:
        """The kernel for the short path, or None where the custom op must take the call."""
        if not _plain_eager(args):
            return None
        try:
            return backends.kernel(self.name, args[0].device)
        except backends.BackendUnavailable:  # meta tensors, a device without a backend: the custom op
            return None                      # answers (shapes from the fake kernel, or the reason)

    def __call__(self, *args):
        kernel = self._eager_kernel(args)
        if kernel is None:
            return self.custom(*args)
        if _wants_grad(args):
            if self._function is None:  # not differentiable: the custom op says so
                return self.custom(*args)
            return self._function.apply(kernel, *args)
        return kernel(*args)


def define(name: str, *, fake: Callable, setup_context: Callable | None = None, backward: Callable | None = None,
           mutates_args: Iterable[str] = ()) -> Callable[[Callable], Op]:
    """Decorator: the op `pangu::<name>` with the decorated function's typed signature as its schema
    (its body is never run: every call goes to the backend kernel `name`), `fake` as its fake kernel
    (the arguments' metadata checks and the outputs' shapes), and the autograd formula if given."""
    def wrap(signature: Callable) -> Op:
        mutates = tuple(mutates_args)
        schema = torch.library.infer_schema(signature, mutates_args=mutates)

        @functools.wraps(signature)
        def run(*args):
            return backends.kernel(name, args[0].device)(*args)

        custom = torch.library.custom_op(f"pangu::{name}", run, mutates_args=mutates, schema=schema)
        custom.register_fake(fake)
        return Op(custom, name, setup_context, backward)

    return wrap
