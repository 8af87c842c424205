"""The Ascend backends (`ascend`, `ascend_twin`): pangu_ops' AscendC kernels (`ascend_kernels/`) behind the op registry.

The host side of every op lives here, once: argument checks, output allocation, the launch order
of an op's kernels and their tiling parameters. A runner launches each kernel:
- `ascend` on an Ascend NPU: `torch.ops.pangu_npu.*` from the library built with CANN
  (`ascend_kernels/CMakeLists.txt`, loaded from $PANGU_OPS_ASCEND_LIB or the build folder) on the
  current torch_npu stream;
- `ascend_twin` on CPU tensors: the same kernel sources compiled with g++ against the CPU twin of
  the AscendC API (`ascend_kernels/cpu_twin/`), run block by block. It verifies tiling, indexing,
  data movement and arithmetic; not the Ascend compiler's acceptance nor NPU performance.
Kernels: permute (count, scatter, gather), unpermute (inverse, reduce), grouped_gemm (forward and
weight gradient, Matmul API). expert_mlp and rre_dispatch compose them; unpermute's backward runs
the reduce kernel, its weights' gradient is torch (on the tensors' device).
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import os
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from .. import checks, reference, routing
from . import BackendUnavailable
from .cache import cache_dir

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TILE_M, TILE_N = 128, 256  # grouped GEMM output tile (the Matmul tiling's full single-core shape)


def kernel_dir() -> Path:
    """Where the AscendC sources are (the repository's ascend_kernels/, installed as package data)."""
    spec = importlib.util.find_spec("pangu_ops.ascend_kernels")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pangu_ops.ascend_kernels (the AscendC sources) is not installed")
    return Path(list(spec.submodule_search_locations)[0])


class Kernels:
    """The op namespace the registry hands out, on top of one runner."""

    def __init__(self, runner):
        self.run = runner

    def permute(self, x: Tensor, expert_ids: Tensor, num_experts: int):
        checks.expert_ids_values(expert_ids, num_experts)
        T, k = expert_ids.shape
        H = x.shape[1]
        ids = expert_ids.to(torch.int32).contiguous()
        blocks = self.run.blocks
        workspace = torch.empty(blocks, num_experts, dtype=torch.int32, device=x.device)
        self.run("permute_count", blocks, ids, workspace, T, k, num_experts)
        rows = int(workspace.sum())  # the one host sync: the output's size depends on the data
        group_sizes = torch.empty(num_experts, dtype=torch.int64, device=x.device)
        sorted_index = torch.empty(rows, dtype=torch.int64, device=x.device)
        self.run("permute_scatter", blocks, ids, workspace, group_sizes, sorted_index, T, k, num_experts, rows)
        x_sorted = x.new_empty(rows, H)
        if rows and H:
            self.run("permute_gather", blocks, x.contiguous(), sorted_index, x_sorted, T, k, H, rows, x.element_size())
        return x_sorted, group_sizes, sorted_index

    def unpermute(self, y_sorted: Tensor, sorted_index: Tensor, weights: Tensor | None, num_tokens: int, topk: int):
        checks.sorted_index_values(sorted_index, num_tokens * topk)
        rows, H = y_sorted.shape
        index = sorted_index.to(torch.int64).contiguous()
        inverse = torch.full((num_tokens * topk,), -1, dtype=torch.int64, device=y_sorted.device)
        blocks = self.run.blocks
        self.run("unpermute_inverse", blocks, index, inverse, num_tokens, topk, rows)
        y = y_sorted.new_empty(num_tokens, H)
        if num_tokens and H:
            w = None if weights is None else weights.float().contiguous()
            self.run("unpermute_reduce", blocks, DTYPE_CODES[y.dtype], y_sorted.contiguous(), inverse, w, y,
                     num_tokens, topk, H, rows)
        return y

    def unpermute_backward(self, grad_y, sorted_index, weights, y_sorted, topk):
        """grad_y_sorted[r] = w[slot] * grad_y[token of slot], through the reduce kernel: each sorted row
        is a "token" with one slot, reading row sorted_index[r] // topk of grad_y. The weights'
        gradient (a dot product per row) is the reference's torch code."""
        num_tokens = grad_y.shape[0]
        checks.sorted_index_values(sorted_index, num_tokens * topk)
        rows, H = sorted_index.shape[0], grad_y.shape[1]
        index = sorted_index.to(torch.int64)
        w = None if weights is None else weights.reshape(-1)[index].float().contiguous()
        grad_y_sorted = grad_y.new_empty(rows, H)
        if rows and H:
            self.run("unpermute_reduce", self.run.blocks, DTYPE_CODES[grad_y.dtype], grad_y.contiguous(),
                     (index // topk).contiguous(), w, grad_y_sorted, rows, 1, H, num_tokens)
        if y_sorted is None:
            return grad_y_sorted, grad_y.new_empty(0, dtype=torch.float32)
        return grad_y_sorted, reference.unpermute_weights_grad(grad_y, index, weights, y_sorted, topk)

    def grouped_gemm(self, x: Tensor, w: Tensor, group_sizes: Tensor, trans_b: bool) -> Tensor:
        checks.group_sizes_values("grouped_gemm", group_sizes, x.shape[0])
        E = w.shape[0]
        K, N = (w.shape[2], w.shape[1]) if trans_b else (w.shape[1], w.shape[2])
        rows = x.shape[0]
        if not (rows and N and K):
            return x.new_zeros(rows, N)
        y = x.new_empty(rows, N)
        self.run("grouped_gemm", self.run.blocks, DTYPE_CODES[x.dtype], x.contiguous(), w.contiguous(),
                 group_sizes.to(torch.int64).contiguous(), y, E, rows, K, N, TILE_M, TILE_N, int(trans_b), 0)
        return y

    def grouped_gemm_wgrad(self, x: Tensor, dy: Tensor, group_sizes: Tensor) -> Tensor:
        checks.group_sizes_values("grouped_gemm_wgrad", group_sizes, x.shape[0])
        E, rows, K, N = group_sizes.shape[0], x.shape[0], x.shape[1], dy.shape[1]
        dw = x.new_zeros(E, K, N)  # experts with no rows keep their zeros
        if rows and K and N:
            self.run("grouped_gemm", self.run.blocks, DTYPE_CODES[x.dtype], x.contiguous(), dy.contiguous(),
                     group_sizes.to(torch.int64).contiguous(), dw, E, rows, K, N, TILE_M, TILE_N, 0, 1)
        return dw

    def expert_mlp(self, x, w_gate_up, w_down, group_sizes, activation, trans_b, limit):
        gate_up = self.grouped_gemm(x, w_gate_up, group_sizes, trans_b)
        h = reference.gated(gate_up, activation, limit).to(x.dtype)
        return self.grouped_gemm(h, w_down, group_sizes, trans_b), gate_up

    def gated_backward(self, gate_up, dh, activation, limit):  # elementwise: the reference's torch ops
        return reference.gated_backward(gate_up, dh, activation, limit)

    def rre_dispatch(self, x, token_ids, domain_ids, table, num_experts):
        expert_ids = routing.rre_lookup(token_ids, domain_ids, table, num_experts)
        return self.permute(x, expert_ids.reshape(x.shape[0], table.shape[2] if table.dim() == 3 else 1), num_experts)


class TwinRunner:
    """Launches the kernels compiled against the CPU twin, on `blocks` emulated AI cores (default 3:
    uneven block ranges, and offsets carried across blocks)."""

    def __init__(self, library: Path, blocks: int):
        self.lib, self.blocks = ctypes.CDLL(str(library)), blocks

    def __call__(self, kernel: str, *args) -> None:
        def arg(a):
            if isinstance(a, Tensor):
                return ctypes.c_void_p(a.data_ptr())
            return ctypes.c_void_p(None) if a is None else ctypes.c_int64(int(a))
        getattr(self.lib, f"twin_{kernel}")(*(arg(a) for a in args))


def build_twin() -> Path:
    """Compiles the kernel sources against the CPU twin (g++, ~5 s), cached by source hash."""
    src = kernel_dir()
    files = sorted(src.glob("*.cpp")) + sorted(src.glob("*.h")) + sorted((src / "cpu_twin").rglob("*.[ch]*"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    library = cache_dir("ascend_twin") / f"libpangu_ascend_twin-{digest}.so"
    if not library.exists():
        tmp = library.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Werror",
               f"-I{src / 'cpu_twin'}", f"-I{src}", str(src / "cpu_twin" / "twin_runtime.cpp"), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"building the AscendC CPU twin failed:\n{' '.join(cmd)}\n{done.stderr}")
        tmp.replace(library)
    return library


class NpuRunner:
    """Launches the kernels on the current NPU stream through the CANN-built library."""

    def __init__(self):
        self.ops = torch.ops.pangu_npu
        self.blocks = int(self.ops.vector_core_num())

    def __call__(self, kernel: str, *args) -> None:
        getattr(self.ops, kernel)(*args)


def npu_library() -> Path:
    default = kernel_dir() / "build" / "libpangu_ascend.so"
    return Path(os.environ.get("PANGU_OPS_ASCEND_LIB", default))


def load() -> Kernels:
    """The `ascend` backend: the CANN-built kernels on the current NPU."""
    try:
        importlib.import_module("torch_npu")
    except ImportError as e:
        raise BackendUnavailable(f"torch_npu is not importable ({e}): the ascend backend needs an Ascend NPU, "
                                 "CANN and torch_npu (README: Ascend NPUs)") from e
    library = npu_library()
    if not library.exists():
        raise BackendUnavailable(f"the AscendC kernels are not built ({library} is missing): "
                                 "cmake -S ascend_kernels -B ascend_kernels/build && cmake --build ascend_kernels/build")
    torch.ops.load_library(str(library))
    return Kernels(NpuRunner())


def load_ascend_twin() -> Kernels:
    """The `ascend_twin` backend: the same sources on the CPU twin (built on first use)."""
    try:
        library = build_twin()
    except (OSError, RuntimeError) as e:
        raise BackendUnavailable(f"cannot build the AscendC CPU twin: {e}") from e
    return Kernels(TwinRunner(library, int(os.environ.get("PANGU_OPS_ASCEND_TWIN_BLOCKS", "3"))))
