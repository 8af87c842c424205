"""The `cpu` backend: the C++ kernels of `csrc/`, built as `pangu_ops._C`.

They register as `torch.ops.pangu_cpu.<op>`: the backend's private names, with the schema of the
public op `torch.ops.pangu.<op>` of the same name (checked by `tests/test_backends.py`); users call
the public op, which reaches them through the registry.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Any

import torch

from . import BackendUnavailable


def load() -> Any:
    try:
        importlib.import_module("pangu_ops._C")
    except ImportError as e:
        raise BackendUnavailable(
            f"the C++ extension pangu_ops._C is not built ({e}); "
            "run `pip install --no-build-isolation -e .` after installing torch"
        ) from e
    return torch.ops.pangu_cpu


def has_amx() -> bool:
    """Whether the C++ kernels run AMX-BF16 tiles here (this CPU, and a build for it): the grouped
    tile kernels and the packed weights (`pangu_ops.prepack`). False where the extension is not built."""
    try:
        return bool(load().has_amx())
    except BackendUnavailable:
        return False


def has_avx512_bf16() -> bool:
    """Whether the C++ kernels were built with AVX512-BF16 (VDPBF16PS: bf16 pairs multiplied in the
    vectors), as for this CPU. False where the extension is not built."""
    try:
        return bool(load().has_avx512_bf16())
    except BackendUnavailable:
        return False


def packed_kernels() -> bool:
    """Whether the C++ kernels take prepacked expert weights here (`pangu_ops.prepack`): AMX-BF16
    tiles, else VDPBF16PS on broadcast bf16 pairs where `bf16_pair_dots` holds (AMD Zen 4). False
    where the extension is not built."""
    try:
        return bool(load().packed_kernels())
    except BackendUnavailable:
        return False


def bf16_pair_dots() -> bool:
    """Whether the C++ kernels' few-row bf16 products (decode-sized experts: weights with contiguous
    rows, as transformers' layout, and row-major weights of 2048+ columns) multiply by AVX512-BF16's
    VDPBF16PS, probed once as the faster here (AMD Zen 4), rather than by fp32 FMAs over widened
    halves (Intel Xeons, where VDPBF16PS issues at half their rate). False where the extension is
    not built."""
    try:
        return bool(load().bf16_pair_dots())
    except BackendUnavailable:
        return False


@contextlib.contextmanager
def _forced(force: str, on: bool):
    """The C++ probe behind `force` (an op of the extension taking 1 / 0, -1 = the probe) held at
    `on` while the block runs; the probe's choice after it."""
    getattr(load(), force)(int(on))
    try:
        yield
    finally:
        getattr(load(), force)(-1)


def bf16_pair_dots_forced(on: bool):
    """For tests: the few-row bf16 products on VDPBF16PS (`on`) or on fp32 FMAs while the block runs,
    whatever the probe chose (both kernels checked on any CPU with AVX512-BF16); the probe's choice
    after it."""
    return _forced("force_bf16_pair_dots", on)


def full_width_512() -> bool:
    """Whether this CPU runs a 512-bit FMA at the rate of a 256-bit one (AMD Zen 5, Xeons) rather
    than as two halves (AMD Zen 4), probed once: the few-row kernels and the VDPBF16PS kernels on
    prepacked weights take the software prefetch, the streams and (row-major weights) the product
    measured on each (csrc/common.h, `few_rows_dots`, `gemm_few_rows`; csrc/packed_pairs.h,
    `packed_pairs`). False without AVX-512 or where the extension is not built."""
    try:
        return bool(load().full_width_512())
    except BackendUnavailable:
        return False


def onednn_fp32() -> bool:
    """Whether the C++ kernels' fp32 products that go to a library (prefill-sized groups) run on
    oneDNN's matmul rather than BLAS's, probed once as clearly the faster here (AMD Zen 5: torch's
    MKL runs AVX2 code there, half the FMA rate of its 512-bit units). False where torch has no
    oneDNN or the extension is not built."""
    try:
        return bool(load().onednn_fp32())
    except BackendUnavailable:
        return False


def onednn_fp32_forced(on: bool):
    """For tests: fp32 library products on oneDNN (`on`) or BLAS while the block runs, whatever the
    probe chose (both checked wherever torch has oneDNN)."""
    return _forced("force_onednn_fp32", on)


def full_width_512_forced(on: bool):
    """For tests: the few-row dot kernels and the VDPBF16PS kernels on prepacked weights as tuned for
    full-width 512-bit units (`on`) or for halves while the block runs, whatever the probe chose
    (both checked on any CPU with AVX-512)."""
    return _forced("force_full_width_512", on)


def output_cache(clear: bool = False) -> dict[str, int]:
    """The C++ CPU kernels' cache of large output blocks (outputs of 1 MiB and more reuse the memory
    of freed ones instead of fresh pages, whose first-touch faults cost more than filling them):
    `cached_bytes` held for reuse now, outputs `reused` from it and `fresh` blocks allocated so far.
    `clear=True` first returns the cached blocks to the system. Its size is capped by
    PANGU_OPS_CPU_OUTPUT_CACHE_MB (default 1024; 0 turns it off), read when the extension loads."""
    cached, reused, fresh = load().output_cache(clear)
    return {"cached_bytes": cached, "reused": reused, "fresh": fresh}


def pack_cache(clear: bool = False) -> dict[str, int]:
    """The C++ CPU kernels' cache of packed expert weights (where the CPU has AMX-BF16: a bf16
    weight's tiles, row-major or with contiguous columns (transformers' layout, each layout of the
    same memory its own entry), made on a weight version's second use and reused by the
    prefill-sized products):
    `cached_bytes` and `entries` held now, lookups that found their weight's tiles (`hits`) and
    `packs` made so far. An entry goes with its weight, with a new version of it (an in-place update)
    and with writes that bypass the version (`.data`: checked on 16 sampled elements). `clear=True`
    first drops every entry. Capped by PANGU_OPS_CPU_PACK_CACHE_MB (default 2048, least recently
    used first; 0 turns it off), read when the extension loads."""
    cached, entries, hits, packs = load().pack_cache(clear)
    return {"cached_bytes": cached, "entries": entries, "hits": hits, "packs": packs}
