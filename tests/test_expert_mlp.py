"""expert_mlp (gate/up GEMM + gate + down GEMM) against the reference and a plain loop."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import pangu_ops
from pangu_ops import reference, verify

from conftest import BACKENDS, DEVICE, reference_test


test_matches_reference = reference_test("expert_mlp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_per_expert_loop(backend):
    """Independent of the reference: the textbook SwiGLU MLP, one expert at a time."""
    sizes = torch.tensor([5, 0, 3, 9])
    x = torch.randn(17, 12)
    w_gate_up, w_down = torch.randn(4, 12, 2 * 10) * 0.3, torch.randn(4, 10, 7) * 0.3
    with pangu_ops.use_backend(backend):
        y = pangu_ops.expert_mlp(x, w_gate_up, w_down, sizes)
    parts = []
    for e, x_e in enumerate(x.split(sizes.tolist())):
        gate, up = (x_e @ w_gate_up[e]).chunk(2, dim=1)
        parts.append((F.silu(gate) * up) @ w_down[e])
    torch.testing.assert_close(y, torch.cat(parts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "geglu_tanh"])
@pytest.mark.usefixtures("bf16_dots", "dots_tuning")
def test_decode_sized_groups(dtype, trans_b, activation):
    """A decode step's groups (every expert 0-16 rows; fp32: 0-8, where the few-row kernels take
    fp32), both layouts, widths with tails (K = 70: 4 whole 16-element blocks and 6 more; 2F = 74,
    N = 45), clamped, against the reference on the same values."""
    sizes = torch.tensor([1, 0, 3, 8, 2, 6] if dtype == torch.float32 else [1, 2, 3, 4, 5, 0, 7, 16, 8])
    gen = verify.generator(2)
    E, K, F, N = len(sizes), 70, 37, 45
    x = verify.randn((int(sizes.sum()), K), dtype, gen)
    w_gate_up = verify.randn((E, 2 * F, K) if trans_b else (E, K, 2 * F), dtype, gen, scale=K ** -0.5)
    w_down = verify.randn((E, N, F) if trans_b else (E, F, N), dtype, gen, scale=F ** -0.5)
    y = pangu_ops.expert_mlp(x, w_gate_up, w_down, sizes, activation, trans_b=trans_b, limit=1.5)
    want, _ = reference.expert_mlp(x, w_gate_up, w_down, sizes, activation, trans_b, 1.5)
    torch.testing.assert_close(y, want, **verify.TOLERANCES[dtype])
    assert (y[:1] != 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sizes", [[0, 1, 0, 1], [3, 3, 0]])
def test_decode_experts_side_by_side(dtype, sizes):
    """A decode step whose experts split evenly over two threads, one expert each (for_experts runs
    them side by side, each product on one thread), against the reference."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sizes = torch.tensor(sizes)
        gen = verify.generator(5)
        E, K, F, N = len(sizes), 64, 48, 96
        x = verify.randn((int(sizes.sum()), K), dtype, gen)
        w_gate_up = verify.randn((E, 2 * F, K), dtype, gen, scale=K ** -0.5)
        w_down = verify.randn((E, N, F), dtype, gen, scale=F ** -0.5)
        y = pangu_ops.expert_mlp(x, w_gate_up, w_down, sizes, trans_b=True)
    finally:
        torch.set_num_threads(threads)
    want, _ = reference.expert_mlp(x, w_gate_up, w_down, sizes, "swiglu", True, float("inf"))
    torch.testing.assert_close(y, want, **verify.TOLERANCES[dtype])
    assert (y != 0).all()


@pytest.mark.parametrize("trans_b", [False, True])
def test_prefill_sized_groups(trans_b):
    """bf16 groups of more than 16 rows, K, F and N multiples of 32: where the CPU has AMX-BF16,
    both products run the grouped tile kernels (the gate between them over all rows), and the
    backward's dX, dh and dW too; groups of 0, 1, 17, 40 and 70 rows, clamped, against the reference
    on the same values (autograd through it for the gradients)."""
    sizes = torch.tensor([17, 0, 40, 1, 70])
    gen = verify.generator(12)
    E, K, F, N = len(sizes), 96, 64, 160
    x = verify.randn((int(sizes.sum()), K), torch.bfloat16, gen)
    w_gate_up = verify.randn((E, 2 * F, K) if trans_b else (E, K, 2 * F), torch.bfloat16, gen, scale=K ** -0.5)
    w_down = verify.randn((E, N, F) if trans_b else (E, F, N), torch.bfloat16, gen, scale=F ** -0.5)
    dy = verify.randn((x.shape[0], N), torch.bfloat16, gen)
    got = [t.clone().requires_grad_() for t in (x, w_gate_up, w_down)]
    y = pangu_ops.expert_mlp(*got, sizes, "swiglu", trans_b=trans_b, limit=2.0)
    y.backward(dy)
    want = [t.clone().requires_grad_() for t in (x, w_gate_up, w_down)]
    y_ref, _ = reference.expert_mlp(*want, sizes, "swiglu", trans_b, 2.0)
    y_ref.backward(dy)
    tol = verify.TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(y, y_ref, **tol)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.grad, r.grad, rtol=2 * tol["rtol"], atol=2 * tol["atol"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activation, limit", [("swiglu", None), ("geglu_tanh", 2.0)])
def test_decode_backward_in_one_cpu_call(activation, limit, dtype):
    """The CPU backend's one-call backward (`expert_mlp_backward`): a bf16 / fp32 decode step in
    transformers' layout (where the CPU has AVX512-BF16, experts of 1-8 rows, in one pass over
    each weight's rows: w_down's 131 rows in chunks of 32 at 5-8 rows (bf16) or 3-8 (fp32), else
    steps of 8 / 4 rows (bf16) or 4 (fp32), a pair and the last row alone (bf16); an expert alone
    splits them over the threads (65 and 66 rows: a chunk's pairs from an odd row); experts without rows: zero
    gradients), a row with a NaN (its expert's products one at a time), and a prefill-sized
    group (the grouped kernels one after the other): the gradients autograd gets from it equal
    the op's own, and match the reference on the same values."""
    if DEVICE != "cpu":
        pytest.skip("the CPU backend's call")
    em = importlib.import_module("pangu_ops.ops.expert_mlp")
    for sizes, nan_row in ((torch.tensor([1, 0, 2, 1, 5, 0, 8, 3, 4]), None), (torch.tensor([1, 3, 1]), 0),
                           (torch.tensor([0, 7, 0]), None), (torch.tensor([20, 1, 0]), None)):
        gen = verify.generator(int(sizes.sum()))
        E, K, F, N = len(sizes), 64, 32, 131
        x = verify.randn((int(sizes.sum()), K), dtype, gen)
        w_gate_up = verify.randn((E, 2 * F, K), dtype, gen, scale=K ** -0.5)
        w_down = verify.randn((E, N, F), dtype, gen, scale=F ** -0.5)
        dy = verify.randn((x.shape[0], N), dtype, gen)
        if nan_row is not None:
            dy[nan_row, 5] = float("nan")
        got = [t.clone().requires_grad_() for t in (x, w_gate_up, w_down)]
        y = pangu_ops.expert_mlp(*got, sizes, activation, trans_b=True, limit=limit)
        assert em._one_backward_call((True, True, True), (x, w_gate_up, w_down, sizes, x, dy))
        y.backward(dy)
        _, gate_up = torch.ops.pangu_cpu.expert_mlp(x, w_gate_up, w_down, sizes, activation, True,
                                                    math.inf if limit is None else limit)
        direct = torch.ops.pangu_cpu.expert_mlp_backward(x, w_gate_up, w_down, sizes, gate_up, dy, activation, True,
                                                         math.inf if limit is None else limit)
        want = [t.clone().requires_grad_() for t in (x, w_gate_up, w_down)]
        y_ref, _ = reference.expert_mlp(*want, sizes, activation, True, math.inf if limit is None else limit)
        y_ref.backward(dy)
        tol, bits = verify.TOLERANCES[dtype], torch.int16 if dtype == torch.bfloat16 else torch.int32
        for g, d, r in zip(got, direct, want):
            assert torch.equal(g.grad.view(bits), d.view(bits))  # NaNs too
            torch.testing.assert_close(g.grad, r.grad, rtol=2 * tol["rtol"], atol=2 * tol["atol"], equal_nan=True)
        empty = sizes == 0
        assert (got[1].grad[empty] == 0).all() and (got[2].grad[empty] == 0).all()
        assert got[1].grad[~empty].isnan().any() == (nan_row is not None)


GATES = {  # activation -> the textbook function of the gate
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": lambda g: 0.5 * g * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g ** 3))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", list(GATES))
def test_gates_on_transformers_layout_equal_per_expert_loop(backend, activation):
    """GeGLU / tanh-GeGLU / clamped SwiGLU over transformers' [E, 2F, K] / [E, N, F] weights
    (trans_b), values and gradients, against the textbook loop with F.linear (DeepSeek-V4's
    clamp: gate <= limit, |up| <= limit)."""
    limit = 0.9 if activation == "swiglu" else None
    sizes = torch.tensor([5, 0, 3, 9])
    x = torch.randn(17, 12, requires_grad=True)
    w_gate_up = (torch.randn(4, 2 * 10, 12) * 0.5).requires_grad_()  # [E, 2F, K]
    w_down = (torch.randn(4, 7, 10) * 0.3).requires_grad_()  # [E, N, F]
    with pangu_ops.use_backend(backend):
        y = pangu_ops.expert_mlp(x, w_gate_up, w_down, sizes, activation, trans_b=True, limit=limit)
    parts, clamped = [], 0
    for e, x_e in enumerate(x.split(sizes.tolist())):
        gate, up = F.linear(x_e, w_gate_up[e]).chunk(2, dim=1)
        if limit is not None:
            clamped += int((gate > limit).sum() + (up.abs() > limit).sum())
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        parts.append(F.linear(GATES[activation](gate) * up, w_down[e]))
    assert limit is None or clamped > 10  # the clamp is exercised
    want = torch.cat(parts)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad(y, (x, w_gate_up, w_down), g)
    for a, b in zip(got_grads, torch.autograd.grad(want, (x, w_gate_up, w_down), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_every_used_expert(backend):
    sizes = torch.tensor([4, 0, 2])
    x = torch.randn(6, 8, requires_grad=True)
    w_gate_up = (torch.randn(3, 8, 12) * 0.3).requires_grad_()
    w_down = (torch.randn(3, 6, 5) * 0.3).requires_grad_()
    with pangu_ops.use_backend(backend):
        pangu_ops.expert_mlp(x, w_gate_up, w_down, sizes).square().sum().backward()
    for w in (w_gate_up, w_down):
        assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1]))
        assert (w.grad[0] != 0).any() and (w.grad[2] != 0).any()
    assert (x.grad != 0).any()


BAD = {
    "odd gate_up width": ((torch.randn(4, 8), torch.randn(2, 8, 7), torch.randn(2, 3, 5), torch.tensor([2, 2])),
                          ValueError, "must be even"),
    "F mismatch": ((torch.randn(4, 8), torch.randn(2, 8, 8), torch.randn(2, 3, 5), torch.tensor([2, 2])),
                   ValueError, r"F \(half of w_gate_up's 2F\)"),
    "K mismatch": ((torch.randn(4, 9), torch.randn(2, 8, 8), torch.randn(2, 4, 5), torch.tensor([2, 2])),
                   ValueError, r"K \(x_sorted.shape\[1\]\)"),
    "sizes do not sum": ((torch.randn(4, 8), torch.randn(2, 8, 8), torch.randn(2, 4, 5), torch.tensor([2, 1])),
                         ValueError, "group_sizes sum to 3"),
    "dtype mismatch": ((torch.randn(4, 8), torch.randn(2, 8, 8).half(), torch.randn(2, 4, 5), torch.tensor([2, 2])),
                       TypeError, "same dtype"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(backend, name):
    args, exc, message = BAD[name]
    args = [a.to(DEVICE) for a in args]  # (made at import, on the CPU)
    with pangu_ops.use_backend(backend), pytest.raises(exc, match=message):
        pangu_ops.expert_mlp(*args)


def test_bad_limit_and_transposed_shapes():
    x, sizes = torch.randn(4, 8), torch.tensor([2, 2])
    with pytest.raises(ValueError, match="limit must be positive"):
        pangu_ops.expert_mlp(x, torch.randn(2, 8, 8), torch.randn(2, 4, 5), sizes, limit=0.0)
    with pytest.raises(ValueError, match=r"w_gate_up \[E, 2F, K\]: expected K \(x_sorted.shape\[1\]\) = 8, got 9"):
        pangu_ops.expert_mlp(x, torch.randn(2, 6, 9), torch.randn(2, 5, 3), sizes, trans_b=True)
    with pytest.raises(ValueError, match=r"w_down \[E, N, F\]: expected F \(half of w_gate_up's 2F\) = 3, got 4"):
        pangu_ops.expert_mlp(x, torch.randn(2, 6, 8), torch.randn(2, 5, 4), sizes, trans_b=True)


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        pangu_ops.expert_mlp(torch.randn(4, 8), torch.randn(2, 8, 8), torch.randn(2, 4, 5), torch.tensor([2, 2]),
                             activation="relu")


@pytest.mark.parametrize("eager_path", [True, False])
def test_saved_gate_up_is_not_differentiated(eager_path):
    """The op's second output (gate_up, kept for the backward pass) is non-differentiable, and the
    backward pass fills no zero gradient for it ([S, 2F] every step)."""
    sizes = torch.tensor([6, 0, 5])
    x = torch.randn(11, 8, requires_grad=True)
    w_gate_up = (torch.randn(3, 8, 2 * 16) * 0.3).requires_grad_()
    w_down = (torch.randn(3, 16, 8) * 0.3).requires_grad_()
    args = (x, w_gate_up, w_down, sizes, "swiglu", False, float("inf"))
    op = importlib.import_module("pangu_ops.ops.expert_mlp").expert_mlp_op if eager_path else torch.ops.pangu.expert_mlp
    y, gate_up = op(*args)
    assert y.requires_grad and not gate_up.requires_grad
    with torch.profiler.profile(record_shapes=True) as prof:
        y.square().sum().backward()
    filled = [e.input_shapes for e in prof.events() if e.name in ("aten::fill_", "aten::zero_", "aten::zeros")]
    assert not any(shapes and list(shapes[0]) == [11, 32] for shapes in filled), filled
    assert x.grad is not None and w_gate_up.grad is not None and w_down.grad is not None
