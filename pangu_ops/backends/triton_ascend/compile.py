"""Compile: a kernel of `triton_kernels/` through triton-ascend's front end and bishengir (steps 1-3 of
the package doc), to a shared library the CPU runs (`run.CpuKernel`)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from ..cache import cache_dir
from . import ARCH, CompileError, Unavailable, installed
from .run import CpuKernel, argument_types


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


def tools() -> dict[str, str]:
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
        workdir = cache_dir("triton_ascend") / f"{src.name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"
        with self.lock:
            if not (workdir / "kernel.so").exists():
                tmp = Path(tempfile.mkdtemp(dir=cache_dir("triton_ascend")))
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
        return CpuKernel(workdir / "kernel.so", src.name, argument_types(linalg, src.name), params, src.constants)
