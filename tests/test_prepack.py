"""Prepacked expert weights (`pangu_ops.prepack`): the packed layout, made in place; `expert_mlp`
on packed weights against the reference on the `[E, K, N]` ones (the CPU backend's tile kernels
where the CPU has AMX-BF16; the reference backend everywhere); prepack / unprepack of a model,
its state_dict both ways, and the errors."""
import copy
import warnings

import pytest
import torch

import pangu_ops
from pangu_ops import backends, packed_weights, reference, verify
from pangu_ops.backends import cpu as cpu_backend
from pangu_ops.nn import MoEFeedForward

pytestmark = pytest.mark.usefixtures("on_the_cpu")

TOL = verify.TOLERANCES[torch.bfloat16]


def _packed_kernels() -> bool:
    return cpu_backend.packed_kernels()


# (K, F, N, group sizes): one token (a decode step), a few rows with empty experts, odd sizes,
# prefill-sized groups (row chunks of the tile kernels), K > 2048 (blocked) in each product
CASES = {
    "one token": (64, 32, 64, [0, 1, 0, 0]),
    "few rows, empty experts": (96, 64, 32, [3, 0, 17, 2, 1, 12, 0]),
    "prefill": (64, 32, 96, [300, 0, 77, 1, 545]),
    "gate_up K > 2048": (2176, 32, 64, [40, 0, 29]),
    "down K > 2048": (64, 2080, 32, [33, 2, 0]),
    # 1-12 rows against many 16-column blocks: each thread's share in passes of 2-8 blocks spread
    # over it, then the blocks left over, rows in passes of 1-8 (the AVX512-BF16 kernels' decode shapes)
    "wide, 1-12 rows": (64, 288, 320, [1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 10, 12]),
}


def _problem(case: str, seed: int = 0):
    k, f, n, sizes = CASES[case]
    gen = verify.generator(seed)
    e = len(sizes)
    x = verify.randn((sum(sizes), k), torch.bfloat16, gen, scale=k ** -0.5)
    w_gate_up = verify.randn((e, k, 2 * f), torch.bfloat16, gen)
    w_down = verify.randn((e, f, n), torch.bfloat16, gen, scale=f ** -0.5)
    return x, w_gate_up, w_down, torch.tensor(sizes)


def test_layout():
    """packed[e, c, p, 2j + h] = w[e, 2p + h, 16c + j], made in w's own storage."""
    gen = verify.generator(1)
    w = verify.randn((3, 64, 96), torch.bfloat16, gen)
    p = packed_weights.pack(w)
    assert p.shape == (3, 96 // 16, 64 // 2, 32)
    for e, k, n in [(0, 0, 0), (1, 1, 17), (2, 63, 95), (0, 30, 33), (2, 7, 80)]:
        assert p[e, n // 16, k // 2, 2 * (n % 16) + k % 2] == w[e, k, n]
    torch.testing.assert_close(packed_weights.unpack(p), w, rtol=0, atol=0)
    # in place, from [E, K, N] and (transformers' layout) from [E, N, K] as its transpose's pack
    for held in (w, w.transpose(1, 2)):
        transposed = held is not w
        inplace = held.contiguous().clone()
        storage = inplace.untyped_storage().data_ptr()
        q = packed_weights._pack_(inplace, transposed)
        assert q.untyped_storage().data_ptr() == storage and torch.equal(q, p)
        r = packed_weights._unpack_(q, transposed)
        assert r.untyped_storage().data_ptr() == storage and torch.equal(r, held)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.usefixtures("dots_tuning")
def test_expert_mlp_packed(case, backend):
    if backend == "cpu" and not _packed_kernels():
        pytest.skip("the CPU backend's packed kernels need AMX-BF16 or AVX512-BF16 products")
    x, w_gate_up, w_down, sizes = _problem(case)
    expected = reference.expert_mlp(x, w_gate_up, w_down, sizes, "swiglu", False, float("inf"))[0]
    p_gate_up, p_down = packed_weights.pack(w_gate_up), packed_weights.pack(w_down)
    with torch.inference_mode(), pangu_ops.use_backend(backend):
        y = pangu_ops.expert_mlp(x, p_gate_up, p_down, sizes)
    if backend == "reference":  # the same values unpacked: the same result
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
    else:
        torch.testing.assert_close(y, expected, **TOL)


def test_expert_mlp_packed_view_off_the_cache_line():
    """A packed weight that starts one element into its storage (not 64-byte aligned): decode rows
    (dot products) and tiles read it as well."""
    if not _packed_kernels():
        pytest.skip("the CPU backend's packed kernels need AMX-BF16 or AVX512-BF16 products")
    x, w_gate_up, w_down, sizes = _problem("few rows, empty experts", seed=4)

    def shifted(w):
        p = packed_weights.pack(w)
        storage = torch.empty(p.numel() + 1, dtype=p.dtype)
        storage[1:] = p.flatten()
        return storage[1:].view(p.shape)
    expected = reference.expert_mlp(x, w_gate_up, w_down, sizes, "swiglu", False, float("inf"))[0]
    with torch.no_grad():
        torch.testing.assert_close(pangu_ops.expert_mlp(x, shifted(w_gate_up), shifted(w_down), sizes), expected, **TOL)


@pytest.mark.parametrize("activation,limit", [("geglu", None), ("geglu_tanh", 0.7), ("swiglu", 0.5)])
def test_expert_mlp_packed_gates(activation, limit):
    if not _packed_kernels():
        pytest.skip("the CPU backend's packed kernels need AMX-BF16 or AVX512-BF16 products")
    x, w_gate_up, w_down, sizes = _problem("prefill", seed=3)
    lim = float("inf") if limit is None else limit
    expected = reference.expert_mlp(x, w_gate_up, w_down, sizes, activation, False, lim)[0]
    with torch.no_grad():
        y = pangu_ops.expert_mlp(x, packed_weights.pack(w_gate_up), packed_weights.pack(w_down), sizes, activation,
                                 limit=limit)
    torch.testing.assert_close(y, expected, **TOL)


def _layer(seed: int) -> MoEFeedForward:
    torch.manual_seed(seed)
    return MoEFeedForward(64, 32, 4, topk=2, aux_loss_alpha=0.0, dtype=torch.bfloat16).eval()


@pytest.fixture
def kernels(monkeypatch):
    """The backend that runs packed weights here: the CPU's kernels with AMX-BF16 or AVX512-BF16
    products, else the reference (prepack then believes the CPU has them: the model plumbing is
    tested everywhere)."""
    if _packed_kernels():
        return "cpu"
    monkeypatch.setattr(cpu_backend, "packed_kernels", lambda: True)
    return "reference"


def test_prepack_model(kernels):
    layer = _layer(0)
    x = verify.randn((37, 64), torch.bfloat16, verify.generator(2))
    state = copy.deepcopy(layer.state_dict())
    with torch.inference_mode(), pangu_ops.use_backend(kernels):
        plain = layer(x)[0]
    storage = layer.w_gate_up.untyped_storage().data_ptr()
    assert pangu_ops.prepack(layer) == {"": "packed"}
    assert layer.w_gate_up.shape == (4, 64 // 16, 64 // 2, 32) and layer.w_down.shape == (4, 64 // 16, 32 // 2, 32)
    assert layer.w_gate_up.untyped_storage().data_ptr() == storage  # in place: no second copy
    assert not layer.w_gate_up.requires_grad
    with torch.inference_mode(), pangu_ops.use_backend(kernels):
        torch.testing.assert_close(layer(x)[0], plain, **TOL)
    # state_dict: the [E, K, N] weights, exactly
    saved = layer.state_dict()
    assert saved.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(saved[key], value), key
    # load_state_dict of [E, K, N] weights into the packed layer packs them
    other = _layer(1)
    layer.load_state_dict(other.state_dict())
    assert packed_weights.is_packed(layer.w_gate_up)
    assert torch.equal(packed_weights.unpack(layer.w_down), other.w_down)
    with torch.inference_mode(), pangu_ops.use_backend(kernels):
        torch.testing.assert_close(layer(x)[0], other(x)[0], **TOL)
    with pangu_ops.use_backend(kernels), pytest.raises(RuntimeError, match="inference"):  # a gradient is wanted
        layer(x.clone().requires_grad_())
    assert pangu_ops.prepack(layer) == {"": "already packed"}
    # moved to another dtype: the op refuses it, state_dict still unpacks it
    moved = copy.deepcopy(layer).float()
    assert torch.equal(moved.state_dict()["w_gate_up"], other.w_gate_up.float())
    with torch.no_grad(), pytest.raises(TypeError, match="bfloat16"):
        moved(x.float())
    # unprepack: the same weights back, trainable
    assert pangu_ops.unprepack(layer) == [""]
    assert torch.equal(layer.w_gate_up, other.w_gate_up) and layer.w_gate_up.requires_grad
    with pangu_ops.use_backend(kernels):
        layer(x)[0].float().sum().backward()
    assert layer.w_down.grad is not None and layer.w_down.grad.shape == other.w_down.shape


def test_unprepack_keeps_frozen_weights_frozen(kernels):
    layer = _layer(0)
    layer.w_down.requires_grad_(False)
    pangu_ops.prepack(layer)
    pangu_ops.unprepack(layer)
    assert layer.w_gate_up.requires_grad and not layer.w_down.requires_grad


def test_prepack_leaves_what_it_cannot_pack(kernels):
    model = torch.nn.ModuleDict({"fp32": MoEFeedForward(64, 32, 4, dtype=torch.float32),
                                 "odd": MoEFeedForward(48, 32, 4, dtype=torch.bfloat16),
                                 "bf16": MoEFeedForward(64, 32, 4, dtype=torch.bfloat16)})
    report = pangu_ops.prepack(model)
    assert report["bf16"] == "packed"
    assert "float32" in report["fp32"] and "multiples of 32" in report["odd"]
    assert model["fp32"].w_gate_up.dim() == 3 and model["odd"].w_down.dim() == 3


def test_prepack_needs_packed_kernels(monkeypatch):
    monkeypatch.setattr(cpu_backend, "packed_kernels", lambda: False)
    layer = _layer(0)
    with pytest.raises(RuntimeError, match="neither AMX-BF16 tiles nor AVX512-BF16 products"):
        pangu_ops.prepack(layer)
    assert layer.w_gate_up.dim() == 3


def test_errors():
    x, w_gate_up, w_down, sizes = _problem("few rows, empty experts")
    p_gate_up, p_down = packed_weights.pack(w_gate_up), packed_weights.pack(w_down)
    with torch.no_grad(), pangu_ops.use_backend("reference"):
        with pytest.raises(ValueError, match="trans_b"):
            pangu_ops.expert_mlp(x, p_gate_up, p_down, sizes, trans_b=True)
        with pytest.raises(ValueError, match="4-D"):  # one packed, one not
            pangu_ops.expert_mlp(x, p_gate_up, w_down, sizes)
        with pytest.raises(TypeError, match="bfloat16"):
            pangu_ops.expert_mlp(x.float(), p_gate_up.float(), p_down.float(), sizes)
        with pytest.raises(ValueError, match="contiguous"):
            pangu_ops.expert_mlp(x, p_gate_up.transpose(0, 1).contiguous().transpose(0, 1), p_down, sizes)
        with pytest.raises(ValueError, match="K"):  # x's K against the packed weight's
            pangu_ops.expert_mlp(x[:, :64], p_gate_up, p_down, sizes)
        with pytest.raises(ValueError, match="group_sizes"):
            pangu_ops.expert_mlp(x, p_gate_up, p_down, sizes[:-1])
    with torch.no_grad(), pangu_ops.use_backend("ascend_twin"), pytest.raises(ValueError, match="backend"):
        pangu_ops.expert_mlp(x, p_gate_up, p_down, sizes)
    with pytest.raises(RuntimeError, match="inference"):
        pangu_ops.expert_mlp(x.requires_grad_(), p_gate_up, p_down, sizes)
    with pytest.raises(ValueError, match="float32"):
        packed_weights.pack(w_gate_up.float())
    if backends.serves("cpu", "expert_mlp") and not _packed_kernels():  # the C++ kernel itself, without either
        with pytest.raises(RuntimeError, match="AMX"):
            torch.ops.pangu_cpu.expert_mlp(x.detach(), p_gate_up, p_down, sizes, "swiglu", False, float("inf"))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck_packed(backend):
    """The custom op with packed weights: schema, fake kernel (torch.compile's shapes), dispatch."""
    if backend == "cpu" and not _packed_kernels():
        pytest.skip("the CPU backend's packed kernels need AMX-BF16 or AVX512-BF16 products")
    x, w_gate_up, w_down, sizes = _problem("prefill", seed=5)
    args = (x, packed_weights.pack(w_gate_up), packed_weights.pack(w_down), sizes, "swiglu", False, float("inf"))
    with pangu_ops.use_backend(backend):
        torch.library.opcheck(torch.ops.pangu.expert_mlp, args)


def _hf_model(family: str, implementation: str = "pangu_ops"):
    """A tiny bf16 transformers MoE model whose expert sizes are multiples of 32."""
    transformers = pytest.importorskip("transformers", minversion="5.0")
    pytest.importorskip("pangu_ops.integrations.transformers")
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=2, head_dim=16)
    config = {
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32,
                                                         num_experts=6, decoder_sparse_step=1, norm_topk_prob=True),
        # row-major experts ([E, H, 2F] / [E, F, H]: is_transposed), SwiGLU, no biases
        "aria": lambda: transformers.AriaTextConfig(**common, intermediate_size=32, moe_num_experts=4, moe_topk=2,
                                                    moe_num_shared_experts=1),
        "gpt_oss": lambda: transformers.GptOssConfig(**common, intermediate_size=32, num_local_experts=4,
                                                     sliding_window=8, layer_types=["sliding_attention"] * 2),
    }[family]()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config)
    for p in model.parameters():
        if p.dim() == 3:
            torch.nn.init.normal_(p, std=0.2)
    model = model.to(torch.bfloat16).eval()
    model.set_experts_implementation(implementation)
    return model


@pytest.mark.parametrize("family", ["aria", "qwen3_moe"])
def test_prepack_transformers_model(kernels, family):
    """transformers' row-major experts (Aria's) and its usual [E, 2F, H] / [E, H, F] ones (Qwen3-MoE's,
    packed as their transposes: where the packed kernels are not AMX's): the same logits, state_dict
    in transformers' shapes both ways, unprepack back to the same weights."""
    if family == "qwen3_moe" and cpu_backend.has_amx():
        pytest.skip("transformers' usual layout is left unpacked with AMX (the transposed tile kernels read it)")
    model, other = _hf_model(family), _hf_model(family)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    state = copy.deepcopy(model.state_dict())
    with torch.inference_mode(), pangu_ops.use_backend(kernels):
        plain = model(ids).logits
    report = pangu_ops.prepack(model)
    assert set(report.values()) == {"packed"} and len(report) == 2
    experts = model.model.layers[0].mlp.experts
    assert packed_weights.is_packed(experts.gate_up_proj) and packed_weights.is_packed(experts.down_proj)
    e, h, f = 6 if family == "qwen3_moe" else 4, 64, 32  # packed [E, N/16, K/2, 32] of the row-major [E, K, N]
    assert experts.gate_up_proj.shape == (e, 2 * f // 16, h // 2, 32)
    assert experts.down_proj.shape == (e, h // 16, f // 2, 32)
    with torch.inference_mode(), pangu_ops.use_backend(kernels):
        torch.testing.assert_close(model(ids).logits, plain, **TOL)
    saved = model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in state.items())
    model.load_state_dict(other.state_dict())
    with torch.inference_mode(), pangu_ops.use_backend(kernels):
        torch.testing.assert_close(model(ids).logits, other(ids).logits, **TOL)
    assert len(pangu_ops.unprepack(model)) == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in other.state_dict().items())
    assert experts.gate_up_proj.shape == other.model.layers[0].mlp.experts.gate_up_proj.shape


def test_prepack_transformers_leaves_what_it_cannot_serve(kernels, monkeypatch):
    report = pangu_ops.prepack(_hf_model("gpt_oss"))  # biases and its own clamped gate: grouped_gemm
    assert report and all("gate, biases or norm" in v for v in report.values())
    report = pangu_ops.prepack(_hf_model("aria", implementation="eager"))
    assert report and all("experts backend 'eager'" in v for v in report.values())
    monkeypatch.setattr(cpu_backend, "has_amx", lambda: True)
    model = _hf_model("qwen3_moe")  # [E, 2F, H] with AMX: read in place, not packed
    report = pangu_ops.prepack(model)
    assert report and all("read in place" in v for v in report.values())
    assert model.model.layers[0].mlp.experts.gate_up_proj.dim() == 3


def test_bench_hf_prepacked_row_runs_the_block_packed(kernels):
    """`bench --hf`'s prepacked inference row: a packed copy of the block (the timed block's weights
    left as they are), the same output as the plain pangu_ops row; run in bf16 forward where the CPU
    backend takes packed weights."""
    pytest.importorskip("transformers", minversion="5.0")
    from pangu_ops.benchmarks import hf

    block = hf.Block("tiny", "Qwen3MoeConfig", hf.BLOCKS[1].module, 64, 32, 6, 2)
    experts = hf._experts(block, torch.bfloat16)
    route = hf._router(block, 5, torch.bfloat16, "fixed")
    with pangu_ops.use_backend(kernels):
        packed = hf._case(block, experts, 5, torch.bfloat16, "fwd", hf.PREPACKED, route)()
        plain = hf._case(block, experts, 5, torch.bfloat16, "fwd", "pangu_ops", route)()
    assert experts.gate_up_proj.dim() == 3
    torch.testing.assert_close(packed, plain, **TOL)
    if kernels == "cpu":  # the whole run (the reference stands in for packed kernels only under this test)
        rows = hf.run(blocks=(block,), dtypes=(torch.bfloat16,), sizes=(1,), modes=("fwd",), routings=("fixed",),
                      min_time=0.001, rounds=1)
        assert hf.PREPACKED in {r.impl for r in rows}


def test_prepacked_transformers_model_saves_as_transformers_checkpoint(kernels, tmp_path):
    """save_pretrained of a prepacked transformers model writes transformers' own expert shapes:
    from_pretrained gives back the same weights."""
    transformers = pytest.importorskip("transformers", minversion="5.0")
    family = "aria" if cpu_backend.has_amx() else "qwen3_moe"  # (Qwen3-MoE's packed where AMX is absent)
    model = _hf_model(family)
    state = copy.deepcopy(model.state_dict())
    assert set(pangu_ops.prepack(model).values()) == {"packed"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path)
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    saved = back.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], v) for k, v in state.items())
