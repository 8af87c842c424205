"""pangu_ops.routing and MoEFeedForward against the transformers modules that define the routers
real MoE models use: Mixtral's softmax over the top-k, Qwen's norm_topk_prob, DeepSeek-V3's
sigmoid group-limited top-k with the correction bias and routed scaling, DeepSeek-V4's hash
routing by token id, and whole blocks with Qwen2-MoE's sigmoid-gated shared expert and
DeepSeek-V3's shared experts. fp32; tolerances are fp32 summation-order noise."""
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", minversion="5.0")

import pangu_ops  # noqa: E402
from pangu_ops.nn import MoEFeedForward  # noqa: E402
from pangu_ops import backends, routing  # noqa: E402

from conftest import DEVICE  # noqa: E402

H, T = 32, 57  # odd token count


def _config(cls: str, **kw):
    return getattr(transformers, cls)(hidden_size=H, **kw)


def _canonical(weights, ids):
    """Both in ascending expert order (transformers' DeepSeek routers return an unsorted top-k)."""
    order = ids.argsort(1)
    return weights.gather(1, order), ids.gather(1, order)


def _assert_same_route(ours, theirs):
    (w, i), (w_ref, i_ref) = _canonical(*ours), _canonical(*theirs)
    assert torch.equal(i, i_ref.long())
    torch.testing.assert_close(w, w_ref.float(), rtol=1e-6, atol=1e-6)


def _router(module_path: str, config, scale: float = 1.0):
    import importlib

    module, cls = module_path.rsplit(".", 1)
    router = getattr(importlib.import_module(module), cls)(config)
    nn.init.normal_(router.weight, std=scale)
    return router


def test_mixtral_softmax_over_topk():
    config = _config("MixtralConfig", num_local_experts=8, num_experts_per_tok=2)
    router = _router("transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter", config)
    x = torch.randn(T, H)
    logits, w_ref, i_ref = router(x)
    _assert_same_route(routing.topk_route(logits, 2, score="softmax", normalize=True)[:2], (w_ref, i_ref))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen_norm_topk_prob(norm_topk_prob):
    config = _config("Qwen2MoeConfig", num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm_topk_prob)
    router = _router("transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter", config)
    logits, w_ref, i_ref = router(torch.randn(T, H))
    _assert_same_route(routing.topk_route(logits, 4, normalize=norm_topk_prob)[:2], (w_ref, i_ref))


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2), (8, 3)])
def test_deepseek_v3_sigmoid_group_limited_with_correction_bias(n_group, topk_group, norm_topk_prob):
    config = _config("DeepseekV3Config", n_routed_experts=32, num_experts_per_tok=6, n_group=n_group,
                     topk_group=topk_group, norm_topk_prob=norm_topk_prob, routed_scaling_factor=2.5)
    router = _router("transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter", config, 0.3)
    router.e_score_correction_bias.copy_(torch.randn(32) * 0.2)  # big enough to change choices
    x = torch.randn(T, H)
    logits, w_ref, i_ref = router(x)
    ours = routing.topk_route(logits, 6, score="sigmoid", normalize=norm_topk_prob, scaling=2.5,
                              correction_bias=router.e_score_correction_bias, n_group=n_group, topk_group=topk_group)
    _assert_same_route(ours[:2], (w_ref, i_ref))
    if n_group > 1:  # the group limit is exercised: plain top-k would choose elsewhere
        plain = routing.topk_route(logits, 6, score="sigmoid", correction_bias=router.e_score_correction_bias)[1]
        assert not torch.equal(plain.sort(1).values, ours[1].sort(1).values)


def test_deepseek_v4_hash_routing():
    config = _config("DeepseekV4Config", n_routed_experts=16, num_experts_per_tok=3, vocab_size=100,
                     routed_scaling_factor=1.5)
    router = _router("transformers.models.deepseek_v4.modeling_deepseek_v4.DeepseekV4HashRouter", config, 0.3)
    router.tid2eid.copy_(routing.hash_table(100, 16, 3, seed=3))
    x, token_ids = torch.randn(3, 19, H), torch.randint(0, 100, (3, 19))
    _, w_ref, i_ref = router(x, token_ids)
    ours = routing.hash_route(torch.nn.functional.linear(x.reshape(-1, H), router.weight), token_ids, router.tid2eid,
                              score="sqrtsoftplus", normalize=True, scaling=1.5)
    _assert_same_route(ours[:2], (w_ref, i_ref))


def test_hash_table_and_bad_token_ids():
    table = routing.hash_table(1000, 8, 3, seed=0, layer=1)
    assert table.shape == (1000, 3) and torch.equal(table, routing.hash_table(1000, 8, 3, seed=0, layer=1))
    assert not torch.equal(table, routing.hash_table(1000, 8, 3, seed=0, layer=2))
    assert (table.sort(1).values.diff(1) != 0).all()  # k distinct experts per token
    counts = table.flatten().bincount(minlength=8)
    assert counts.min() > 0.8 * counts.float().mean()
    with pytest.raises(ValueError, match=r"token_ids\[0, 4\] = 1000 is out of range \[0, vocab_size=1000\)"):
        routing.hash_route(torch.randn(6, 8), torch.tensor([1, 2, 3, 4, 1000, 5]), table)


def _load_experts(ours, experts):
    """transformers' [E, 2F, H] / [E, H, F] experts into MoEFeedForward's [E, H, 2F] / [E, F, H]."""
    ours.w_gate_up.data.copy_(experts.gate_up_proj.transpose(1, 2))
    ours.w_down.data.copy_(experts.down_proj.transpose(1, 2))


def _load_mlp(swiglu, mlp):
    swiglu.gate_up.weight.data.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    swiglu.down.weight.data.copy_(mlp.down_proj.weight)


def _randomize(module):
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)


def test_qwen2_moe_block_with_sigmoid_gated_shared_expert():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = _config("Qwen2MoeConfig", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                     shared_expert_intermediate_size=40, norm_topk_prob=False)
    block = Qwen2MoeSparseMoeBlock(config)
    _randomize(block)
    ours = MoEFeedForward(H, 24, 8, topk=2, normalize=False, num_shared_experts=1, shared_ffn=40,
                                       shared_gate=True, aux_loss_alpha=0)
    _load_experts(ours, block.experts)
    ours.gate.weight.data.copy_(block.gate.weight)
    _load_mlp(ours.shared, block.shared_expert)
    ours.shared_gate.weight.data.copy_(block.shared_expert_gate.weight)
    x = torch.randn(2, 29, H)
    torch.testing.assert_close(ours(x)[0], block(x), rtol=1e-5, atol=1e-5)


def test_deepseek_v3_moe_block():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = _config("DeepseekV3Config", n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                     moe_intermediate_size=24, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    block = DeepseekV3MoE(config)
    _randomize(block)
    block.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.2)
    ours = MoEFeedForward(H, 24, 16, topk=4, score="sigmoid", routed_scaling=2.5, n_group=4,
                                       topk_group=2, correction_bias=True, num_shared_experts=2, aux_loss_alpha=0)
    _load_experts(ours, block.experts)
    ours.gate.weight.data.copy_(block.gate.weight)
    ours.e_score_correction_bias.copy_(block.gate.e_score_correction_bias)
    _load_mlp(ours.shared, block.shared_experts)
    x = torch.randn(2, 29, H)
    torch.testing.assert_close(ours(x)[0], block(x), rtol=1e-5, atol=1e-5)


def test_correction_bias_moves_towards_balance():
    layer = MoEFeedForward(16, 8, 4, topk=1, score="sigmoid", correction_bias=True, aux_loss_alpha=0)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[2] += 1.0  # every token prefers expert 2 (x > 0)
    layer(torch.rand(10, 16))
    layer(torch.rand(6, 16))  # two micro-batches before the update: their loads add up
    layer.update_correction_bias(rate=0.01)
    assert torch.equal(layer.e_score_correction_bias, torch.tensor([0.01, 0.01, -0.01, 0.01]))
    with pytest.raises(RuntimeError, match="no training forward pass"):
        layer.update_correction_bias()
    layer.eval()
    layer(torch.rand(3, 16))  # evaluation passes are not counted
    with pytest.raises(RuntimeError, match="no training forward pass"):
        layer.update_correction_bias()


@pytest.mark.parametrize("backend", ["reference", backends.AUTO_BY_DEVICE[torch.device(DEVICE).type]])
def test_hash_layer_dispatches_through_the_fused_lookup(backend):
    """router='hash': the layer equals the two-step route (hash_route, permute, expert MLP,
    weighted unpermute), its gradients reach the router, and missing token ids are an error."""
    layer = MoEFeedForward(16, 12, 8, router="hash", topk=3, score="sqrtsoftplus", vocab_size=50,
                                        aux_loss_alpha=0)
    x, token_ids = torch.randn(2, 7, 16, requires_grad=True), torch.randint(0, 50, (2, 7))
    with pangu_ops.use_backend(backend):
        y, _ = layer(x, token_ids)
        flat = x.reshape(-1, 16)
        weights, ids, _ = routing.hash_route(layer.router_logits(flat), token_ids, layer.hash_table,
                                             score="sqrtsoftplus")
        xs, sizes, index = pangu_ops.permute(flat, ids, 8)
        want = pangu_ops.unpermute(pangu_ops.expert_mlp(xs, layer.w_gate_up, layer.w_down, sizes), index, weights)
    torch.testing.assert_close(y.reshape(-1, 16), want, rtol=1e-6, atol=1e-6)
    y.square().sum().backward()
    assert layer.gate.weight.grad is not None and (layer.gate.weight.grad != 0).any()
    with pytest.raises(ValueError, match="needs token_ids"):
        layer(x)
