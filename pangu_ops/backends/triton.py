"""The `triton` backend: the Triton kernels of `triton_kernels/` (installed as
`pangu_ops.triton_kernels`) on CUDA devices, or on CPU tensors in Triton's interpreter when
TRITON_INTERPRET=1 was set before import."""
from __future__ import annotations

import importlib
from typing import Any

import torch

from . import TRITON_INTERPRET, BackendUnavailable


def load() -> Any:
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
