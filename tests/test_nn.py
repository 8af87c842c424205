"""Model layers: MoEFeedForward (top-k and RRE) equal a plain per-expert PyTorch loop; gradients
reach experts and router; the RRE domain operations keep every other domain's outputs."""
import pytest
import torch
import torch.nn.functional as F

import pangu_ops
from pangu_ops import routing
from pangu_ops.nn import (MoEFeedForward, PanguSigmaConfig, PanguSigmaLM, RREMoE, add_domain, extract_domain,
                          remove_domain, required_experts, rre_layers)

from pangu_ops.benchmarks.layer import loop_moe

from conftest import BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [dict(), dict(score="sigmoid", routed_scaling=2.5, num_shared_experts=1),
                                     dict(capacity_factor=0.5, topk=3)], ids=["softmax", "sigmoid-shared", "capacity"])
def test_topk_layer_equals_expert_loop(backend, options):
    layer = MoEFeedForward(24, 16, 6, **options)
    x = torch.randn(3, 7, 24, requires_grad=True)
    with pangu_ops.use_backend(backend):
        y, aux = layer(x)
        y.square().sum().backward()
    flat = x.detach().reshape(-1, 24)
    weights, ids, _ = routing.topk_route(layer.router_logits(flat), layer.topk, score=layer.score, scaling=layer.routed_scaling)
    if layer.capacity_factor:
        ids = routing.apply_capacity(ids, 6, int(-(-layer.capacity_factor * 21 * layer.topk // 6)))
        assert (ids == -1).any()
    torch.testing.assert_close(y, loop_moe(layer, x.detach(), ids, weights), rtol=1e-5, atol=1e-5)
    assert aux.item() > 0
    assert layer.gate.weight.grad.abs().sum() > 0  # through the gate weights and the balance loss
    assert layer.w_gate_up.grad.abs().sum() > 0 and layer.w_down.grad.abs().sum() > 0 and x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_rre_layer_equals_expert_loop(backend):
    layer = RREMoE(16, 12, 8, 2, vocab_size=50, seed=3, layer=1)
    tokens, domains = torch.randint(0, 50, (3, 5)), torch.tensor([1, 0, 1])
    x = torch.randn(3, 5, 16)
    with pangu_ops.use_backend(backend):
        y, aux = layer(x, tokens, domains)
    ids = routing.rre_route(tokens, domains, layer.table).reshape(-1, 1)
    torch.testing.assert_close(y, loop_moe(layer, x, ids, None), rtol=1e-5, atol=1e-5)
    assert aux.item() == 0
    # a domain's tokens only reach that domain's experts
    assert set(ids[:5].flatten().tolist()) <= set(range(4, 8)) and set(ids[5:10].flatten().tolist()) <= set(range(4))


def test_rre_layer_bad_input():
    layer = RREMoE(8, 8, 4, 2, vocab_size=10)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="needs token_ids"):
        layer(x)
    with pytest.raises(ValueError, match=r"domain_ids\[1\] = 2 is out of range"):
        layer(x, torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"token_ids\[0, 1\] = 10 is out of range"):
        layer(x, torch.tensor([[0, 10, 1], [1, 2, 3]]), torch.tensor([0, 1]))


def _model_and_batch():
    torch.manual_seed(0)
    model = PanguSigmaLM(PanguSigmaConfig(vocab_size=64, hidden=32, num_heads=4, num_layers=3, ffn=48,
                                          rre_layers=[1, 2], num_experts=6, num_domains=3, expert_ffn=16))
    tokens, domains = torch.randint(0, 64, (6, 10)), torch.tensor([0, 1, 2, 1, 0, 2])
    return model.eval(), tokens, domains


def test_extracted_domain_gives_identical_outputs(tmp_path):
    model, tokens, domains = _model_and_batch()
    mine = domains == 1
    # the same batch on both sides: the dense layers' matmuls then see the same row counts (oneDNN
    # blocks, and so rounds, by row count: the full batch's rows [mine] may differ in the last bit)
    full = model(tokens[mine], domains[mine])[0]
    sub = extract_domain(model, 1)
    assert all(layer.num_experts == 2 for layer in rre_layers(sub))
    assert torch.equal(sub(tokens[mine], domains[mine])[0], full)
    with pytest.raises(ValueError, match="domain 0 has no experts"):
        sub(tokens[:1], domains[:1])
    # the sub-model round-trips through a state dict into a fresh extraction
    torch.save(sub.state_dict(), tmp_path / "sub.pt")
    other, _, _ = _model_and_batch()
    fresh = extract_domain(PanguSigmaLM(other.config), 1)
    fresh.load_state_dict(torch.load(tmp_path / "sub.pt"))
    assert torch.equal(fresh.eval()(tokens[mine], domains[mine])[0], full)


def test_add_and_remove_domains_leave_others_unchanged():
    model, tokens, domains = _model_and_batch()
    full, _ = model(tokens, domains)
    new = add_domain(model, 3)
    assert new == 3 and all(layer.num_experts == 9 for layer in rre_layers(model))
    assert torch.equal(model(tokens, domains)[0], full)
    new_tokens = torch.randint(0, 64, (2, 10))
    model(new_tokens, torch.tensor([3, 3]))  # the new domain routes to its own experts
    remove_domain(model, 1)
    keep = domains != 1
    assert torch.equal(model(tokens[keep], domains[keep])[0], full[keep])
    with pytest.raises(ValueError, match="domain 1 has no experts"):
        model(tokens, domains)
    with pytest.raises(ValueError, match="domain 1 has no experts"):  # not the last table row
        required_experts(model, tokens, domains)


def test_required_experts_known_before_compute(monkeypatch):
    model, tokens, domains = _model_and_batch()
    needed = required_experts(model, tokens[:2], domains[:2])  # domains 0 and 1: experts 0-3
    used = []
    real = pangu_ops.nn.moe.expert_mlp

    def spy(x, w_gate_up, w_down, sizes):  # the experts the forward pass actually feeds
        used.append(sizes.nonzero().flatten())
        return real(x, w_gate_up, w_down, sizes)

    monkeypatch.setattr(pangu_ops.nn.moe, "expert_mlp", spy)
    model(tokens[:2], domains[:2])
    assert len(used) == len(needed) == 2
    for a, b in zip(needed, used):
        assert torch.equal(a, b) and int(a.max()) < 4


def test_lm_trains():
    model, tokens, domains = _model_and_batch()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        logits, aux = model(tokens[:, :-1], domains)
        loss = F.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1)) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
