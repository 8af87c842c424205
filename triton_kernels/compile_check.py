"""`pangu-ops compile-check`: every Triton kernel variant the launch code can pick, compiled by
Triton's real compiler for a GPU target on a machine without a GPU.

A variant is a kernel with the arguments a launch gives it (pointer dtypes, sizes and strides, as
they specialise: strides of 1 and multiples of 16), its constexprs and one autotune config. The
kernel's own `warmup` compiles it through the same path a launch takes, against a stand-in driver
that names the target (`TARGETS`), so what is checked is what a GPU would run. Each result holds
ok / the compiler's error, shared memory against the target's per-block limit, registers and
spill bytes (ptxas' report; on AMD the assembly's register and scratch counts), the matrix
instructions used (wgmma / mma.sync / MFMA, or FMA: plain multiply-adds), and the blocks per SM that
fit (`occupancy`). Results are cached by (source hash, target, variant, Triton version), so a
repeated run compiles only what changed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import itertools
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget

from ..backends.cache import cache_dir

from .targets import TARGETS, Target, occupancy

# (the package's names grouped_gemm / permute / unpermute are the host functions: import the modules)
gg = importlib.import_module(f"{__package__}.grouped_gemm")
pm = importlib.import_module(f"{__package__}.permute")
up = importlib.import_module(f"{__package__}.unpermute")


@dataclass
class Variant:
    kernel: str
    dtype: str
    mode: str
    config: str
    fn: object  # the JITFunction
    args: tuple  # positional launch arguments (torch dtypes stand for tensors)
    kwargs: dict  # constexprs and the config's num_warps / num_stages
    kept: bool = True  # whether the launch code would keep this config on the target

    @property
    def num_warps(self) -> int:
        return self.kwargs.get("num_warps", 4)


@dataclass
class Result:
    target: str
    kernel: str
    dtype: str
    mode: str
    config: str
    kept: bool
    ok: bool
    error: str = ""
    shared: int | None = None
    shared_limit: int = 0
    regs: int | None = None
    spills: int | None = None  # bytes: spill stores + loads (NVIDIA), scratch (AMD)
    mma: str = ""
    blocks_per_sm: int | None = None
    seconds: float = 0.0
    cached: bool = False


# ---- the variants ----

# "fp32": IEEE fp32 (torch's default); "tf32": fp32 operands where torch allows TF32 (NVIDIA only)
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# DeepSeek-V3-like expert GEMMs (E = 256, hidden 7168, expert ffn 2048), and odd sizes.
SHAPES = {"deepseek": dict(S=65536, E=256, K=7168, N=2048), "odd": dict(S=37 * 8, E=5, K=100, N=600)}


def _gemm_variants(target: Target, dtypes, shapes, configs: str) -> Iterator[Variant]:
    kernel = gg._grouped_gemm_kernel
    for dname in dtypes:
        dtype = DTYPES[dname]
        precision = "tf32" if dname == "tf32" else "ieee"
        if precision == "tf32" and target.backend != "cuda":
            continue
        for shape_name in shapes:
            sh = SHAPES[shape_name]
            S, E, K, N = sh["S"], sh["E"], sh["K"], sh["N"]
            modes = [("NN", False, False, "swiglu", False), ("NT", True, False, "swiglu", False),
                     ("gated", False, True, "swiglu", False), ("gated NT", True, True, "swiglu", False),
                     ("gated geglu_tanh clamp", True, True, "geglu_tanh", True)]
            for mode, trans_b, gated, act, clamp in modes:
                width = 2 * N if gated else N
                # w [E, K, width] or transposed [E, width, K]; x [S, K]; y [S, N or 2N]
                s_wk, s_wn = (1, K) if trans_b else (width, 1)
                args = (dtype, dtype, dtype, dtype, torch.int64, S, E, N, K, 7.0 if clamp else 0.0,
                        K, 1, K * width, s_wk, s_wn, width, 1, N)
                constexprs = dict(GATED=gated, ACT=gg.ACT_CODES[act], CLAMP=clamp, UPCAST=False)
                aligned = K % 16 == 0 and N % 16 == 0
                kept = {str(c) for c in gg.kept_configs(dtype, gated, precision, shared_limit=target.shared_per_block,
                                                        big_registers=target.arch == 90, aligned=aligned)}
                for cfg in _configs(gg.gemm_config_list(dtype, gated, precision, aligned), configs, kept):
                    yield Variant("grouped_gemm", dname, f"{mode} {shape_name}", _cfg_name(cfg), kernel.fn, args,
                                  {**constexprs, "PRECISION": precision, **cfg.all_kwargs()}, kept=str(cfg) in kept)
        kept = {str(c) for c in gg.kept_configs(dtype, False, precision, shared_limit=target.shared_per_block,
                                                big_registers=target.arch == 90, aligned=True, wgrad=True)}
        for cfg in _configs(gg.gemm_config_list(dtype, False, precision), configs, kept):
            sh = SHAPES[shapes[0]]
            args = (dtype, dtype, dtype, torch.int64, torch.int64, sh["K"], sh["N"], sh["K"], 1, sh["N"], 1,
                    sh["K"] * sh["N"], sh["N"], 1)
            yield Variant("grouped_gemm_wgrad", dname, f"wgrad {shapes[0]}", _cfg_name(cfg), gg._grouped_wgrad_kernel.fn,
                          args, {"UPCAST": False, "PRECISION": precision, **cfg.all_kwargs()}, kept=str(cfg) in kept)


def _cfg_name(cfg) -> str:
    k = cfg.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"


def _configs(configs, which: str, kept: set[str]):
    """All configs, or the first that the target keeps (the first one if it keeps none)."""
    if which == "all":
        return configs
    return [next((c for c in configs if str(c) in kept), configs[0])]


def _data_variants(dtypes) -> Iterator[Variant]:
    dtypes = [d for d in dtypes if d != "tf32"]
    for dname in dtypes:
        dtype = DTYPES[dname]
        # many experts, and few (the smallest one-hot block: Triton 3.6 failed on narrower ones)
        for lookup, E in itertools.product((False, True), (256, 3)):
            mode = "rre_dispatch" if lookup else "permute"
            e_pad = pm.expert_columns(E)
            common = dict(LOOKUP=lookup, BLOCK=pm.block_slots(lookup, e_pad), E_PAD=e_pad,
                          num_warps=pm.num_warps(e_pad))
            if dname == dtypes[0]:  # the histogram reads no rows: one dtype is enough
                yield Variant("permute histogram", "-", f"{mode} E={E}", "-", pm._histogram_kernel,
                              (torch.int64, torch.int64, torch.int64, 4096, 8, 50000, torch.int64, torch.int64,
                               65536, E, 8), common)
            yield Variant("permute scatter", dname, f"{mode} E={E}", "-", pm._scatter_kernel,
                          (torch.int64, torch.int64, torch.int64, 4096, 8, 50000, dtype, dtype, torch.int64, torch.int64,
                           65536, E, 8, 7168, 7168, 7168), {**common, "BLOCK_H": pm.BLOCK_H})
        yield Variant("unpermute combine", dname, "k=8", "-", up._combine_kernel,
                      (dtype, torch.int64, torch.float32, dtype, 8192, 7168, 8, 7168, 7168),
                      {"HAS_W": True, "BLOCK_T": up.BLOCK_T, "BLOCK_N": up.BLOCK_N})
        yield Variant("unpermute backward", dname, "k=8", "-", up._backward_kernel,
                      (dtype, torch.int64, torch.float32, dtype, dtype, torch.float32, 65536, 7168, 65536, 8, 7168,
                       7168, 7168), {"HAS_W": True, "WGRAD": True, "BLOCK_R": up.BLOCK_R, "BLOCK_N": up.BLOCK_N})


def variants(target: Target, *, configs: str = "all", dtypes=tuple(DTYPES), shapes=tuple(SHAPES)) -> list[Variant]:
    """configs: "all" (every config the autotuner may try) or "first" (the first kept one)."""
    return list(_gemm_variants(target, dtypes, shapes, configs)) + list(_data_variants(dtypes))


# ---- compiling without a GPU ----

class _StandInDriver:
    """What JITFunction.warmup asks of the active driver, for a target with no device here."""

    def __init__(self, target: Target):
        self.target = GPUTarget(target.backend, target.arch, target.warp_size)
        self.device = f"compile-check:{target.name}"

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def _target(target: Target):
    from triton.runtime.driver import driver

    previous = driver._active
    driver.set_active(_StandInDriver(target))
    try:
        yield
    finally:
        driver._active = previous


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _nvidia_usage(log: str) -> tuple[int | None, int | None]:
    regs = [int(m) for m in _PTXAS.findall(log)]
    spills = [int(a) + int(b) for a, b in _SPILLS.findall(log)]
    return (max(regs) if regs else None), (max(spills) if spills else None)


def _amd_usage(asm: str) -> tuple[int | None, int | None]:
    vgpr = re.search(r"\.vgpr_count:\s+(\d+)", asm)
    agpr = re.search(r"\.agpr_count:\s+(\d+)", asm)
    scratch = re.search(r"ScratchSize: (\d+)", asm)
    regs = (int(vgpr.group(1)) + (int(agpr.group(1)) if agpr else 0)) if vgpr else None
    return regs, (int(scratch.group(1)) if scratch else None)


def _mma(asm: dict) -> str:
    ptx = asm.get("ptx", "")
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    if re.search(r"v_mfma", asm.get("amdgcn", "")):
        return "MFMA"
    return "FMA"


def _key(target: Target, v: Variant) -> str:
    parts = [triton.__version__, target.name, v.fn.cache_key, repr(v.args), repr(sorted(v.kwargs.items()))]
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def compile_one(target: Target, v: Variant) -> Result:
    from triton import knobs

    result = Result(target.name, v.kernel, v.dtype, v.mode, v.config, v.kept, ok=False,
                    shared_limit=target.shared_per_block)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        # a fresh Triton cache: a cached kernel would come back without ptxas' register report
        with _target(target), contextlib.redirect_stdout(log), knobs.nvidia.scope(), knobs.cache.scope(), \
                tempfile.TemporaryDirectory() as fresh:
            knobs.nvidia.dump_ptxas_log = True
            knobs.cache.dir = fresh
            compiled = v.fn.warmup(*v.args, grid=(1,), **v.kwargs)
        result.ok = True
        result.shared = int(compiled.metadata.shared)
        asm = compiled.asm
        if target.backend == "cuda":
            result.regs, result.spills = _nvidia_usage(log.getvalue())
        else:
            result.regs, result.spills = _amd_usage(asm.get("amdgcn", ""))
        result.mma = _mma(asm)
        result.blocks_per_sm = occupancy(target, v.num_warps, result.regs, result.shared)
    except Exception as e:  # the compiler's own message is the result
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    result.seconds = time.perf_counter() - start
    return result


def run(targets: list[str], *, configs: str = "all", dtypes=tuple(DTYPES), shapes=tuple(SHAPES),
        progress: Callable[[str], None] | None = None) -> list[Result]:
    """Compiles every variant for every target (cached results are reused, not recompiled)."""
    results = []
    cache = cache_dir("compile_check")
    for name in targets:
        target = TARGETS[name]
        todo = variants(target, configs=configs, dtypes=dtypes, shapes=shapes)
        for i, v in enumerate(todo, 1):
            path = cache / f"{_key(target, v)}.json"
            if path.exists():  # the compiler's facts; the labels are this variant's
                r = dataclasses.replace(Result(**json.loads(path.read_text())), kernel=v.kernel, dtype=v.dtype,
                                        mode=v.mode, config=v.config, kept=v.kept, cached=True)
            else:
                r = compile_one(target, v)
                path.write_text(json.dumps(dataclasses.asdict(r)))
            results.append(r)
            if progress:
                progress(f"[{name} {i}/{len(todo)}] {v.kernel} {v.dtype} {v.mode} {v.config}: "
                         f"{'ok' if r.ok else 'ERROR'}{' (cached)' if r.cached else f' {r.seconds:.1f}s'}")
    return results


def table(results: list[Result]) -> str:
    head = (f"{'target':<7} {'kernel':<19} {'dtype':<5} {'mode':<30} {'config':<20} {'kept':<4} {'result':<6} "
            f"{'shared KiB':>10} {'limit':>6} {'regs':>5} {'spill B':>7} {'mma':<8} {'blk/SM':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        shared = f"{r.shared / 1024:.1f}" if r.shared is not None else "-"
        over = "!" if r.shared is not None and r.shared > r.shared_limit else ""
        lines.append(f"{r.target:<7} {r.kernel:<19} {r.dtype:<5} {r.mode:<30} {r.config:<20} "
                     f"{'yes' if r.kept else 'no':<4} {'ok' if r.ok else 'ERROR':<6} {shared + over:>10} "
                     f"{r.shared_limit // 1024:>6} {r.regs if r.regs is not None else '-':>5} "
                     f"{r.spills if r.spills is not None else '-':>7} {r.mma:<8} "
                     f"{r.blocks_per_sm if r.blocks_per_sm is not None else '-':>6}")
        if not r.ok:
            lines.append(f"        {r.error}")
    return "\n".join(lines)


def problems(results: list[Result]) -> list[str]:
    """What the CI test asserts, as messages: compile errors; kept configs over the shared-memory
    limit; kept 16-bit (and TF32) GEMM configs that spill; those GEMMs not on the target's matrix
    units."""
    out = []
    for r in results:
        where = f"{r.target} {r.kernel} {r.dtype} {r.mode} {r.config}"
        if not r.ok:
            if r.kept:
                out.append(f"{where}: does not compile: {r.error}")
            continue
        if r.kept and r.shared > r.shared_limit:
            out.append(f"{where}: kept, but needs {r.shared} B of shared memory (limit {r.shared_limit})")
        gemm16 = r.kernel.startswith("grouped_gemm") and r.dtype in ("bf16", "fp16", "tf32")
        if r.kept and gemm16 and r.spills:
            out.append(f"{where}: kept, but spills {r.spills} B")
        want = {"sm90": {"wgmma"}, "sm80": {"mma.sync"}, "gfx942": {"MFMA"}}[r.target]
        if r.target == "sm90" and " odd" in r.mode:  # unaligned sizes take tiles below wgmma's 64 rows
            want = {"wgmma", "mma.sync"}
        if gemm16 and r.kept and r.mma not in want and r.kernel == "grouped_gemm":
            out.append(f"{where}: uses {r.mma}, not {' or '.join(sorted(want))}")
    return out


def main(targets: list[str], out: Path | None, configs: str = "all") -> int:
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = run(targets, configs=configs, progress=progress)
    print(table(results))
    found = problems(results)
    print(f"\n{len(results)} variants, {sum(r.ok for r in results)} compiled, "
          f"{sum(r.kept for r in results)} kept by the launch code; {len(found)} problems")
    for p in found:
        print(f"  {p}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compile_check.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    return 1 if found else 0


__all__ = ["TARGETS", "Result", "Variant", "compile_one", "main", "occupancy", "problems", "run", "table", "variants"]
