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
    load: Callable[[], Any]  # returns the namespace holding the kernels by op name

    def runs_on(self, device: torch.device) -> bool:
        return not self.devices or device.type in self.devices


def _load_reference() -> Any:
    return importlib.import_module("pangu_ops.reference")


def _load_cpu() -> Any:
    try:
        importlib.import_module("pangu_ops._C")
    except ImportError as e:
        raise BackendUnavailable(
            f"the C++ extension pangu_ops._C is not built ({e}); "
            "run `pip install --no-build-isolation -e .` after installing torch"
        ) from e
    return torch.ops.pangu_cpu


# Triton reads TRITON_INTERPRET once, when its kernels are defined (at import): so do we.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _load_triton() -> Any:
    try:
        importlib.import_module("triton")
    except ImportError as e:
        raise BackendUnavailable(f"triton is not installed ({e}); `pip install triton`") from e
    from . import triton_ascend

    if triton_ascend.installed():
        raise BackendUnavailable("this triton is triton-ascend (Triton 3.2 for Ascend NPUs): the triton backend needs "
                                 "upstream Triton >= 3.6; the triton_ascend backend runs the kernels through it")
    if not TRITON_INTERPRET and not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device; set TRITON_INTERPRET=1 before importing pangu_ops to run "
                                 "the Triton kernels on CPU tensors in Triton's interpreter")
    return importlib.import_module("pangu_ops.triton_kernels")


def _load_ascend() -> Any:
    try:
        importlib.import_module("torch_npu")
    except ImportError as e:
        raise BackendUnavailable(f"torch_npu is not importable ({e}): the ascend backend needs an Ascend NPU, "
                                 "CANN and torch_npu (README: Ascend NPUs)") from e
    from . import ascend

    library = ascend.npu_library()
    if not library.exists():
        raise BackendUnavailable(f"the AscendC kernels are not built ({library} is missing): "
                                 "cmake -S ascend_kernels -B ascend_kernels/build && cmake --build ascend_kernels/build")
    torch.ops.load_library(str(library))
    return ascend.Kernels(ascend.NpuRunner())


def _load_ascend_twin() -> Any:
    from . import ascend

    try:
        library = ascend.build_twin()
    except (OSError, RuntimeError) as e:
        raise BackendUnavailable(f"cannot build the AscendC CPU twin: {e}") from e
    return ascend.Kernels(ascend.TwinRunner(library, int(os.environ.get("PANGU_OPS_ASCEND_TWIN_BLOCKS", "3"))))


def _load_triton_ascend() -> Any:
    from . import triton_ascend

    try:
        return triton_ascend.load_kernels()
    except triton_ascend.Unavailable as e:
        raise BackendUnavailable(str(e)) from e


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", (), _load_reference),
    "cpu": Backend("cpu", ("cpu",), _load_cpu),
    "triton": Backend("triton", ("cuda", "cpu") if TRITON_INTERPRET else ("cuda",), _load_triton),
    "ascend": Backend("ascend", ("npu",), _load_ascend),
    "ascend_twin": Backend("ascend_twin", ("cpu",), _load_ascend_twin),
    "triton_ascend": Backend("triton_ascend", ("cpu",), _load_triton_ascend),
}
# "auto": the backend native to each device type.
AUTO_BY_DEVICE = {"cpu": "cpu", "cuda": "triton", "npu": "ascend"}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("pangu_ops_backend", default=None)


def _checked_name(name: object, source: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    return str(name)


def current_backend() -> str:
    """The backend name in force: use_backend's, else $PANGU_OPS_BACKEND, else "auto"."""
    name = _override.get()
    if name is not None:
        return name
    return _checked_name(os.environ.get(ENV_VAR, "auto"), f"${ENV_VAR}")


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


_kernels: dict[tuple[str, str, str], Callable[..., Any]] = {}


def kernel(op: str, device: torch.device) -> Callable[..., Any]:
    """The function implementing internal op `op` for tensors on `device` (looked up once per
    setting, device type and op: this runs on every op call)."""
    key = (_override.get() or os.environ.get(ENV_VAR, "auto"), device.type, op)
    fn = _kernels.get(key)
    if fn is None:
        fn = _kernels[key] = getattr(load(resolve(device).name), op)
    return fn


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
    """The C++ CPU kernels' cache of large output blocks (outputs of 1 MiB and more reuse the memory
    of freed ones instead of fresh pages, whose first-touch faults cost more than filling them):
    `cached_bytes` held for reuse now, outputs `reused` from it and `fresh` blocks allocated so far.
    `clear=True` first returns the cached blocks to the system. Its size is capped by
    PANGU_OPS_CPU_OUTPUT_CACHE_MB (default 1024; 0 turns it off), read when the extension loads."""
    cached, reused, fresh = _load_cpu().output_cache(clear)
    return {"cached_bytes": cached, "reused": reused, "fresh": fresh}
