"""A small MoE layer built from the ops, compiled with fullgraph=True, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

import pangu_ops
from pangu_ops import verify

from conftest import BACKENDS


def moe(x, expert_ids, weights, w_up, w_down, w_gate_up):
    """Two expert layers: grouped GEMMs with torch's SiLU between, then the fused expert MLP."""
    x_sorted, sizes, index = pangu_ops.permute(x, expert_ids, w_up.shape[0])
    h = F.silu(pangu_ops.grouped_gemm(x_sorted, w_up, sizes))
    h = pangu_ops.grouped_gemm(h, w_down, sizes)
    h = pangu_ops.expert_mlp(h, w_gate_up, w_down, sizes)
    return pangu_ops.unpermute(h, index, weights)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_moe_matches_eager(backend):
    torch._dynamo.reset()
    case = verify.Case(48, 32, 24, 6, 2, drop=0.1, empty=1)
    gen = verify.generator(2)
    ids, weights = verify.routing(case, gen)
    x = verify.randn((case.tokens, case.hidden), torch.float32, gen)
    w_up = verify.randn((case.experts, case.hidden, case.ffn), torch.float32, gen, scale=0.2)
    w_down = verify.randn((case.experts, case.ffn, case.hidden), torch.float32, gen, scale=0.2)
    w_gate_up = verify.randn((case.experts, case.hidden, 2 * case.ffn), torch.float32, gen, scale=0.2)

    def run(fn):
        params = [t.clone().requires_grad_() for t in (x, weights, w_up, w_down, w_gate_up)]
        out = fn(params[0], ids, *params[1:])
        out.square().sum().backward()
        return [out] + [p.grad for p in params]

    with pangu_ops.use_backend(backend):
        eager = run(moe)
        compiled = run(torch.compile(moe, fullgraph=True, backend="aot_eager"))
        inductor = run(torch.compile(moe, fullgraph=True))
    for got in (compiled, inductor):
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("router", ["topk", "rre"])
def test_compiled_moe_layer_matches_eager(router):
    """The whole layer (routing, balance loss, capacity, ops) compiles without graph breaks."""
    from pangu_ops.nn import MoEFeedForward

    torch._dynamo.reset()
    options = dict(capacity_factor=1.0, num_shared_experts=1) if router == "topk" else dict(
        router="rre", num_domains=2, vocab_size=40)
    layer = MoEFeedForward(16, 12, 4, **options)
    x = torch.randn(2, 6, 16)
    tokens, domains = torch.randint(0, 40, (2, 6)), torch.tensor([1, 0])

    def run(fn):
        xg = x.clone().requires_grad_()
        layer.zero_grad()
        y, aux = fn(xg, tokens, domains)
        (y.square().sum() + aux).backward()
        return [y, xg.grad, layer.w_gate_up.grad.clone(), layer.w_down.grad.clone()]

    eager = run(layer)
    compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
