"""adamw_experts (ECSS's host optimizer step) against its reference on every backend that has it,
and against torch.optim.AdamW; bad input raises before anything is written.

Tolerances: fp32 kernel vs reference / torch: 2e-6 relative + 1e-7 absolute (one fused pass vs
torch's separate ops: different fp32 roundings of the same formula); the verify cases use the
fp32 tolerance of `verify.TOLERANCES` for the fp32 state and the compute dtype's for its copy."""
import pytest
import torch

import pangu_ops
from pangu_ops import backends, verify

from conftest import reference_test

TOL = dict(rtol=2e-6, atol=1e-7)
HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)

test_matches_reference = reference_test("adamw_experts")


pytestmark = pytest.mark.usefixtures("on_the_cpu")  # host optimizer state


def test_served_by_the_reference_and_the_cpu_kernel():
    # a host op: its backends are the CPU's, whatever the device under test
    assert {"reference", "cpu"} <= {b for b in verify.available_backends("cpu") if backends.serves(b, "adamw_experts")}
    with pangu_ops.use_backend("ascend_twin"), pytest.raises(backends.BackendUnavailable, match="no adamw_experts"):
        pangu_ops.adamw_experts(*_state(), torch.zeros(1, 20011), torch.tensor([0]), lr=1e-3)


def _state(E=6, n=20011, seed=0):  # n: odd, one of the kernel's 16384-element chunks and a tail
    g = torch.Generator().manual_seed(seed)
    master = torch.randn(E, n, generator=g)
    m, v = torch.randn(E, n, generator=g) * 0.1, torch.rand(E, n, generator=g) * 0.01
    steps = torch.randint(0, 5, (E,), generator=g)
    return master, m, v, steps


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids", [[3], [5, 0, 2], [0, 1, 2, 3, 4, 5]], ids=["one", "some", "all"])
def test_cpu_kernel_matches_reference(grad_dtype, ids):
    a = _state()
    b = tuple(t.clone() for t in a)
    expert_ids = torch.tensor(ids)
    grads = (torch.randn(len(ids), a[0].shape[1]) * 0.3).to(grad_dtype)
    out_a, out_b = torch.zeros(a[0].shape, dtype=torch.bfloat16), torch.zeros(a[0].shape, dtype=torch.bfloat16)
    with pangu_ops.use_backend("cpu"):
        pangu_ops.adamw_experts(*a, grads, expert_ids, out_a, **HYPER)
    with pangu_ops.use_backend("reference"):
        pangu_ops.adamw_experts(*b, grads, expert_ids, out_b, **HYPER)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL)
    untouched = [e for e in range(6) if e not in ids]
    assert torch.equal(a[0][untouched], _state()[0][untouched])  # lazy: experts not listed keep everything
    assert torch.equal(a[3][untouched], _state()[3][untouched])
    assert (out_a[ids].float() - a[0][ids]).abs().max() <= a[0][ids].abs().max() * 2 ** -8  # bf16 copy
    assert torch.equal(out_a[untouched], torch.zeros_like(out_a[untouched]))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dense_equals_torch_adamw(backend):
    """Every expert updated every step: torch.optim.AdamW over the [E, n] tensor, 5 steps."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3000))
    opt = torch.optim.AdamW([w], **HYPER)
    master, m, v, steps = w.detach().clone(), torch.zeros(4, 3000), torch.zeros(4, 3000), torch.zeros(4, dtype=torch.long)
    for _ in range(5):
        g = torch.randn(4, 3000)
        w.grad = g.clone()
        opt.step()
        with pangu_ops.use_backend(backend):
            pangu_ops.adamw_experts(master, m, v, steps, g, torch.arange(4), None, **HYPER)
    torch.testing.assert_close(master, w.detach(), **TOL)
    torch.testing.assert_close(m, opt.state[w]["exp_avg"], **TOL)
    torch.testing.assert_close(v, opt.state[w]["exp_avg_sq"], **TOL)
    assert steps.tolist() == [5] * 4


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_ids_raise_before_writing(backend):
    a = _state()
    before = tuple(t.clone() for t in a)
    for ids, message in (([1, 6], "out of range"), ([2, 2], "listed twice"), ([-1, 0], "out of range")):
        with pytest.raises(ValueError, match=message), pangu_ops.use_backend(backend):
            pangu_ops.adamw_experts(*a, torch.randn(2, a[0].shape[1]), torch.tensor(ids), None, **HYPER)
        for x, y in zip(a, before):
            assert torch.equal(x, y)


@pytest.mark.parametrize("change, message", [
    (lambda a: (a[0].double(),) + a[1:], "master must have dtype float32"),
    (lambda a: (a[0], a[1][:, :-1]) + a[2:], r"exp_avg \[E, n\]: expected the shape of master"),
    (lambda a: a[:3] + (a[3].int(),), "steps must have dtype int64"),
    (lambda a: (a[0].t().contiguous().t(),) + a[1:], "master must be contiguous"),
])
def test_bad_metadata_is_named(change, message):
    a = change(_state(E=4, n=12))
    with pytest.raises((ValueError, TypeError), match=message):
        pangu_ops.adamw_experts(*a, torch.randn(1, 12), torch.tensor([0]), None, **HYPER)


def test_bad_hyperparameters_are_named():
    a = _state(E=2, n=8)
    for key, value in (("lr", -1.0), ("eps", float("nan"))):
        with pytest.raises(ValueError, match=key):
            pangu_ops.adamw_experts(*a, torch.randn(1, 8), torch.tensor([0]), None, **{**HYPER, key: value})
    with pytest.raises(ValueError, match="beta2"):
        pangu_ops.adamw_experts(*a, torch.randn(1, 8), torch.tensor([0]), None, **{**HYPER, "betas": (0.9, 1.0)})


def test_opcheck():
    a = _state(E=5, n=33)
    torch.library.opcheck(torch.ops.pangu.adamw_experts, (*a, torch.randn(2, 33), torch.tensor([4, 1]),
                                                           torch.zeros(5, 33, dtype=torch.bfloat16),
                                                           1e-3, 0.9, 0.999, 1e-8, 0.01))
