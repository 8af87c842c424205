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


def _chain(x, ids, keys, key_sizes, weights):
    """permute -> unpermute -> permute -> permute by runs of keys (sizes from data: a second
    unbacked row count that the compiler must equate with the first) -> unpermute."""
    xs, _, index = pangu_ops.permute(x, ids, 8)
    y = pangu_ops.unpermute(xs, index, weights)
    ys, _, index2 = pangu_ops.permute(y, ids, 8)
    row_keys = torch.repeat_interleave(keys, key_sizes)
    z, _, index3 = pangu_ops.permute(ys, row_keys[:, None], 4)
    back = pangu_ops.unpermute(z, index3, None, ys.shape[0], topk=1)
    return pangu_ops.unpermute(back, index2, weights)


@pytest.mark.slow
def test_chained_permutes_compile_with_data_dependent_sizes():
    """Chained ops whose row counts come from different data compile with fullgraph=True: the fake
    kernels bound their row counts and state the equalities the ops check (without them: "Could
    not guard on data-dependent expression")."""
    torch._dynamo.reset()
    gen = verify.generator(3)
    for tokens in (12, 17):  # the second size reuses the dynamic graph
        x = verify.randn((tokens, 16), torch.float32, gen)
        ids = torch.randint(0, 8, (tokens, 2), generator=gen, device="cpu").to(x.device)
        weights = torch.rand(tokens, 2, generator=gen, device="cpu").to(x.device)
        keys, key_sizes = torch.arange(4), torch.tensor([tokens // 2, tokens, 0, 2 * tokens - tokens // 2 - tokens])
        args = (x, ids, keys, key_sizes, weights)
        eager = _chain(*args)
        compiled = torch.compile(_chain, fullgraph=True, dynamic=True, backend="aot_eager")(*args)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.slow
def test_hierarchical_dispatch_local_steps_compile():
    """The hierarchical dispatcher's local steps (node rows, the gateway's fan-out, the regroup by
    local expert) compile with fullgraph=True and equal eager, values and gradients."""
    from pangu_ops.distributed.dispatcher import fan_out, node_rows, regroup

    def steps(x, ids, weights):
        x_node, node_sizes, node_index, row_ids, row_weights = node_rows(x, ids, weights, 2, 4)
        # as if every node row came back to node 0's gateway from node 0 (no communication here)
        local_ids, x_fan, fan_index, per_key = fan_out(x_node, row_ids, node_sizes.sum()[None], 0, 1, 8)
        x_local, sizes, local_index = regroup(x_fan, torch.arange(8), per_key, 8)
        y = pangu_ops.unpermute(x_local * 2, local_index, None, x_fan.shape[0], topk=1)
        partial = pangu_ops.unpermute(y, fan_index, row_weights, row_ids.shape[0], topk=2)
        return pangu_ops.unpermute(partial, node_index, None, x.shape[0], topk=2), sizes

    torch._dynamo.reset()
    gen = verify.generator(4)
    x = verify.randn((10, 16), torch.float32, gen)
    ids = torch.randint(-1, 8, (10, 2), generator=gen, device="cpu").to(x.device)
    weights = torch.rand(10, 2, generator=gen, device="cpu").to(x.device)

    def run(fn):
        xg, wg = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y, sizes = fn(xg, ids, wg)
        y.square().sum().backward()
        return y, sizes, xg.grad, wg.grad

    for a, b in zip(run(torch.compile(steps, fullgraph=True, backend="aot_eager")), run(steps)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
