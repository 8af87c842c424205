"""Hypothesis-driven shapes: a whole MoE step (permute -> grouped_gemm -> unpermute, with
gradients) on every backend equals the reference on random sizes, routings and dtypes; moe_experts
equals the three ops it fuses."""
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import pangu_ops
from pangu_ops import reference, verify

from conftest import BACKENDS


@st.composite
def problems(draw):
    experts = draw(st.integers(1, 9))
    topk = draw(st.integers(1, min(experts, 4)))
    case = verify.Case(
        tokens=draw(st.integers(0, 70)),
        hidden=draw(st.integers(1, 40)),
        ffn=draw(st.integers(1, 40)),
        experts=experts,
        topk=topk,
        drop=draw(st.sampled_from([0.0, 0.3, 1.0])),
        empty=draw(st.integers(0, experts - topk)),
    )
    return case, draw(st.sampled_from(verify.DTYPES)), draw(st.sampled_from(BACKENDS)), draw(st.integers(0, 2**16))


def moe_step(permute, grouped_gemm, unpermute, x, ids, weights, w, case):
    x_sorted, sizes, index = permute(x, ids, case.experts)
    return unpermute(grouped_gemm(x_sorted, w, sizes), index, weights)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_moe_step_matches_reference(problem):
    case, dtype, backend, seed = problem
    gen = verify.generator(seed)
    ids, weights = verify.routing(case, gen)
    x = verify.randn((case.tokens, case.hidden), dtype, gen).requires_grad_()
    w = verify.randn((case.experts, case.hidden, case.ffn), dtype, gen, scale=case.hidden ** -0.5).requires_grad_()
    weights.requires_grad_()
    with pangu_ops.use_backend(backend):
        got = moe_step(pangu_ops.permute, pangu_ops.grouped_gemm, pangu_ops.unpermute, x, ids, weights, w, case)
    want = moe_step(reference.permute, lambda a, b, s: reference.grouped_gemm(a, b, s, False),
                    lambda y, i, p: reference.unpermute(y, i, p, case.tokens, case.topk), x, ids, weights, w, case)
    tol = verify.TOLERANCES[dtype]
    # Two roundings to `dtype` on the way (GEMM output, combine): allow twice the one-op tolerance.
    tol = {"rtol": 2 * tol["rtol"], "atol": 2 * tol["atol"]}
    torch.testing.assert_close(got, want, **tol)
    g = verify.randn((case.tokens, case.ffn), dtype, gen)
    for a, b in zip(torch.autograd.grad(got, [x, w, weights], g), torch.autograd.grad(want, [x, w, weights], g)):
        torch.testing.assert_close(a, b, **tol)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.booleans())
def test_moe_experts_equals_the_three_ops(problem, trans_b):
    """moe_experts in inference (the single C++ call on the CPU backend) against permute ->
    expert_mlp -> unpermute, bit for bit: no tokens, every slot dropped, experts without rows."""
    case, dtype, backend, seed = problem
    gen = verify.generator(seed)
    ids, weights = verify.routing(case, gen)
    x = verify.randn((case.tokens, case.hidden), dtype, gen)
    up, down = ((2 * case.ffn, case.hidden), (case.hidden, case.ffn)) if trans_b else \
        ((case.hidden, 2 * case.ffn), (case.ffn, case.hidden))
    w_gate_up = verify.randn((case.experts, *up), dtype, gen, scale=case.hidden ** -0.5)
    w_down = verify.randn((case.experts, *down), dtype, gen, scale=case.ffn ** -0.5)
    with pangu_ops.use_backend(backend), torch.no_grad():
        got, sizes = pangu_ops.moe_experts(x, ids, weights, w_gate_up, w_down, trans_b=trans_b)
        x_sorted, want_sizes, index = pangu_ops.permute(x, ids, case.experts)
        y = pangu_ops.expert_mlp(x_sorted, w_gate_up, w_down, want_sizes, trans_b=trans_b)
        want = pangu_ops.unpermute(y, index, weights, case.tokens, topk=case.topk)
    assert torch.equal(sizes, want_sizes)
    assert torch.equal(got, want)
