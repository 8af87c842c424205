"""moe_experts: permute -> expert_mlp -> unpermute in one call. Its outputs against the three ops
called one after the other (bit for bit: the same kernels, also through the single C++ call of CPU
inference), its gradients, when the single call is taken, and its errors."""
import importlib
import math

import pytest
import torch

import pangu_ops
from pangu_ops import backends, packed_weights, verify
from pangu_ops.backends import cpu as cpu_backend

moe_module = importlib.import_module("pangu_ops.ops.moe_experts")

# (tokens, k, K, F, N, experts, trans_b): one token, a few tokens with dropped slots and experts
# without rows, odd widths, prefill-sized groups
CASES = [(1, 2, 64, 32, 64, 4, True), (7, 3, 100, 24, 36, 6, False), (300, 2, 64, 32, 96, 5, True),
         (64, 8, 96, 64, 32, 16, False)]


def _problem(tokens, k, K, F, N, E, trans_b, dtype, seed=0):
    gen = verify.generator(seed)
    x = verify.randn((tokens, K), dtype, gen)
    ids = torch.randint(0, E, (tokens, k), generator=gen, device="cpu").to(x.device)  # (gen draws on the CPU)
    ids[::3, 0] = -1  # dropped slots
    ids[ids == E - 1] = 0  # the last expert receives no rows
    weights = torch.rand(tokens, k, generator=gen, device="cpu").to(x.device)
    up = (2 * F, K) if trans_b else (K, 2 * F)
    down = (N, F) if trans_b else (F, N)
    w_gate_up = verify.randn((E, *up), dtype, gen, scale=K ** -0.5)
    w_down = verify.randn((E, *down), dtype, gen, scale=F ** -0.5)
    return x, ids, weights, w_gate_up, w_down


def _three_ops(x, ids, weights, w_gate_up, w_down, trans_b, activation="swiglu", limit=None):
    x_sorted, sizes, index = pangu_ops.permute(x, ids, w_gate_up.shape[0])
    y = pangu_ops.expert_mlp(x_sorted, w_gate_up, w_down, sizes, activation, trans_b=trans_b, limit=limit)
    return pangu_ops.unpermute(y, index, weights, x.shape[0], topk=ids.shape[1]), sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}k{c[1]}K{c[2]}F{c[3]}N{c[4]}E{c[5]}{'t' if c[6] else ''}")
def test_equals_the_three_ops(case, dtype):
    x, ids, weights, w_gate_up, w_down = _problem(*case, dtype)
    trans_b = case[-1]
    with torch.no_grad():
        y, sizes = pangu_ops.moe_experts(x, ids, weights, w_gate_up, w_down, trans_b=trans_b)
        y3, sizes3 = _three_ops(x, ids, weights, w_gate_up, w_down, trans_b)
    assert y.dtype == dtype and y.shape == (x.shape[0], w_down.shape[1 if trans_b else 2])
    assert torch.equal(sizes, sizes3) and int(sizes[-1]) == 0
    assert torch.equal(y, y3)
    # and the reference backend's, within the dtype's tolerance (one product per row)
    with backends.use_backend("reference"), torch.no_grad():
        y_ref, _ = pangu_ops.moe_experts(x, ids, weights, w_gate_up, w_down, trans_b=trans_b)
    tol = verify.TOLERANCES[dtype]
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=4 * tol["rtol"], atol=4 * tol["atol"])


@pytest.mark.parametrize("activation,limit", [("geglu", None), ("geglu_tanh", 0.5), ("swiglu", 0.25)])
def test_gates_and_no_weights(activation, limit):
    x, ids, _, w_gate_up, w_down = _problem(9, 2, 64, 32, 32, 4, False, torch.bfloat16, seed=1)
    with torch.no_grad():
        y, _ = pangu_ops.moe_experts(x, ids, None, w_gate_up, w_down, activation, limit=limit)
        y3, _ = _three_ops(x, ids, None, w_gate_up, w_down, False, activation, limit)
    assert torch.equal(y, y3)


# which of (x, routing weights, w_gate_up, w_down) want a gradient; "no routing weights": weights None
WANTED = {"all": (True, True, True, True), "frozen experts": (True, True, False, False),
          "routing weights only": (False, True, False, False), "experts only": (False, False, True, True),
          "no routing weights": (True, None, True, True)}


@pytest.mark.parametrize("wanted", WANTED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"T{c[0]}k{c[1]}K{c[2]}E{c[5]}{'t' if c[6] else ''}")
def test_gradients_match_the_three_ops(case, dtype, wanted):
    """With a gradient wanted (plain eager) moe_experts is one autograd node: its output and every
    gradient bit for bit those of the three ops' three nodes, whichever inputs want one."""
    x, ids, weights, w_gate_up, w_down = _problem(*case, dtype, seed=2)
    trans_b = case[-1]
    grads = []
    for fused in (True, False):
        leaves = [None if need is None else t.detach().requires_grad_(need)
                  for t, need in zip((x, weights, w_gate_up, w_down), WANTED[wanted])]
        args = (leaves[0], ids, *leaves[1:])
        y, _ = pangu_ops.moe_experts(*args, trans_b=trans_b) if fused else _three_ops(*args, trans_b)
        assert (type(y.grad_fn).__name__ == "_MoEExpertsBackward") == fused
        y.float().square().sum().backward()
        grads.append([y] + [None if t is None else t.grad for t in leaves])
    for i, (a, b) in enumerate(zip(*grads)):
        assert (a is None) == (b is None), i
        assert a is None or torch.equal(a, b), i
    assert [g is not None for g in grads[0][1:]] == [bool(need) for need in WANTED[wanted]]


def test_create_graph_backward_gives_the_same_gradients():
    """The one node's backward takes the forward's kernels in a plain backward and the ops where the
    graph of the backward is kept (create_graph): the same gradients either way."""
    x, ids, weights, w_gate_up, w_down = _problem(5, 2, 64, 32, 32, 4, True, torch.float32)
    leaves = [t.requires_grad_() for t in (x, weights, w_gate_up, w_down)]
    grads = []
    for keep in (False, True):
        y = pangu_ops.moe_experts(x, ids, weights, w_gate_up, w_down, trans_b=True)[0]
        grads.append(torch.autograd.grad(y.square().sum(), leaves, create_graph=keep))
    for plain, kept in zip(*grads):
        torch.testing.assert_close(kept, plain, rtol=0, atol=0)


@pytest.mark.usefixtures("on_the_cpu")
def test_one_call_where_it_applies(monkeypatch):
    x, ids, weights, w_gate_up, w_down = _problem(3, 2, 64, 32, 32, 4, True, torch.bfloat16)
    args = (x, ids, weights, w_gate_up, w_down)
    one_call = moe_module._one_call
    if not backends.serves("cpu", "moe_experts"):
        pytest.skip("the C++ extension is not built")
    with torch.no_grad():
        assert one_call(x, args)
        with backends.use_backend("reference"):
            assert not one_call(x, args)
    assert not one_call(x, (x, ids, weights, w_gate_up.requires_grad_(), w_down))  # a gradient is wanted
    calls = []
    real = moe_module._check
    monkeypatch.setattr(moe_module, "_check", lambda *a: calls.append(a) or real(*a))
    with torch.no_grad():
        pangu_ops.moe_experts(x, ids, weights, w_gate_up, w_down, trans_b=True)
    assert calls == []  # the single call: the kernels checked the arguments
    y = pangu_ops.moe_experts(x.requires_grad_(), ids, weights, w_gate_up, w_down, trans_b=True)[0]
    y.float().sum().backward()
    assert calls == [] and x.grad is not None  # one autograd node on the same kernels, which check them


@pytest.mark.usefixtures("on_the_cpu")
@pytest.mark.parametrize("grad", [False, True], ids=["one call", "three ops"])
def test_errors_name_the_argument(grad):
    x, ids, weights, w_gate_up, w_down = _problem(5, 2, 64, 32, 32, 4, True, torch.bfloat16)
    context = torch.enable_grad() if grad else torch.no_grad()
    x = x.requires_grad_(grad)
    bad_ids = ids.clone()
    bad_ids[2, 1] = 4
    with context:
        with pytest.raises(ValueError, match="expert_ids"):
            pangu_ops.moe_experts(x, bad_ids, weights, w_gate_up, w_down, trans_b=True)
        with pytest.raises(ValueError, match="weights"):
            pangu_ops.moe_experts(x, ids, weights[:, :1], w_gate_up, w_down, trans_b=True)
        with pytest.raises(TypeError, match="w_gate_up"):
            pangu_ops.moe_experts(x, ids, weights, w_gate_up.float(), w_down, trans_b=True)
        with pytest.raises(TypeError, match="w_gate_up must be a torch.Tensor"):
            pangu_ops.moe_experts(x, ids, weights, None, w_down, trans_b=True)
        with pytest.raises(TypeError, match="w_down must be a torch.Tensor"):
            pangu_ops.moe_experts(x, ids, weights, w_gate_up, None, trans_b=True)
        with pytest.raises(ValueError, match="2F must be even"):
            pangu_ops.moe_experts(x, ids, weights, w_gate_up[:, :-1], w_down, trans_b=True)
        with pytest.raises(ValueError, match="K"):
            pangu_ops.moe_experts(x[:, :32], ids, weights, w_gate_up, w_down, trans_b=True)
        for limit in (-1.0, math.nan):
            with pytest.raises(ValueError, match="limit"):
                pangu_ops.moe_experts(x, ids, weights, w_gate_up, w_down, trans_b=True, limit=limit)


@pytest.mark.usefixtures("on_the_cpu")
def test_prepacked_weights():
    """moe_experts on prepacked weights: the three ops on the same packed weights, bit for bit, and
    the unpacked weights' result within bf16's tolerance (the packed kernels sum in their own order)."""
    if not cpu_backend.packed_kernels():
        pytest.skip("prepacked weights need AMX-BF16 tiles or AVX512-BF16 products")
    x, ids, weights, w_gate_up, w_down = _problem(4, 2, 64, 32, 64, 4, False, torch.bfloat16)
    packed = packed_weights.pack(w_gate_up), packed_weights.pack(w_down)
    with torch.no_grad():
        y, _ = pangu_ops.moe_experts(x, ids, weights, *packed)
        y3, _ = _three_ops(x, ids, weights, *packed, False)
        y_plain, _ = _three_ops(x, ids, weights, w_gate_up, w_down, False)
    assert torch.equal(y, y3)
    torch.testing.assert_close(y, y_plain, **verify.TOLERANCES[torch.bfloat16])
