"""Run: a kernel lowered by `compile`, launched program by program over the grid on CPU tensors,
the way triton-ascend's JIT launches an NPU binary."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import torch

from . import CompileError

# MLIR argument types -> the C arguments of the lowered function (a rank-1 memref becomes
# allocated pointer, aligned pointer, offset, size, stride).
_SCALARS = {"i1": ctypes.c_bool, "i8": ctypes.c_int8, "i16": ctypes.c_int16, "i32": ctypes.c_int32,
            "i64": ctypes.c_int64, "f32": ctypes.c_float, "f64": ctypes.c_double}
_MEMREF = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]


def argument_types(linalg: str, name: str) -> list[str]:
    header = re.search(rf"func\.func @{re.escape(name)}\((.*?)\)\s*(?:->|attributes|\{{)", linalg, re.S)
    if header is None:
        raise CompileError(f"no function @{name} in the lowered kernel")
    return re.findall(r"%arg\d+: (memref<[^>]*>|\w+)", header.group(1))


class CpuKernel:
    """A compiled kernel, launched the way triton-ascend's JIT launches a binary: `run(grid, ...)`."""

    def __init__(self, library: Path, name: str, arg_types: list[str], params: list[str], constants: dict):
        self.lib = ctypes.CDLL(str(library))
        self.fn = getattr(self.lib, name)
        self.fn.restype = None
        argtypes = []
        for t in arg_types:
            argtypes += _MEMREF if t.startswith("memref") else [_SCALARS[t]]
        self.fn.argtypes = argtypes
        self.arg_types = arg_types
        # the runtime arguments the IR kept (Triton folds constants, e.g. ints equal to 1, into it)
        self.params = params
        self.kept = [p not in constants for p in params]
        self.function = self.packed_metadata = None
        self.scratch = torch.zeros(64, dtype=torch.int64)  # the kernels' sync-lock and workspace arguments

    def _init_handles(self) -> None:
        pass

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
        values = [a for a, keep in zip(args, self.kept) if keep]
        types = self.arg_types[2:len(self.arg_types) - 6]
        if len(values) != len(types):
            raise CompileError(f"{len(values)} runtime arguments for {len(types)} kernel parameters ({self.params})")
        c_args = self._memref(self.scratch) + self._memref(self.scratch)
        for value, t in zip(values, types):
            if t.startswith("memref"):
                c_args += self._memref(value)
            else:
                c_args.append(float(value) if t.startswith("f") else int(value))
        for z in range(gz):
            for y in range(gy):
                for x in range(gx):
                    self.fn(*c_args, gx, gy, gz, x, y, z)

    @staticmethod
    def _memref(t: torch.Tensor) -> list:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            raise TypeError(f"triton_ascend runs on CPU tensors, got {type(t).__name__} "
                            f"{getattr(t, 'device', '')}")
        size = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
        return [t.data_ptr(), t.data_ptr(), 0, size, 1]
