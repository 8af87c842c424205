"""router_logits (the MoE layer's fp32 router product) and its backward against the reference."""
import pytest
import torch

import pangu_ops
from pangu_ops import reference, verify
from pangu_ops.nn import MoEFeedForward
from pangu_ops.ops import router_logits

from conftest import BACKENDS, reference_test, serving

test_matches_reference = reference_test("router_logits")


def _inputs(T, H, E, dtype, seed=0):
    gen = verify.generator(seed)
    x = verify.randn((T, H), dtype, gen, noncontig=True).requires_grad_()
    w = verify.randn((E, H), dtype, gen, scale=H ** -0.5).requires_grad_()
    return x, w, verify.randn((T, E), torch.float32, gen)


# The CPU kernel's paths: token blocks of 48 and their tails, decode sizes (BLAS below 16 tokens;
# experts split over the threads below two blocks), experts not a multiple of the 4-expert register
# block, odd H (padded vectors), and an inner dimension in several passes (E x H fp32 > 512 KiB);
# with bf16 and H a multiple of 32, AMX tiles where the CPU has them: 32-token blocks and a last one
# of 12 or 2 tokens, experts padded to 32 (6, 130), from 64 tokens on (63: the vector kernels).
SHAPES = [(1, 7, 3), (15, 64, 9), (20, 100, 9), (63, 64, 5), (97, 1030, 17), (130, 2048, 130), (200, 33, 1), (300, 64, 6)]


@pytest.mark.parametrize("dtype", verify.DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", serving("router_logits"))
def test_shapes_match_reference(backend, shape, dtype):
    x, w, g = _inputs(*shape, dtype)
    with pangu_ops.use_backend(backend):
        got = router_logits(x, w)
        dx, dw = torch.autograd.grad(got, [x, w], g)
    want = reference.router_logits(x, w)
    want_dx, want_dw = torch.autograd.grad(want, [x, w], g)
    assert got.dtype == torch.float32 and dx.dtype == dw.dtype == dtype
    for name, a, b, tol in (("logits", got, want, torch.float32), ("grad x", dx, want_dx, dtype),
                            ("grad weight", dw, want_dw, dtype)):
        check, err, ok, detail = verify.compare(name, a, b, tol)
        assert ok, f"{check}: max error {err:g} {detail}"


def test_16bit_results_do_not_depend_on_the_thread_count():
    ops = torch.ops.pangu_cpu
    threads = torch.get_num_threads()
    for H in (520, 512):  # (the vector kernels; the tiles where the CPU has AMX-BF16)
        x, w, g = _inputs(300, H, 13, torch.bfloat16)
        try:
            runs = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                runs.append((ops.router_logits(x, w), *ops.router_logits_backward(g, x, w, True, True)))
        finally:
            torch.set_num_threads(threads)
        for run in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


def test_non_finite_values_propagate():
    """inf and NaN in x or the gradient reach the results as in fp32 (the split gradient's low part
    of an infinite value is zero, not NaN)."""
    for H in (100, 64):
        x, w, g = _inputs(80, H, 5, torch.bfloat16)  # (80 tokens: the tiles where H allows)
        x, w = x.detach().clone(), w.detach().clone()
        x[3, 7], x[9, 0] = float("inf"), float("nan")
        g[5, 2], g[6, 1] = float("inf"), float("nan")
        for backend in serving("router_logits"):
            with pangu_ops.use_backend(backend):
                got = (router_logits(x, w), *torch.ops.pangu.router_logits_backward(g, x, w, True, True))
            want = (reference.router_logits(x, w), *reference.router_logits_backward(g, x, w, True, True))
            for a, b in zip(got, want):
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), backend


def test_only_the_gradients_asked_for():
    x, w, g = _inputs(50, 64, 5, torch.bfloat16)
    for backend in serving("router_logits"):
        with pangu_ops.use_backend(backend):
            out = torch.ops.pangu.router_logits_backward(g, x.detach(), w.detach(), False, True)
            assert out[0].numel() == 0 and out[1].shape == w.shape
            out = torch.ops.pangu.router_logits_backward(g, x.detach(), w.detach(), True, False)
            assert out[0].shape == x.shape and out[1].numel() == 0
            # a frozen router: no weight gradient computed, x's still
            assert torch.autograd.grad(router_logits(x, w.detach()), x, g)[0].shape == x.shape


def test_layer_router_matches_fp32_linear():
    """The MoE layer's router gives what F.linear on fp32 copies gave, gradients included."""
    layer = MoEFeedForward(64, 32, 6, topk=2, dtype=torch.bfloat16)
    x, _, g = _inputs(70, 64, 6, torch.bfloat16, seed=3)
    got = layer.router_logits(x)
    want = torch.nn.functional.linear(x.float(), layer.gate.weight.float())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got_dx, got_dw = torch.autograd.grad(got, [x, layer.gate.weight], g)
    want_dx, want_dw = torch.autograd.grad(want, [x, layer.gate.weight], g)
    torch.testing.assert_close(got_dx, want_dx)
    torch.testing.assert_close(got_dw, want_dw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(backend):
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    bad = [
        (lambda: router_logits(x[0], w), ValueError, "x must be 2-D"),
        (lambda: router_logits(x, w[:, :5]), ValueError, r"weight \[E, H\]: expected H"),
        (lambda: router_logits(x.long(), w), TypeError, "x must have dtype"),
        (lambda: router_logits(x, w.int()), TypeError, "weight must have dtype"),
        (lambda: router_logits(x, w.to("meta")), ValueError, "one device"),
        (lambda: router_logits([[1.0]], w), TypeError, "x must be a torch.Tensor"),
    ]
    with pangu_ops.use_backend(backend):
        for call, exc, message in bad:
            with pytest.raises(exc, match=message):
                call()


def test_backends_without_a_router_kernel_run_the_reference():
    x, w, _ = _inputs(30, 40, 6, torch.float16)
    others = [b for b in BACKENDS if b not in serving("router_logits")]
    for backend in others:
        with pangu_ops.use_backend(backend):
            assert torch.equal(router_logits(x, w), reference.router_logits(x, w)), backend
