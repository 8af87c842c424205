"""ECSS: training with the experts on the host equal to training without (lazy AdamW reference),
within the budget, with bit-exact checkpoints and errors before any copy. In CI "device" and host
are both the CPU: the mechanism (pools, slot maps, uploads, host updates) runs all the same; with
PANGU_OPS_TEST_DEVICE=cuda the models and pools are on the GPU. (The host optimizer op is tested
in test_adamw_experts.py.)

Tolerance after 6 training steps: 1e-4 relative + 1e-5 absolute (the fused kernel's fp32 roundings
against the reference's separate ops, carried through the forward and backward passes of the
following steps)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import pangu_ops
from pangu_ops import ecss
from pangu_ops.nn import PanguSigmaConfig, PanguSigmaLM

TRAIN_TOL = dict(rtol=1e-4, atol=1e-5)
HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


CONFIG = PanguSigmaConfig(vocab_size=64, hidden=32, num_heads=4, num_layers=3, ffn=48, rre_layers=[1, 2],
                          num_experts=8, num_domains=2, expert_ffn=24)


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    device = torch.get_default_device()
    for i in range(n):  # one domain per batch half of the time: not every expert is used each step
        dom = torch.tensor([i % 2, i % 2]) if i % 3 else torch.tensor([0, 1])
        tok = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=g, device="cpu")
        yield tok.to(device), dom.to(device)


def _loss(model, tok, dom):
    logits, _ = model(tok, dom)
    return F.cross_entropy(logits.reshape(-1, CONFIG.vocab_size), tok.reshape(-1))


def _moe_layers(model):
    return [b.ffn for b in model.blocks if hasattr(b.ffn, "table")]


def _lazy_reference_step(layer, used, states):
    """The reference lazy AdamW on a layer kept on the device as usual: experts `used` only."""
    E = layer.w_gate_up.shape[0]
    for w in (layer.w_gate_up, layer.w_down):
        st = states.setdefault(id(w), (torch.zeros(E, w[0].numel()), torch.zeros(E, w[0].numel()),
                                       torch.zeros(E, dtype=torch.long)))
        flat = w.detach().reshape(E, -1).clone()
        with pangu_ops.use_backend("reference"):
            pangu_ops.adamw_experts(flat, *st, w.grad.reshape(E, -1)[used], used, None, **HYPER)
        with torch.no_grad():
            w.copy_(flat.view_as(w))
        w.grad = None


def test_training_with_ecss_equals_training_without():
    """Reference: the same model, experts on the 'device' as usual, updated by the reference lazy
    AdamW (only experts that got tokens), dense parameters by torch AdamW; ECSS: experts on the
    host. Same weights and optimizer state after 6 steps."""
    torch.manual_seed(0)
    ref = PanguSigmaLM(CONFIG)
    model = copy.deepcopy(ref)
    ref_dense = torch.optim.AdamW([p for n, p in ref.named_parameters() if "w_gate_up" not in n and "w_down" not in n],
                                  **HYPER)
    states = {}
    store = ecss.ExpertStore(model, **HYPER)
    dense = torch.optim.AdamW(store.dense_parameters(), **HYPER)
    for tok, dom in _batches(6):
        _loss(ref, tok, dom).backward()
        for layer in _moe_layers(ref):
            _lazy_reference_step(layer, torch.unique(layer.table[layer.table_rows(dom)[:, None], tok]), states)
        ref_dense.step()
        ref_dense.zero_grad()

        store.prepare(tok, dom)
        _loss(model, tok, dom).backward()
        store.step()
        dense.step()
        dense.zero_grad()
    for layer, ref_layer in zip(store.layers, _moe_layers(ref)):
        E = layer.master.shape[0]
        want = torch.cat([ref_layer.w_gate_up.detach().reshape(E, -1), ref_layer.w_down.detach().reshape(E, -1)], 1)
        torch.testing.assert_close(layer.master, want, **TRAIN_TOL)
        m_ref = torch.cat([states[id(ref_layer.w_gate_up)][0], states[id(ref_layer.w_down)][0]], 1)
        torch.testing.assert_close(layer.exp_avg, m_ref, **TRAIN_TOL)
        assert torch.equal(layer.steps, states[id(ref_layer.w_gate_up)][2])
        assert 0 < int(layer.steps.min()) < 6  # lazy: some experts skipped some steps
    ref_dense_params = [p for n, p in ref.named_parameters() if "w_gate_up" not in n and "w_down" not in n]
    for p, q in zip(ref_dense_params, store.dense_parameters()):
        torch.testing.assert_close(q, p, **TRAIN_TOL)


def test_budget_is_respected_and_too_small_a_budget_names_the_bytes():
    torch.manual_seed(0)
    model = PanguSigmaLM(CONFIG)
    per_expert = 2 * 4 * (32 * 48 + 24 * 32)  # weights + gradients, fp32
    budget = 2 * 5 * per_expert  # 5 of the 8 experts per layer (2 layers)
    store = ecss.ExpertStore(model, device_budget_bytes=budget, **HYPER)
    dense = torch.optim.AdamW(store.dense_parameters(), **HYPER)
    ran = 0
    for tok, dom in _batches(2):
        if dom[0] != dom[1]:
            continue
        stats = store.prepare(tok[:1, :4], dom[:1])
        assert stats.resident_bytes <= budget
        _loss(model, tok[:1, :4], dom[:1]).backward()
        store.step()
        dense.step()
        ran += 1
    assert ran
    big = torch.arange(64).reshape(2, 32)  # every token id, both domains: all 8 experts of a layer
    with pytest.raises(ValueError, match=r"needs 8 experts = 147456 B of device memory .* at least 294912 B"):
        store.prepare(big, torch.tensor([0, 1]))


def test_bad_ids_raise_before_any_copy():
    model = PanguSigmaLM(CONFIG)
    store = ecss.ExpertStore(model, **HYPER)
    tables = [l.module.table.clone() for l in store.layers]
    with pytest.raises(ValueError, match="out of range"):
        store.prepare(torch.tensor([[1, 64]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"domain_ids\[0\] = 2 is out of range"):
        store.prepare(torch.tensor([[1, 2]]), torch.tensor([2]))
    assert store.stats.h2d_bytes == 0
    assert all(torch.equal(l.module.table, t) for l, t in zip(store.layers, tables))
    with pytest.raises(RuntimeError, match="without prepare"):
        store.step()


def test_host_tensors_stay_on_the_host_whatever_the_default_device():
    """The store's host-side index tensors (upload sources, slot maps, the experts stepped) are
    made on the CPU: under a GPU default device (`torch.device("cuda")`, as the GPU test run sets)
    they were made there and indexing host memory with them failed; "meta" stands in for it."""
    torch.manual_seed(0)
    model = PanguSigmaLM(CONFIG)
    store = ecss.ExpertStore(model, **HYPER)
    tok, dom = next(_batches(1))
    with torch.device("meta"):
        stats = store.prepare(tok, dom)
        assert all(l.pool.slot_map().device.type == "cpu" for l in store.layers)
    assert stats.misses > 0
    _loss(model, tok, dom).backward()
    with torch.device("meta"):
        store.step()
    assert sum(int(l.steps.sum()) for l in store.layers) == stats.misses  # each uploaded expert stepped once


def test_checkpoint_resume_is_bit_exact():
    def run(model, store, dense, batches):
        for tok, dom in batches:
            store.prepare(tok, dom)
            _loss(model, tok, dom).backward()
            store.step()
            dense.step()
            dense.zero_grad()

    torch.manual_seed(0)
    model = PanguSigmaLM(CONFIG)
    twin = copy.deepcopy(model)
    store = ecss.ExpertStore(model, **HYPER)
    dense = torch.optim.AdamW(store.dense_parameters(), **HYPER)
    batches = list(_batches(6))
    run(model, store, dense, batches[:3])
    saved = copy.deepcopy((store.state_dict(), model.state_dict(), dense.state_dict()))
    run(model, store, dense, batches[3:])

    store2 = ecss.ExpertStore(twin, **HYPER)
    dense2 = torch.optim.AdamW(store2.dense_parameters(), **HYPER)
    twin.load_state_dict({k: v for k, v in saved[1].items() if "w_gate_up" not in k and "w_down" not in k and
                          not k.endswith(".table")}, strict=False)
    store2.load_state_dict(saved[0])
    dense2.load_state_dict(saved[2])
    run(twin, store2, dense2, batches[3:])
    for a, b in zip(store.layers, store2.layers):
        for key in ("master", "exp_avg", "exp_avg_sq", "steps"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key
    with pytest.raises(ValueError, match="layers"):
        store2.load_state_dict({"hyper": saved[0]["hyper"], "layers": {}})


def test_restore_model_gives_the_trained_weights_back():
    torch.manual_seed(0)
    model = PanguSigmaLM(CONFIG)
    store = ecss.ExpertStore(model, **HYPER)
    for tok, dom in _batches(2):
        store.prepare(tok, dom)
        _loss(model, tok, dom).backward()
        store.step()
    masters = [l.master.clone() for l in store.layers]
    layers = [l.module for l in store.layers]
    store.restore_model()
    for m, master in zip(layers, masters):
        E = master.shape[0]
        assert torch.equal(torch.cat([m.w_gate_up.reshape(E, -1), m.w_down.reshape(E, -1)], 1), master)
    tok, dom = next(_batches(1))
    model(tok, dom)  # runs without the store
    from pangu_ops.nn import extract_domain

    sub = extract_domain(model, 1)  # and its domains extract as usual
    assert sub.blocks[1].ffn.num_experts == CONFIG.num_experts // CONFIG.num_domains


def test_hash_layers_are_refused():
    from pangu_ops.nn import MoEFeedForward

    with pytest.raises(ValueError, match="not hash-routed ones"):
        ecss.ExpertStore(torch.nn.Sequential(MoEFeedForward(16, 8, 4, router="hash", vocab_size=20)))


class _TopkNet(torch.nn.Module):
    """Two top-k MoE layers (softmax top-2 of 8; sigmoid top-3 of 8 with capacity) and a head."""

    def __init__(self):
        super().__init__()
        from pangu_ops.nn import MoEFeedForward

        self.embed = torch.nn.Embedding(40, 16)
        self.moe1 = MoEFeedForward(16, 12, 8, topk=2, aux_loss_alpha=0.01)
        self.moe2 = MoEFeedForward(16, 12, 8, topk=3, score="sigmoid", capacity_factor=1.5, aux_loss_alpha=0.01)
        self.head = torch.nn.Linear(16, 40)

    def forward(self, tok):
        x = self.embed(tok)
        y1, a1 = self.moe1(x)
        y2, a2 = self.moe2(x + y1)
        return self.head(x + y1 + y2), a1 + a2


def test_topk_layers_fetch_the_routers_choice_and_train_like_without_ecss():
    torch.manual_seed(0)
    ref = _TopkNet()
    model = copy.deepcopy(ref)
    store = ecss.ExpertStore(model, device_budget_bytes=2 * 7 * 2 * 4 * (16 * 24 + 12 * 16), **HYPER)  # 7 of 8
    dense = torch.optim.AdamW(store.dense_parameters(), **HYPER)
    ref_dense = torch.optim.AdamW([p for n, p in ref.named_parameters() if "w_" not in n], **HYPER)
    states = {}
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        tok = torch.randint(0, 40, (1, 2), generator=g, device="cpu").to(torch.get_default_device())  # <= 6 experts
        logits, aux = ref(tok)
        (F.cross_entropy(logits.reshape(-1, 40), tok.reshape(-1)) + aux).backward()
        for layer in (ref.moe1, ref.moe2):  # lazy: the experts with a gradient
            _lazy_reference_step(layer, torch.nonzero(layer.w_down.grad.reshape(8, -1).abs().sum(1) > 0).flatten(),
                                 states)
        ref_dense.step()
        ref_dense.zero_grad()

        stats = store.prepare()
        logits, aux = model(tok)
        (F.cross_entropy(logits.reshape(-1, 40), tok.reshape(-1)) + aux).backward()
        assert stats.misses > 0 and stats.resident_bytes <= store.budget
        store.step()
        dense.step()
        dense.zero_grad()
    for layer, ref_layer in zip(store.layers, (ref.moe1, ref.moe2)):
        want = torch.cat([ref_layer.w_gate_up.detach().reshape(8, -1), ref_layer.w_down.detach().reshape(8, -1)], 1)
        torch.testing.assert_close(layer.master, want, **TRAIN_TOL)
    with pytest.raises(ValueError, match="this step needs 8 experts"):  # 8 experts chosen, 7 slots
        store.prepare()
        model(torch.arange(40).reshape(20, 2))
