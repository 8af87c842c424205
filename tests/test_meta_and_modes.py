"""The ops as shape inference and tracing see them: every op on meta tensors returns the custom
op's shapes (no backend needed), a MoE layer and a transformers MoE model run a forward pass under
`torch.device("meta")` and under `FakeTensorMode`, and a `TorchFunctionMode` sees every op call
(the eager short path steps aside for all of these)."""
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch._subclasses.fake_tensor import FakeTensorMode

import pangu_ops
from pangu_ops.nn import MoEFeedForward


def _calls(device):
    """(name, public call, its custom op's call) of every op on small inputs on `device`."""
    x, ids = torch.randn(6, 8, device=device), torch.randint(0, 4, (6, 2), device=device)
    w, sizes = torch.randn(4, 8, 5, device=device), torch.tensor([3, 0, 5, 4], device=device)
    xs = torch.randn(12, 8, device=device)
    gu, wd = torch.randn(4, 8, 10, device=device), torch.randn(4, 5, 8, device=device)
    idx, wts = torch.randperm(12, device=device), torch.rand(6, 2, device=device)
    tok, dom, table = (torch.randint(0, 9, (2, 3), device=device), torch.tensor([0, 1], device=device),
                       torch.randint(0, 4, (2, 9), device=device))
    state = [torch.randn(4, 7, device=device) for _ in range(3)] + [torch.zeros(4, dtype=torch.long, device=device)]
    g, listed = torch.randn(2, 7, device=device), torch.tensor([1, 3], device=device)
    ops = torch.ops.pangu
    return [
        ("permute", lambda: pangu_ops.permute(x, ids, 4), lambda: ops.permute(x, ids, 4)),
        ("unpermute", lambda: pangu_ops.unpermute(xs, idx, wts), lambda: ops.unpermute(xs, idx, wts, 6, 2)),
        ("grouped_gemm", lambda: pangu_ops.grouped_gemm(xs, w, sizes), lambda: ops.grouped_gemm(xs, w, sizes, False)),
        ("expert_mlp", lambda: pangu_ops.expert_mlp(xs, gu, wd, sizes),
         lambda: ops.expert_mlp(xs, gu, wd, sizes, "swiglu", False, float("inf"))[0]),
        ("rre_dispatch", lambda: pangu_ops.rre_dispatch(x, tok, dom, table, 4),
         lambda: ops.rre_dispatch(x, tok, dom, table, 4)),
        ("adamw_experts", lambda: pangu_ops.adamw_experts(*state, g, listed, None, lr=1e-3),
         lambda: ops.adamw_experts(*state, g, listed, None, 1e-3, 0.9, 0.999, 1e-8, 0.0)),
    ]


def _shapes(out):
    if out is None:
        return None
    return [tuple(t.shape) for t in out] if isinstance(out, tuple) else tuple(out.shape)


@pytest.mark.parametrize("i", range(6), ids=[c[0] for c in _calls("cpu")])
def test_every_op_on_meta_tensors_gives_the_custom_ops_shapes(i):
    name, public, custom = _calls("meta")[i]
    got, want = public(), custom()
    assert _shapes(got) == _shapes(want), name
    assert all(t.device.type == "meta" for t in (got if isinstance(got, tuple) else [got] if got is not None else []))


def test_meta_ops_keep_autograd():
    x = torch.randn(6, 8, device="meta", requires_grad=True)
    w = torch.randn(4, 8, 5, device="meta", requires_grad=True)
    y = pangu_ops.grouped_gemm(x, w, torch.tensor([1, 2, 0, 3], device="meta"))
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and x.grad.device.type == "meta"


@pytest.mark.parametrize("router", ["topk", "rre", "hash"])
def test_moe_layer_forward_on_meta_and_fake_tensors(router):
    kwargs = dict(topk=2, num_shared_experts=1) if router == "topk" else dict(vocab_size=50, topk=2)
    if router == "rre":
        kwargs = dict(vocab_size=50, num_domains=2)
    with torch.device("meta"):
        layer = MoEFeedForward(16, 12, 4, router=router, **kwargs)
        x = torch.randn(2, 5, 16)
        tok, dom = torch.randint(0, 50, (2, 5)), torch.tensor([0, 1])
        y, aux = layer(x, tok, dom)
    assert y.shape == x.shape and y.device.type == "meta" and aux.shape == ()
    real = MoEFeedForward(16, 12, 4, router=router, device="cpu", **kwargs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(torch.randn(2, 5, 16, device="cpu"))
        ftok = mode.from_tensor(torch.randint(0, 50, (2, 5), device="cpu"))
        fdom = mode.from_tensor(torch.tensor([0, 1], device="cpu"))
        y, _ = real(fx, ftok, fdom)
    assert y.shape == (2, 5, 16)


transformers = pytest.importorskip("transformers", minversion="5.0")


def _mixtral():
    import pangu_ops.integrations.transformers  # noqa: F401  (registers the "pangu_ops" backend)

    config = transformers.MixtralConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=24, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.set_experts_implementation("pangu_ops")
    return model


def test_transformers_model_forward_under_meta_device():
    with torch.device("meta"):
        model = _mixtral()
        out = model(torch.randint(0, 96, (2, 7)))
    assert out.logits.shape == (2, 7, 96) and out.logits.device.type == "meta"


def test_transformers_model_forward_under_fake_tensor_mode():
    with torch.device("cpu"):
        model = _mixtral()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = model(mode.from_tensor(torch.randint(0, 96, (2, 7), device="cpu")))
    assert out.logits.shape == (2, 7, 96)


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("i", range(6), ids=[c[0] for c in _calls("cpu")])
def test_a_torch_function_mode_sees_every_op(i):
    name, public, _ = _calls("cpu")[i]
    with _Recorder() as mode:
        public()
    assert any(name in s for s in mode.seen), (name, mode.seen[-5:])
