"""pangu_ops' Triton kernels through Huawei's Ascend Triton compiler, run on the CPU.

With PyPI's `triton-ascend` (Triton for Ascend NPUs, installed as `triton`) and `ascendnpu-ir`
(`bishengir-compile` / `bishengir-opt`), every launch of a kernel in `triton_kernels/` goes:

1. Triton source -> TTIR -> linalg, by triton-ascend's own stages (its `triton-adapter-opt`): the
   exact IR an Ascend NPU build hands to `bishengir-compile`;
2. `bishengir-compile --target=<Ascend arch>` over that IR, the full HFusion + HIVM pipeline
   (tiling, UB memory planning, synchronisation), which must accept the kernel; only its last step,
   CANN's external `hivmc`, is absent without CANN, and the compiler says so;
3. the linalg IR lowered to the LLVM dialect with `bishengir-opt` (the passes of its CPU-runner
   pipeline), translated to an object file by triton-ascend's own LLVM, linked with g++, and run
   program by program over the launch grid on CPU tensors.

So the kernels' indexing, masking and arithmetic are checked as the Ascend compiler's front end
lowers them, and step 2 checks that its back end accepts them. Not covered: the post-HIVM IR is not
executed (the CPU runner wants a host entry with tensor arguments only, and its runner binary is not
shipped), nor anything NPU-side (hivmc's code, timing).

The backend `triton_ascend` (CPU tensors) loads only where both wheels are installed; they replace
upstream Triton, so use a separate environment (README: Ascend NPUs).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from .ascend import cache_dir

ARCH = os.environ.get("PANGU_OPS_ASCEND_ARCH", "Ascend910B3")

# bishengir-compile without CANN: the whole pipeline runs, then it cannot find CANN's hivmc.
_MISSING_HIVMC = "Cannot find hivmc"

# The CPU-runner pipeline of bishengir (ExecutionEnginePipelines.cpp) without its host-main wrapper:
# HFusion/HIVM ops to upstream ones, bufferize, then down to the LLVM dialect.
_LOWER_TO_LLVM = [
    "--execution-engine-convert-hfusion-to-upstream", "--execution-engine-convert-hivm-to-upstream",
    "--convert-elementwise-to-linalg", "--empty-tensor-to-alloc-tensor",
    "--one-shot-bufferize=bufferize-function-boundaries=true function-boundary-type-conversion=identity-layout-map "
    "allow-return-allocs-from-loops=true",
    "--buffer-deallocation-pipeline", "--convert-bufferization-to-memref", "--annotation-lowering",
    "--expand-strided-metadata", "--convert-linalg-to-loops", "--canonicalize", "--lower-affine", "--convert-scf-to-cf",
    "--convert-vector-to-llvm", "--convert-math-to-llvm", "--finalize-memref-to-llvm", "--convert-func-to-llvm",
    "--convert-cf-to-llvm", "--convert-arith-to-llvm", "--convert-index-to-llvm", "--reconcile-unrealized-casts",
]

# What the lowered code calls besides libc: MLIR's strided memref copy (its C runner utils are not
# shipped), and bf16 rounding where the C library lacks it.
_RUNTIME_C = r"""
#include <stdint.h>
#include <string.h>
typedef struct { int64_t rank; void *descriptor; } UnrankedMemRef;
typedef struct { char *allocated, *aligned; int64_t offset, sizes_strides[]; } Descriptor;

/* dst <- src, element by element over the shape (row-major), both strided. */
void memrefCopy(int64_t elem, UnrankedMemRef *src, UnrankedMemRef *dst) {
  int64_t rank = src->rank, index[16] = {0};
  Descriptor *s = src->descriptor, *d = dst->descriptor;
  const int64_t *size = s->sizes_strides, *s_stride = s->sizes_strides + rank, *d_stride = d->sizes_strides + rank;
  for (int64_t i = 0; i < rank; ++i) if (size[i] == 0) return;
  for (;;) {
    int64_t so = s->offset, doff = d->offset;
    for (int64_t i = 0; i < rank; ++i) { so += index[i] * s_stride[i]; doff += index[i] * d_stride[i]; }
    memcpy(d->aligned + doff * elem, s->aligned + so * elem, elem);
    int64_t i = rank - 1;
    while (i >= 0 && ++index[i] == size[i]) index[i--] = 0;
    if (i < 0) return;
  }
}

/* fp32 -> bf16, round to nearest even (NaN stays NaN). LLVM expects the bf16 in the low 16 bits of
   the first FP return register (x86-64 xmm0, AArch64 h0), which C without __bf16 reaches as the
   low bits of a float. */
float __truncsfbf2(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  uint32_t b = (u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40 : (u + 0x7fffu + ((u >> 16) & 1)) >> 16;
  float out; memcpy(&out, &b, 4);
  return out;
}
"""


class Unavailable(RuntimeError):
    """triton-ascend or ascendnpu-ir is missing (or unusable) here."""


class CompileError(RuntimeError):
    """A step of the Ascend compiler rejected a kernel."""


def installed() -> bool:
    """Whether the installed `triton` is triton-ascend."""
    spec = importlib.util.find_spec("triton")
    return spec is not None and importlib.util.find_spec("triton.backends.ascend") is not None


def _tools() -> dict[str, str]:
    """Paths of triton-adapter-opt, bishengir-compile and bishengir-opt; Unavailable if missing."""
    if not installed():
        raise Unavailable("triton-ascend is not installed (`triton.backends.ascend` is missing): "
                          "pip install triton-ascend ascendnpu-ir in an environment of its own")
    spec = importlib.util.find_spec("ascendnpuir")
    if spec is None:
        raise Unavailable("ascendnpu-ir is not installed (no bishengir-compile): pip install ascendnpu-ir")
    bin_dir = Path(spec.origin).parent / "bin"
    from triton.backends.ascend import utils

    tools = {"triton-adapter-opt": utils._get_triton_adapter_opt_path(),
             "bishengir-compile": str(bin_dir / "bishengir-compile"), "bishengir-opt": str(bin_dir / "bishengir-opt")}
    for name, path in tools.items():
        if not os.access(path, os.X_OK):
            raise Unavailable(f"{name} is not executable at {path}")
    if shutil.which("g++") is None:
        raise Unavailable("g++ is needed to link the lowered kernels")
    return tools


def _cache_dir() -> Path:
    path = cache_dir() / "triton_ascend"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise CompileError(f"{what} failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
    return done


def check_accepted(linalg: str, tools: dict[str, str], workdir: Path) -> str:
    """Runs bishengir-compile's whole pipeline on the kernel for ARCH. Returns "binary" when it
    produced one (CANN's hivmc on PATH), "hivm" when everything up to hivmc passed; raises otherwise."""
    src = workdir / "kernel.linalg.mlir"
    src.write_text(linalg)
    cmd = [tools["bishengir-compile"], str(src), f"--target={ARCH}", "--enable-hfusion-compile=true",
           "--enable-hivm-compile=true", "--enable-triton-kernel-compile=true", f"--save-temps={workdir / 'temps'}",
           "-o", str(workdir / "kernel")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 0:
        return "binary"
    if _MISSING_HIVMC in done.stderr and (workdir / "temps" / "module.hivm.opt.mlir").exists():
        return "hivm"
    raise CompileError(f"bishengir-compile rejected the kernel:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")


_SCAN = re.compile(r"func\.func private @(triton_cumsum_\d+)\(tensor<([\dx]+)x(\w+)>, i32, i1\) -> tensor<[^>]*>")


def _scan_body(match: re.Match) -> str:
    """An MLIR body for triton-adapter's `triton_cumsum_N(x, dim, reverse)` (on the NPU, bishengir
    turns the call into hfusion.cumsum, which its CPU lowering does not cover): one walk over the
    elements in (reverse) row-major order, out[p] = x[p] + out[p -/+ 1 along dim]."""
    name, shape, elem = match.group(1), [int(n) for n in match.group(2).split("x")], match.group(3)
    ty, add = f"tensor<{match.group(2)}x{elem}>", "arith.addf" if "f" in elem else "arith.addi"
    rank = len(shape)
    out = [f"func.func @{name}(%x: {ty}, %dim32: i32, %rev: i1) -> {ty} {{",
           "%dim = arith.index_cast %dim32 : i32 to index", "%c0 = arith.constant 0 : index",
           "%c1 = arith.constant 1 : index", "%false = arith.constant false"]
    for j, n in enumerate(shape):
        out += [f"%n{j} = arith.constant {n} : index", f"%last{j} = arith.constant {n - 1} : index",
                f"%axis{j} = arith.constant {j} : index"]
    for j in range(rank):
        out.append(f"%r{j} = scf.for %i{j} = %c0 to %n{j} step %c1 iter_args(%t{j} = %{'x' if j == 0 else f't{j - 1}'}) "
                   f"-> ({ty}) {{")
    has = "%false"
    for j in range(rank):
        out += [f"%m{j} = arith.subi %last{j}, %i{j} : index", f"%p{j} = arith.select %rev, %m{j}, %i{j} : index",
                f"%on{j} = arith.cmpi eq, %dim, %axis{j} : index", f"%down{j} = arith.subi %p{j}, %c1 : index",
                f"%up{j} = arith.addi %p{j}, %c1 : index", f"%step{j} = arith.select %rev, %up{j}, %down{j} : index",
                f"%q{j} = arith.select %on{j}, %step{j}, %p{j} : index",
                f"%gt{j} = arith.cmpi ugt, %p{j}, %c0 : index", f"%lt{j} = arith.cmpi ult, %p{j}, %last{j} : index",
                f"%in{j} = arith.select %rev, %lt{j}, %gt{j} : i1", f"%h{j} = arith.andi %on{j}, %in{j} : i1",
                f"%has{j} = arith.ori {has}, %h{j} : i1"]
        has = f"%has{j}"
    p = ", ".join(f"%p{j}" for j in range(rank))
    q = ", ".join(f"%q{j}" for j in range(rank))
    acc = f"%t{rank - 1}"
    out += [f"%v = tensor.extract %x[{p}] : {ty}", f"%s = scf.if {has} -> ({elem}) {{",
            f"%u = tensor.extract {acc}[{q}] : {ty}", f"%w = {add} %u, %v : {elem}", f"scf.yield %w : {elem}",
            "} else {", f"scf.yield %v : {elem}", "}", f"%new = tensor.insert %s into {acc}[{p}] : {ty}",
            f"scf.yield %new : {ty}", "}"]
    for j in reversed(range(rank - 1)):
        out += [f"scf.yield %r{j + 1} : {ty}", "}"]
    out += [f"return %r0 : {ty}", "}"]
    return "\n".join(out)


def _with_library_functions(linalg: str) -> str:
    """The kernel's IR with bodies for the library functions it calls."""
    linalg = _SCAN.sub(_scan_body, linalg)
    missing = re.findall(r"func\.func private @(\w+)", linalg)
    if missing:
        raise CompileError(f"no CPU definition for the library function(s) {missing} the kernel calls")
    return linalg


def _lower_to_library(linalg: str, tools: dict[str, str], workdir: Path) -> Path:
    """Compiles the IR from _with_library_functions to a shared library in `workdir`."""
    from triton._C.libtriton import ir, llvm

    src, llvm_mlir = workdir / "kernel.cpu.mlir", workdir / "kernel.llvm.mlir"
    src.write_text(linalg)
    _run([tools["bishengir-opt"], str(src), *_LOWER_TO_LLVM, "-o", str(llvm_mlir)], "bishengir-opt (lowering to LLVM)")
    context = ir.context()
    ir.load_dialects(context)
    module = llvm.to_module(ir.parse_mlir_module(str(llvm_mlir), context), llvm.context())
    llvm.init_targets()
    obj = llvm.translate_to_asm(str(module), f"{platform.machine()}-unknown-linux-gnu", "", "", [], False, True)
    (workdir / "kernel.o").write_bytes(obj)
    (workdir / "runtime.c").write_text(_RUNTIME_C)
    library = workdir / "kernel.so"
    _run(["g++", "-shared", "-fPIC", "-x", "c", str(workdir / "runtime.c"), "-x", "none", str(workdir / "kernel.o"),
          "-lm", "-o", str(library)], "linking the kernel")
    return library


# MLIR argument types -> the C arguments of the lowered function (a rank-1 memref becomes
# allocated pointer, aligned pointer, offset, size, stride).
_SCALARS = {"i1": ctypes.c_bool, "i8": ctypes.c_int8, "i16": ctypes.c_int16, "i32": ctypes.c_int32,
            "i64": ctypes.c_int64, "f32": ctypes.c_float, "f64": ctypes.c_double}
_MEMREF = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]


def _argument_types(linalg: str, name: str) -> list[str]:
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


class Compiler:
    """Stands in for `triton.compiler.compile` on the kernels it is given (see the module doc)."""

    def __init__(self, tools: dict[str, str]):
        self.tools, self.lock = tools, threading.Lock()
        self.accepted: dict[str, str] = {}  # kernel variant -> "hivm" | "binary"

    def attach(self, fn):
        """Makes launches of JIT function `fn` compile here."""
        import triton
        from triton.runtime.driver import driver

        fn.create_binder(triton.compiler.make_backend(driver.active.get_current_target()))
        fn.compile = self
        return fn

    def __call__(self, src, target=None, options=None) -> CpuKernel:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton._C.libtriton import ir

        target = GPUTarget("npu", ARCH, 0)
        backend = make_backend(target)
        opts = backend.parse_options(dict(options or {}))
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        module = src.make_ir(opts, backend.get_codegen_implementation(), backend.get_module_map(), context)
        stages: dict = {}
        backend.add_stages(stages, opts)
        metadata = {"hash": src.hash(), "target": target, **opts.__dict__}
        linalg = stages["ttadapter"](stages["ttir"](module, metadata), metadata)
        cpu_linalg = _with_library_functions(linalg)
        key = f"{ARCH}\n{linalg}\n{cpu_linalg}\n{_RUNTIME_C}\n{_LOWER_TO_LLVM}"
        workdir = _cache_dir() / f"{src.name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"
        with self.lock:
            if not (workdir / "kernel.so").exists():
                tmp = Path(tempfile.mkdtemp(dir=_cache_dir()))
                try:
                    (tmp / "accepted").write_text(check_accepted(linalg, self.tools, tmp))
                    _lower_to_library(cpu_linalg, self.tools, tmp)
                    try:
                        tmp.rename(workdir)
                    except OSError:  # another process got there first
                        pass
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; else what failed
            status = (workdir / "accepted").read_text()
        self.accepted[f"{src.name} {sorted(src.signature.items())} {sorted(src.constants.items())}"] = status
        fn = src.fn
        params = [fn.params[i].name for i in fn.non_constexpr_indices]
        return CpuKernel(workdir / "kernel.so", src.name, _argument_types(linalg, src.name), params, src.constants)


class _Driver:
    """The active Triton driver where no NPU is: it names the Ascend target and never benchmarks
    (load_kernels leaves each autotuner one config)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("npu", ARCH, 0)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        return lambda kernel_call, quantiles=None, **kw: [1.0] * len(quantiles or [0])


def smallest_tile(configs: list) -> Any:
    return min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])


@functools.cache
def load_kernels() -> Any:
    """`pangu_ops.triton_kernels`, its launches compiled as the module doc says. Raises Unavailable
    where triton-ascend or ascendnpu-ir is missing."""
    tools = _tools()
    import triton.language.standard
    from triton.runtime import autotuner, jit
    from triton.runtime.driver import driver

    if not isinstance(triton.language.standard._sum_combine, jit.JITFunction):
        raise Unavailable("TRITON_INTERPRET=1 was set when triton was imported: Triton's own helpers (tl.sum, "
                          "tl.cumsum) are then interpreted and cannot be compiled; unset it")
    if importlib.util.find_spec("torch_npu") is None:
        driver.set_active(_Driver())  # before the kernels' autotuners ask it for a benchmarker
    module = importlib.import_module("pangu_ops.triton_kernels")
    compiler = Compiler(tools)
    for sub in list(sys.modules.values()):
        if getattr(sub, "__name__", "").startswith(module.__name__ + "."):
            for obj in vars(sub).values():
                if isinstance(obj, autotuner.Autotuner):
                    # CPU runs are no place to time configs, and the GPU's larger tiles overflow an
                    # AI core's 192 KiB unified buffer (bishengir refuses the gated 128 x 128 one)
                    obj.configs = [smallest_tile(obj.configs)]
                    obj = obj.fn
                if isinstance(obj, jit.JITFunction):
                    compiler.attach(obj)
    module.compiler = compiler
    return module


def jit(fn) -> Any:
    """`fn` as a Triton kernel compiled and run like the library's (for tests of this path)."""
    from triton.runtime.jit import JITFunction

    return load_kernels().compiler.attach(JITFunction(fn))
