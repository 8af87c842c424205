"""Verification of every op and backend against `pangu_ops.reference`.

Shared by `pangu-ops verify` and the test suite: random inputs (never zeros), MoE routing with
dropped slots and experts that receive no token, forward values and gradients compared with the
reference's own autograd, with the tolerances below.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from . import backends, reference
from .routing import rre_route_table
from .ops import adamw_experts, expert_mlp, grouped_gemm, permute, router_logits, rre_dispatch, unpermute

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Per dtype, |actual - expected| <= atol * scale + rtol * |expected| elementwise, where scale is the
# RMS of the expected tensor (at least 1): rounding noise in a sum is proportional to the size of
# its terms, not to the (possibly cancelled) result. Both sides accumulate in fp32 and round once,
# so they may differ by one output ulp (bf16: 2^-8 relative, fp16: 2^-11) plus fp32
# summation-order noise; fp32 results differ only by the latter, which for sums of up to ~1e3
# products of O(1) values (dot products, weight gradients) stays below 1e-4.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-4},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-3},
    torch.float16: {"rtol": 2e-3, "atol": 1e-3},
}


@dataclass(frozen=True)
class Case:
    """One MoE problem: T tokens of width H, E experts, top-k, expert output width N."""

    tokens: int
    hidden: int
    ffn: int
    experts: int
    topk: int
    drop: float = 0.0  # share of slots dropped (expert id -1)
    empty: int = 0  # experts that receive no token

    @property
    def seed(self) -> int:
        """A seed of its own, stable across processes (unlike hash())."""
        return zlib.crc32(str(self).encode())

    def __str__(self) -> str:
        s = f"T={self.tokens} H={self.hidden} N={self.ffn} E={self.experts} k={self.topk}"
        return s + (f" drop={self.drop:g}" if self.drop else "") + (f" empty={self.empty}" if self.empty else "")


# Zero tokens, one token, odd widths (ScatterMoE's 100/600), empty experts, dropped slots, k 1..4.
CASES = (
    Case(0, 64, 48, 4, 2),
    Case(1, 64, 48, 4, 1),
    Case(37, 100, 600, 5, 2, drop=0.2, empty=2),
    Case(128, 96, 80, 8, 4, drop=0.1, empty=3),
    Case(300, 128, 64, 16, 2, empty=5),
)


@dataclass
class Result:
    op: str
    backend: str
    dtype: str
    case: str
    check: str
    max_err: float
    ok: bool
    detail: str = ""


# ---- random inputs ----

def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, *, scale: float = 1.0,
          noncontig: bool = False, device: torch.device | str | None = None) -> Tensor:
    """Standard normal values (never all zeros), drawn on the CPU from `gen` and moved to
    `device` (None: torch's default device); `noncontig` returns a strided view."""
    device = torch.get_default_device() if device is None else device
    if noncontig and len(shape) == 2:
        base = torch.randn(shape[0], 2 * shape[1], generator=gen, device="cpu") * scale
        return base.to(device, dtype)[:, ::2]
    return (torch.randn(shape, generator=gen, device="cpu") * scale).to(device, dtype)


def routing(case: Case, gen: torch.Generator, index_dtype: torch.dtype = torch.int64,
            device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """(expert_ids [T, k], weights [T, k] fp32) on `device` (None: torch's default device): k
    distinct experts per token drawn from the experts not chosen to stay empty, a share
    `case.drop` of slots set to -1."""
    device = torch.get_default_device() if device is None else device
    active = torch.randperm(case.experts, generator=gen, device="cpu")[: case.experts - case.empty]
    assert active.numel() >= case.topk, f"{case}: fewer active experts than k"
    picks = torch.rand(case.tokens, active.numel(), generator=gen, device="cpu").argsort(1)[:, : case.topk]
    ids = active[picks]
    if case.drop:
        ids[torch.rand(ids.shape, generator=gen, device="cpu") < case.drop] = -1
    weights = torch.rand(ids.shape, generator=gen, device="cpu") + 0.1
    return ids.to(device, index_dtype), (weights / weights.sum(1, keepdim=True)).to(device)


# ---- comparison ----

def max_error(actual: Tensor, expected: Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return float((actual.detach().double() - expected.detach().double()).abs().max())


def compare(check: str, actual: Tensor, expected: Tensor, dtype: torch.dtype | None,
            roundings: int = 1) -> tuple[str, float, bool, str]:
    """Checks shape, dtype and values; `dtype` None means bit-exact. `roundings`: how many
    roundings to `dtype` lie between the inputs and this result in a chain of ops (each may flip
    an intermediate by one ulp, whose effect the next op carries): the tolerance scales with it."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return check, float("nan"), False, (f"got {actual.dtype}{list(actual.shape)}, "
                                            f"expected {expected.dtype}{list(expected.shape)}")
    err = max_error(actual, expected)
    if dtype is None:
        ok = torch.equal(actual, expected)
        return check, err, ok, "" if ok else "not bit-identical"
    rtol, atol = (roundings * TOLERANCES[dtype][k] for k in ("rtol", "atol"))
    a, b = actual.detach().double(), expected.detach().double()
    atol *= max(1.0, float(b.square().mean().sqrt())) if b.numel() else 1.0
    ok = bool(((a - b).abs() <= atol + rtol * b.abs()).all())
    return check, err, ok, "" if ok else f"beyond rtol={rtol:g} atol={atol:g}"


def _grads(out: Tensor | tuple[Tensor, ...], inputs: list[Tensor], grad_out: Tensor) -> list[Tensor]:
    first = out[0] if isinstance(out, tuple) else out
    return list(torch.autograd.grad(first, inputs, grad_out, allow_unused=False))


# ---- per-op checks: each yields (check, max_err, ok, detail) ----

def _check_permute(dtype: torch.dtype, case: Case, gen: torch.Generator, dev: torch.device):
    for index_dtype in (torch.int64, torch.int32):
        x = randn((case.tokens, case.hidden), dtype, gen, noncontig=True, device=dev).requires_grad_()
        ids, _ = routing(case, gen, index_dtype, dev)
        got = permute(x, ids, case.experts)
        want = reference.permute(x, ids, case.experts)
        tag = "" if index_dtype == torch.int64 else " (int32 ids)"
        yield compare("x_sorted" + tag, got[0], want[0], None)
        yield compare("group_sizes" + tag, got[1], want[1], None)
        yield compare("sorted_index" + tag, got[2], want[2], None)
        g = randn(tuple(want[0].shape), dtype, gen, device=dev)
        yield compare("grad x" + tag, *(_grads(o, [x], g)[0] for o in (got, want)), dtype)


def _check_unpermute(dtype: torch.dtype, case: Case, gen: torch.Generator, dev: torch.device):
    ids, w = routing(case, gen, device=dev)
    x = randn((case.tokens, case.hidden), dtype, gen, device=dev)
    _, _, sorted_index = reference.permute(x, ids, case.experts)
    y_sorted = randn((sorted_index.numel(), case.ffn), dtype, gen, noncontig=True, device=dev).requires_grad_()
    for weights in (w.requires_grad_(), w.detach().to(dtype).requires_grad_(), None):
        tag = "no weights" if weights is None else f"{str(weights.dtype)[6:]} weights"
        got = unpermute(y_sorted, sorted_index, weights, case.tokens, topk=case.topk)
        want = reference.unpermute(y_sorted, sorted_index, weights, case.tokens, case.topk)
        yield compare(f"y ({tag})", got, want, dtype)
        inputs = [y_sorted] + ([weights] if weights is not None else [])
        g = randn((case.tokens, case.ffn), dtype, gen, device=dev)
        for name, a, b in zip(("grad y_sorted", "grad weights"), _grads(got, inputs, g),
                              _grads(want, inputs, g)):
            yield compare(f"{name} ({tag})", a, b, dtype)


def _check_grouped_gemm(dtype: torch.dtype, case: Case, gen: torch.Generator, dev: torch.device):
    ids, _ = routing(case, gen, device=dev)
    group_sizes = torch.bincount(ids[ids >= 0].long(), minlength=case.experts)
    rows, k_dim, n_dim = int(group_sizes.sum()), case.hidden, case.ffn
    x = randn((rows, k_dim), dtype, gen, noncontig=True, device=dev).requires_grad_()
    for trans_b in (False, True):
        shape = (case.experts, n_dim, k_dim) if trans_b else (case.experts, k_dim, n_dim)
        w = randn(shape, dtype, gen, scale=k_dim ** -0.5, device=dev).requires_grad_()
        tag = " (trans_b)" if trans_b else ""
        got = grouped_gemm(x, w, group_sizes, trans_b)
        want = reference.grouped_gemm(x, w, group_sizes, trans_b)
        yield compare("y" + tag, got, want, dtype)
        g = randn((rows, n_dim), dtype, gen, device=dev)
        for name, a, b in zip(("grad x", "grad w"), _grads(got, [x, w], g), _grads(want, [x, w], g)):
            yield compare(name + tag, a, b, dtype)


def _check_rre_dispatch(dtype: torch.dtype, case: Case, gen: torch.Generator, dev: torch.device):
    """RRE: case.experts experts split over (up to) 2 domains, case.tokens tokens as 1-2 samples,
    a vocabulary of 3 * hidden ids; then the same with a [D, V, k] hash-routing table."""
    domains = 2 if case.experts % 2 == 0 else 1
    table = rre_route_table(3 * case.hidden, case.experts, domains, seed=int(gen.initial_seed()) % 997,
                                    layer=0).to(dev)
    batch = 2 if case.tokens % 2 == 0 and case.tokens else 1
    token_ids = torch.randint(0, 3 * case.hidden, (batch, case.tokens // batch), generator=gen, device="cpu").to(dev)
    domain_ids = torch.randint(0, domains, (batch,), generator=gen, device="cpu").to(dev)
    # hash routing: a [D, V, k] table of k distinct experts per token id
    hash_table = torch.rand(domains, 3 * case.hidden, case.experts, generator=gen, device="cpu").argsort(-1)[..., :case.topk]
    for tag, tab in (("", table), (f" [hash k={case.topk}]", hash_table.to(dev))):
        x = randn((token_ids.numel(), case.hidden), dtype, gen, noncontig=True, device=dev).requires_grad_()
        got = rre_dispatch(x, token_ids, domain_ids, tab, case.experts)
        want = reference.rre_dispatch(x, token_ids, domain_ids, tab, case.experts)
        for name, a, b in zip(("x_sorted", "group_sizes", "sorted_index"), got, want):
            yield compare(name + tag, a, b, None)
        g = randn(tuple(want[0].shape), dtype, gen, device=dev)
        yield compare("grad x" + tag, *(_grads(o, [x], g)[0] for o in (got, want)), dtype)


# The gates checked besides plain SwiGLU over [E, K, 2F] weights, one per case (by its token count):
# (activation, trans_b, limit). 0.7 is not a bf16/fp16 value, so no rounded gate sits on the clamp.
GATE_VARIANTS = (("geglu", True, None), ("geglu_tanh", False, 0.7), ("swiglu", True, 0.7))


def _check_expert_mlp(dtype: torch.dtype, case: Case, gen: torch.Generator, dev: torch.device):
    ids, _ = routing(case, gen, device=dev)
    group_sizes = torch.bincount(ids[ids >= 0].long(), minlength=case.experts)
    rows, k_dim, f_dim = int(group_sizes.sum()), case.hidden, case.ffn
    for activation, trans_b, limit in (("swiglu", False, None), GATE_VARIANTS[case.tokens % len(GATE_VARIANTS)]):
        tag = "" if activation == "swiglu" and not trans_b and limit is None else \
            f" [{activation}{' trans_b' if trans_b else ''}{f' limit={limit}' if limit else ''}]"
        x = randn((rows, k_dim), dtype, gen, noncontig=True, device=dev).requires_grad_()
        up_shape, down_shape = ((2 * f_dim, k_dim), (k_dim, f_dim)) if trans_b else ((k_dim, 2 * f_dim), (f_dim, k_dim))
        w_gate_up = randn((case.experts, *up_shape), dtype, gen, scale=k_dim ** -0.5, device=dev).requires_grad_()
        w_down = randn((case.experts, *down_shape), dtype, gen, scale=f_dim ** -0.5, device=dev).requires_grad_()
        got = expert_mlp(x, w_gate_up, w_down, group_sizes, activation, trans_b=trans_b, limit=limit)
        want = reference.expert_mlp(x, w_gate_up, w_down, group_sizes, activation, trans_b,
                                    float("inf") if limit is None else limit)[0]
        yield compare("y" + tag, got, want, dtype, roundings=2)  # gate_up, then h and y
        g = randn((rows, k_dim), dtype, gen, device=dev)
        params = [x, w_gate_up, w_down]
        # dh and d_gate_up are rounded on the way to the weight and input gradients.
        for name, a, b in zip(("grad x", "grad w_gate_up", "grad w_down"), _grads(got, params, g),
                              _grads(want, params, g)):
            yield compare(name + tag, a, b, dtype, roundings=3)


def _check_adamw_experts(dtype: torch.dtype, case: Case, gen: torch.Generator, dev: torch.device):
    """The case's experts as rows of [E, n = hidden + ffn] fp32 host state with steps already taken,
    the experts that received tokens listed (in random order; none for zero tokens), gradients and
    the compute copy in `dtype`. The state is fp32 whatever `dtype`: compared at fp32 tolerance."""
    ids, _ = routing(case, gen, device=dev)
    used = torch.unique(ids[ids >= 0].long())
    listed = used[torch.randperm(used.numel(), generator=gen, device="cpu").to(dev)]
    n = case.hidden + case.ffn
    state = [randn((case.experts, n), torch.float32, gen, device=dev),
             randn((case.experts, n), torch.float32, gen, scale=0.1, device=dev),
             randn((case.experts, n), torch.float32, gen, scale=0.1, device=dev).square(),
             torch.randint(0, 5, (case.experts,), generator=gen, device="cpu").to(dev)]
    grads = randn((listed.numel(), n), dtype, gen, scale=0.3, device=dev)
    compute = randn((case.experts, n), dtype, gen, device=dev)
    hyper = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    got = [t.clone() for t in state] + [compute.clone()]
    want = [t.clone() for t in state] + [compute.clone()]
    adamw_experts(*got[:4], grads, listed, got[4], **hyper)
    with backends.use_backend("reference"):
        adamw_experts(*want[:4], grads, listed, want[4], **hyper)
    for name, a, b in zip(("master", "exp_avg", "exp_avg_sq"), got, want):
        yield compare(name, a, b, torch.float32)
    yield compare("steps", got[3], want[3], None)
    yield compare("compute", got[4], want[4], dtype)
    untouched = torch.ones(case.experts, dtype=torch.bool, device=dev)
    untouched[listed] = False
    yield compare("experts not listed", torch.cat([t[untouched].float().reshape(-1) for t in got]),
                  torch.cat([t[untouched].float().reshape(-1) for t in state + [compute]]), None)


def _check_router_logits(dtype: torch.dtype, case: Case, gen: torch.Generator, dev: torch.device):
    """The case's tokens through a router of its experts: x (strided) and the weight in `dtype`, the
    logits fp32 (products of exact conversions, only the sums' order differs: fp32 tolerance), the
    gradients rounded once to `dtype`."""
    x = randn((case.tokens, case.hidden), dtype, gen, noncontig=True, device=dev).requires_grad_()
    weight = randn((case.experts, case.hidden), dtype, gen, scale=case.hidden ** -0.5, device=dev).requires_grad_()
    got, want = router_logits(x, weight), reference.router_logits(x, weight)
    yield compare("logits", got, want, torch.float32)
    g = randn((case.tokens, case.experts), torch.float32, gen, device=dev)
    for name, a, b in zip(("grad x", "grad weight"), _grads(got, [x, weight], g), _grads(want, [x, weight], g)):
        yield compare(name, a, b, dtype)


CHECKS: dict[str, Callable] = {
    "permute": _check_permute,
    "unpermute": _check_unpermute,
    "grouped_gemm": _check_grouped_gemm,
    "expert_mlp": _check_expert_mlp,
    "rre_dispatch": _check_rre_dispatch,
    "adamw_experts": _check_adamw_experts,
    "router_logits": _check_router_logits,
}


def check(op: str, backend: str, dtype: torch.dtype, case: Case, seed: int | None = None,
          device: torch.device | str = "cpu") -> list[Result]:
    """Runs op on `backend` against the reference on `device` (inputs seeded by `seed`, default
    the case's own); one Result per compared output or gradient."""
    gen = generator(case.seed if seed is None else seed)
    results = []
    with backends.use_backend(backend):
        for name, err, ok, detail in CHECKS[op](dtype, case, gen, torch.device(device)):
            results.append(Result(op, backend, str(dtype).replace("torch.", ""), str(case), name, err, ok, detail))
    return results


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that load on this machine and run tensors on `device`."""
    dev = torch.device(device)
    return [n for n, why in backends.status().items() if why is None and backends.BACKENDS[n].runs_on(dev)]


def _lacks(backend: str, op: str) -> bool:
    try:
        return not hasattr(backends.load(backend), op)
    except backends.BackendUnavailable:  # reported by the check itself, as a failure to run
        return False


def run(ops: Iterable[str], backend_names: Iterable[str], dtypes: Iterable[torch.dtype],
        cases: Iterable[Case] = CASES, device: torch.device | str = "cpu") -> Iterator[Result]:
    for op in ops:
        for backend in backend_names:
            if _lacks(backend, op):  # a backend that loads but has no such kernel (adamw_experts: host only)
                continue
            for dtype in dtypes:
                for case in cases:
                    try:
                        yield from check(op, backend, dtype, case, device=device)
                    except Exception as e:  # a crash is a failure to report, not to hide
                        yield Result(op, backend, str(dtype).replace("torch.", ""), str(case), "run",
                                     float("nan"), False, f"{type(e).__name__}: {e}")


def as_dict(result: Result) -> dict:
    return dataclasses.asdict(result)
