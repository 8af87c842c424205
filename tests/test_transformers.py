"""The "pangu_ops" experts backend for Hugging Face transformers: tiny models of every MoE family
built from config objects (no downloads) give eager's logits (fp32, and bf16 as accurately as
eager itself), eager's gradients, the same generated tokens, and compile with fullgraph=True."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
hf = pytest.importorskip("pangu_ops.integrations.transformers")

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=20,
                                         num_experts=6, num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=40, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                                         decoder_sparse_step=1, norm_topk_prob=True, head_dim=8)),
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, intermediate_size=40, moe_intermediate_size=24,
                                             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
                                             topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2)),
    # GeGLU experts (the fused gate in erf- and tanh-GELU form)
    "olmoe_gelu": ("OlmoeConfig", dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2, hidden_act="gelu")),
    "mixtral_gelu_tanh": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2,
                                                hidden_act="gelu_pytorch_tanh")),
    # hash-routed first layer (frozen token id -> experts table), clamped SwiGLU (swiglu_limit)
    "deepseek_v4": ("DeepseekV4Config", dict(num_key_value_heads=1, head_dim=16, qk_rope_head_dim=8, q_lora_rank=16,
                                             o_lora_rank=16, o_groups=2, index_head_dim=8, index_n_heads=2, index_topk=4,
                                             sliding_window=8, intermediate_size=24, moe_intermediate_size=24,
                                             n_routed_experts=8, num_experts_per_tok=2, hc_mult=2, swiglu_limit=0.5,
                                             layer_types=["sliding_attention"] * 2, mlp_layer_types=["hash_moe", "moe"])),
    # transposed experts with biases and a clamped, interleaved gate (its own _apply_gate)
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, head_dim=8,
                                     sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
}


def _model(family: str, dtype=torch.float32):
    cls, extra = FAMILIES[family]
    config = getattr(transformers, cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config)
    for p in model.parameters():  # HF's tiny init leaves experts near zero: make them matter
        if p.dim() == 3:
            torch.nn.init.normal_(p, std=0.2)
    for name, b in model.named_buffers():
        if name.endswith("tid2eid"):  # hash routing tables come from checkpoints: draw one
            b.copy_(torch.randint(0, config.n_routed_experts, b.shape))
    return model.to(dtype)


def _experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")]


def _logits(model, ids, implementation):
    model.set_experts_implementation(implementation)
    return model(ids).logits.detach()


def _ids(batch=2, seq=9):
    return torch.randint(0, COMMON["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(5),
                         device="cpu").to(torch.get_default_device())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_eager_fp32(family):
    model = _model(family)
    assert _experts_modules(model), f"{family} has no experts module on the experts interface"
    ids = _ids()
    eager, ours = _logits(model, ids, "eager"), _logits(model, ids, hf.NAME)
    scale = eager.abs().max()
    torch.testing.assert_close(ours, eager, rtol=0, atol=2e-6 * float(scale))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_bf16_as_accurate_as_eager(family):
    """bf16: pangu_ops (fp32 accumulation, rounding where eager rounds) is no further from the
    fp32 model than eager bf16 is (x2, for different rounding points), and close in absolute terms."""
    ids = _ids()
    exact = _logits(_model(family), ids, "eager").float()
    model = _model(family, torch.bfloat16)
    eager, ours = _logits(model, ids, "eager").float(), _logits(model, ids, hf.NAME).float()
    eager_err, our_err = (eager - exact).abs().max(), (ours - exact).abs().max()
    assert our_err <= 2 * eager_err + 1e-3 * exact.abs().max(), (float(our_err), float(eager_err))
    # absolute closeness where the model itself allows it (tiny DeepSeek-V4 is 40% off in bf16 on
    # eager too: its bf16 routers flip experts)
    assert our_err <= max(0.05 * exact.abs().max(), eager_err), (float(our_err), float(eager_err))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gradients_equal_eager(family):
    model = _model(family)
    ids = _ids()

    def grads(implementation):
        model.zero_grad()
        model.set_experts_implementation(implementation)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager, ours = grads("eager"), grads(hf.NAME)
    assert eager.keys() == ours.keys()
    expert_params = [n for n in eager if "experts" in n]
    assert expert_params, "no expert weight received a gradient"
    largest = max(float(g.abs().max()) for g in eager.values())
    for name in eager:  # (+ a 1e-8 share of the largest gradient, for tensors whose own is ~0)
        scale = float(eager[name].abs().max())
        torch.testing.assert_close(ours[name], eager[name], rtol=0, atol=1e-5 * scale + 1e-8 * largest, msg=name)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_generate_gives_eager_tokens(family):
    model = _model(family)
    ids = _ids(1, 6)

    def generate(implementation):
        model.set_experts_implementation(implementation)
        return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)

    assert torch.equal(generate(hf.NAME), generate("eager"))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_model_compiles_fullgraph(family):
    torch._dynamo.reset()
    model = _model(family)
    ids = _ids()
    model.set_experts_implementation(hf.NAME)
    eager = model(ids).logits
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def _mixtral_experts_routed(tokens: int, seed: int):
    """(a tiny Mixtral's first experts module, x [tokens, H], top-2 ids, the generator that drew them)."""
    experts = _experts_modules(_model("mixtral"))[0]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, COMMON["hidden_size"], generator=gen, device="cpu").to(torch.get_default_device())
    ids = torch.randint(0, 6, (tokens, 2), generator=gen, device="cpu").to(x.device)
    return experts, x, ids, gen


def test_inference_is_the_single_call(monkeypatch):
    """CPU inference goes from `experts_forward` straight to moe_experts' single C++ call (the
    module's checks run only if it fails), giving transformers' own output; with a gradient wanted
    it takes the autograd path instead, with the same values."""
    from pangu_ops import backends

    if torch.get_default_device().type != "cpu" or not backends.serves("cpu", "moe_experts"):
        pytest.skip("the single call is the CPU backend's")
    experts, x, ids, gen = _mixtral_experts_routed(1, seed=3)
    w = torch.rand(1, 2, generator=gen)
    calls = []
    single = hf.run_one_call
    monkeypatch.setattr(hf, "run_one_call", lambda args: calls.append(args) or single(args))
    checks = hf._check_inputs
    monkeypatch.setattr(hf, "_check_inputs", lambda *a: pytest.fail("checked before the single call"))
    with torch.no_grad():
        got = hf.experts_forward(experts, x, ids, w)
        want = hf._moe.grouped_mm_experts_forward(experts, x, ids, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(calls) == 1
    monkeypatch.setattr(hf, "_check_inputs", checks)
    trained = hf.experts_forward(experts, x.requires_grad_(), ids, w)
    assert len(calls) == 1 and trained.grad_fn is not None
    torch.testing.assert_close(trained.detach(), got, rtol=0, atol=0)
    with torch.no_grad(), pytest.raises(TypeError, match="top_k_index"):  # named as the module's argument
        hf.experts_forward(experts, x, ids.float(), w)


def test_dense_routing_weights_and_expert_parallel_sentinels():
    """[T, E] routing weights are gathered at the top-k ids; ids >= E (another rank's experts
    under transformers' EP) contribute nothing, as in transformers' own backends."""
    experts, x, ids, gen = _mixtral_experts_routed(5, seed=1)
    dense = torch.rand(5, 6, generator=gen, device="cpu").to(x.device)
    expected = hf._moe.grouped_mm_experts_forward(experts, x, ids, dense.gather(1, ids))
    torch.testing.assert_close(hf.experts_forward(experts, x, ids, dense), expected, rtol=1e-5, atol=1e-6)
    experts._is_expert_parallel = True
    try:
        ids_ep = ids.clone()
        ids_ep[1, 0] = 6  # a sentinel: not this rank's expert
        w = torch.rand(5, 2, generator=gen, device="cpu").to(x.device)
        masked = w.clone()
        masked[1, 0] = 0.0
        expected = hf._moe.grouped_mm_experts_forward(experts, x, ids.masked_fill(ids_ep >= 6, 0), masked)
        torch.testing.assert_close(hf.experts_forward(experts, x, ids_ep, w), expected, rtol=1e-5, atol=1e-6)
    finally:
        experts._is_expert_parallel = False


def test_unservable_experts_fall_back_with_one_warning():
    class Odd(torch.nn.Module):  # no stacked weights: not ours to serve
        has_gate = True

    odd = Odd()
    calls = []
    original = hf._moe.grouped_mm_experts_forward
    hf._moe.grouped_mm_experts_forward = lambda *a: calls.append(a) or "fallback"
    try:
        with pytest.warns(UserWarning, match="no stacked .* `gate_up_proj` weight; Odd runs transformers' 'grouped_mm'"):
            assert hf.experts_forward(odd, torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)) == "fallback"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            hf.experts_forward(odd, torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))
    finally:
        hf._moe.grouped_mm_experts_forward = original
        hf._warned.clear()
    assert len(calls) == 2


def test_dtype_mismatch_is_a_clear_error():
    model = _model("mixtral")
    experts = _experts_modules(model)[0]
    x = torch.randn(3, COMMON["hidden_size"], dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"hidden_states .*bfloat16.* and MixtralExperts.gate_up_proj .*float32.* must have the same dtype"):
        hf.experts_forward(experts, x, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))


def test_fused_gate_serves_the_default_and_clamped_gates_only():
    """Which experts run the fused expert_mlp: transformers' default gate (SiLU here) and
    DeepSeek-V4's clamped SwiGLU; GPT-OSS's interleaved gate and biases go through its own
    `_apply_gate` (the values of both paths are checked above against eager)."""
    fused = {family: hf._fused_gate(_experts_modules(_model(family))[0]) for family in FAMILIES}
    assert fused["mixtral"] == fused["qwen3_moe"] == fused["deepseek_v3"] == ("swiglu", None)
    assert fused["deepseek_v4"] == ("swiglu", 0.5)
    assert fused["gpt_oss"] is None
    assert fused["olmoe_gelu"] == ("geglu", None) and fused["mixtral_gelu_tanh"] == ("geglu_tanh", None)
    from transformers import activations

    experts = _experts_modules(_model("mixtral"))[0]
    for act, name in ((activations.GELUActivation(), "geglu"), (activations.GELUTanh(), "geglu_tanh"),
                      (torch.nn.ReLU(), None)):
        experts.act_fn = act
        assert hf._fused_gate(experts) == (None if name is None else (name, None))


def test_one_call_plan_follows_replaced_weights_and_gates():
    """The plan of the fused one-call path kept per experts module (`_kept_plan`: which weights,
    activation, layout) is made again when the module's weights or act_fn are replaced (as prepack
    and users do): each output equals transformers' own grouped_mm path on the module as it then is,
    a gate the fused kernel does not compute falls back to the module's own, and the module stays
    picklable (the plan is not kept on it). (A layout change, prepack's: test_prepack_transformers_model.)"""
    import pickle

    from transformers import activations

    experts, x, ids, gen = _mixtral_experts_routed(3, seed=2)
    w = torch.rand(3, 2, generator=gen, device="cpu").to(x.device)

    def check():
        with torch.no_grad():
            got = hf.experts_forward(experts, x, ids, w)
            want = hf._moe.grouped_mm_experts_forward(experts, x, ids, w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    check()
    assert experts in hf._PLANS
    experts.act_fn = activations.GELUTanh()
    check()
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.detach() * -1.5)
    check()
    experts.down_proj = torch.nn.Parameter(experts.down_proj.detach().flip(0))
    check()
    experts.act_fn = torch.nn.ReLU()  # not the fused kernel's: the module's own gate
    check()
    assert hf._PLANS[experts][4] is None
    pickle.loads(pickle.dumps(experts))
