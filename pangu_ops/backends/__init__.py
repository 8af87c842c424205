"""The backends that run pangu_ops kernels, and the switch between them.

Every op in `pangu_ops.ops` asks `kernel(op, device)` for the function to run. Which backend answers
is chosen by `use_backend(name)` (a context manager), else by the environment variable
`PANGU_OPS_BACKEND`, else `"auto"`: the backend native to the tensors' device.

| name        | runs on                     | kernels                                   |
|-------------|-----------------------------|-------------------------------------------|
| `reference` | any device                  | `pangu_ops.reference` (pure PyTorch)      |
| `cpu`       | CPU tensors                 | C++ (`csrc/`, `torch.ops.pangu_cpu.*`)   |
| `triton`    | CUDA; CPU tensors too when TRITON_INTERPRET=1 | Triton (`triton_kernels/`) |
| `ascend`    | Ascend NPU (torch_npu)      | AscendC (`ascend_kernels/`), built with CANN |
| `ascend_twin` | CPU tensors               | the same AscendC sources on the CPU twin of the AscendC API |
| `triton_ascend` | CPU tensors             | the Triton kernels compiled by the Ascend Triton compiler (triton-ascend + bishengir), run on the CPU |

One module per adapter (`cpu`, `triton`, `ascend` for both AscendC backends, `triton_ascend/`)
says where its kernels come from and why they cannot load; `cache` is the one folder the
backends build into.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

BACKEND_NAMES = ("auto", "reference", "cpu", "triton", "ascend", "ascend_twin", "triton_ascend")
ENV_VAR = "PANGU_OPS_BACKEND"


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run here (not built, missing package, wrong device)."""


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]  # torch device types it runs on; empty = any
    adapter: str  # the module that loads its kernels: `pangu_ops.backends.<adapter>.load_<name>()`

    def runs_on(self, device: torch.device) -> bool:
        return not self.devices or device.type in self.devices

    def load(self) -> Any:
        """The namespace holding this backend's kernels by op name (BackendUnavailable: why not)."""
        if self.name == "reference":
            return importlib.import_module("pangu_ops.reference")
        module = importlib.import_module(f"{__name__}.{self.adapter}")
        return getattr(module, "load" if self.adapter == self.name else f"load_{self.name}")()


# Triton reads TRITON_INTERPRET once, when its kernels are defined (at import): so do we.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", (), ""),
    "cpu": Backend("cpu", ("cpu",), "cpu"),
    "triton": Backend("triton", ("cuda", "cpu") if TRITON_INTERPRET else ("cuda",), "triton"),
    "ascend": Backend("ascend", ("npu",), "ascend"),
    "ascend_twin": Backend("ascend_twin", ("cpu",), "ascend"),
    "triton_ascend": Backend("triton_ascend", ("cpu",), "triton_ascend"),
}
# "auto": the backend native to each device type.
AUTO_BY_DEVICE = {"cpu": "cpu", "cuda": "triton", "npu": "ascend"}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("pangu_ops_backend", default=None)


def _checked_name(name: object, source: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    return str(name)


# $PANGU_OPS_BACKEND read from os.environ's own mapping of encoded names (CPython's os._Environ,
# which os.environ[...] = and del keep current, as os.environ.get sees them): ~0.05 us against
# os.environ.get's ~0.5 us, paid by every op call (a decode step's, ~2% of a one-token
# Qwen3-MoE-shaped step). Where os.environ is not built that way, os.environ.get.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if isinstance(_ENV_DATA, dict) and all(
    callable(getattr(os.environ, f, None)) for f in ("encodekey", "decodevalue")) else None


def _setting() -> str:
    """use_backend's name, else $PANGU_OPS_BACKEND unchecked, else "auto"."""
    name = _override.get()
    if name is not None:
        return name
    if _ENV_KEY is None:
        return os.environ.get(ENV_VAR, "auto")
    raw = _ENV_DATA.get(_ENV_KEY)
    return "auto" if raw is None else os.environ.decodevalue(raw)


def current_backend() -> str:
    """The backend name in force: use_backend's, else $PANGU_OPS_BACKEND, else "auto"."""
    return _checked_name(_setting(), "$" + ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the pangu_ops ops inside the block on backend `name` (see the module docstring)."""
    token = _override.set(_checked_name(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)


@functools.cache
def load(name: str) -> Any:
    """The kernel namespace of backend `name`; raises BackendUnavailable with the reason."""
    return BACKENDS[name].load()


def resolve(device: torch.device) -> Backend:
    """The backend that runs ops on `device` under the current setting."""
    name = current_backend()
    if name == "auto":
        if device.type not in AUTO_BY_DEVICE:
            raise BackendUnavailable(f"pangu_ops has no backend for {device.type} tensors; "
                                     "use_backend('reference') runs the pure-PyTorch ops anywhere")
        name = AUTO_BY_DEVICE[device.type]
    backend = BACKENDS[name]
    if not backend.runs_on(device):
        raise BackendUnavailable(
            f"backend {name!r} runs on {', '.join(backend.devices)} tensors, not {device.type}"
        )
    return backend


_kernels: dict[tuple[str, str, Any], Any] = {}  # (setting, device type, op or ops) -> kernel(s)

# Ops whose reference serves as the kernel of a backend that has none: the router's fp32 product is
# a single call to the device's BLAS on GPUs and NPUs (only the CPU kernel saves its fp32 copies).
REFERENCE_WHERE_MISSING = frozenset({"router_logits", "router_logits_backward"})


def kernel(op: str, device: torch.device) -> Callable[..., Any]:
    """The function implementing internal op `op` for tensors on `device` (looked up once per
    setting, device type and op: this runs on every op call)."""
    key = (_setting(), device.type, op)
    fn = _kernels.get(key)
    if fn is None:
        name = resolve(device).name
        fn = getattr(load(name), op, None)
        if fn is None and op in REFERENCE_WHERE_MISSING:
            fn = getattr(load("reference"), op)
        if fn is None:
            raise BackendUnavailable(f"backend {name!r} has no {op} kernel; use_backend('reference') runs it anywhere")
        _kernels[key] = fn
    return fn


def kernels(ops: tuple[str, ...], device: torch.device) -> tuple[Callable[..., Any], ...]:
    """`kernel` of each of `ops`, looked up as one (a composite op's kernels: ~10 us of cold
    caches a lookup in a decode step)."""
    key = (_setting(), device.type, ops)
    fns = _kernels.get(key)
    if fns is None:
        fns = _kernels[key] = tuple(kernel(op, device) for op in ops)
    return fns


def serves(name: str, op: str) -> bool:
    """Whether backend `name` loads here and has a kernel for internal op `op`."""
    try:
        return hasattr(load(name), op)
    except BackendUnavailable:
        return False


@functools.cache
def _cpu_serves(op: str) -> bool:
    return serves("cpu", op)


def cpu_takes(op: str) -> bool:
    """Whether CPU tensors go to the cpu backend under the current setting and it has `op`: for the
    CPU-only C++ calls that stand in for several ops (`moe_experts`, `expert_mlp_backward`). Cheap:
    decode steps ask on every call."""
    return current_backend() in ("auto", "cpu") and _cpu_serves(op)


def status() -> dict[str, str | None]:
    """Backend name -> None when it loads here, else the reason it does not."""
    out: dict[str, str | None] = {}
    for name in BACKENDS:
        try:
            load(name)
            out[name] = None
        except BackendUnavailable as e:
            out[name] = str(e)
    return out


def cpu_output_cache(clear: bool = False) -> dict[str, int]:
    """The C++ CPU kernels' cache of large output blocks: see `backends.cpu.output_cache`."""
    from .cpu import output_cache

    return output_cache(clear)


def cpu_pack_cache(clear: bool = False) -> dict[str, int]:
    """The C++ CPU kernels' cache of packed expert weights: see `backends.cpu.pack_cache`."""
    from .cpu import pack_cache

    return pack_cache(clear)
