"""unpermute (and its fused backward) against the reference."""
import pytest
import torch

import pangu_ops
from pangu_ops import reference

from conftest import BACKENDS, DEVICE, large_outputs_test, reference_test


test_matches_reference = reference_test("unpermute")

test_large_outputs_match_reference = large_outputs_test("unpermute")


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_with_every_slot_dropped_gets_zeros(backend):
    y_sorted = torch.randn(2, 6) + 3
    index = torch.tensor([0, 5])  # slots (0, 0) and (2, 1); token 1 has none
    with pangu_ops.use_backend(backend):
        y = pangu_ops.unpermute(y_sorted, index, torch.rand(3, 2) + 0.5)
    assert y.shape == (3, 6)
    assert torch.equal(y[1], torch.zeros(6)) and (y[0] != 0).all() and (y[2] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_none_means_ones(backend):
    y_sorted, index = torch.randn(4, 5), torch.tensor([3, 0, 1, 2])
    with pangu_ops.use_backend(backend):
        got = pangu_ops.unpermute(y_sorted, index, None, 2, topk=2)
        ones = pangu_ops.unpermute(y_sorted, index, torch.ones(2, 2))
    assert torch.equal(got, ones)
    torch.testing.assert_close(got, reference.unpermute(y_sorted, index, None, 2, 2))


def test_accumulates_in_fp32():
    """bf16 rows whose sum needs more than bf16's 8 bits: the fp32 sum is rounded once."""
    y_sorted = torch.tensor([[256.0], [1.0], [1.0]], dtype=torch.bfloat16)
    index = torch.tensor([0, 1, 2])  # one token, k = 3
    for backend in BACKENDS:
        with pangu_ops.use_backend(backend):
            assert pangu_ops.unpermute(y_sorted, index, None, 1, topk=3).item() == 258.0


@pytest.mark.usefixtures("on_the_cpu")  # a property of the reference, checked on the host
def test_reference_adds_each_tokens_slots_in_slot_order():
    """The reference's fp32 sum is slot 0 + slot 1 + ... of each token, bit for bit, whatever order
    the rows are sorted in: one order on every device and every call (index_add, its former sum,
    added in sorted-row order, and on a GPU with atomics, in a new order each call)."""
    g = torch.Generator().manual_seed(3)
    T, k, N = 40, 4, 33
    ids = torch.rand(T, 8, generator=g).argsort(1)[:, :k]  # distinct experts per token
    ids[torch.rand(T, k, generator=g) < 0.2] = -1  # some dropped slots
    weights = torch.rand(T, k, generator=g)
    y_slots = torch.randn(T * k, N, generator=g) * torch.logspace(-3, 3, T * k)[:, None]  # magnitudes that round
    _, _, index = reference.permute(torch.randn(T, 1, generator=g), ids, 8)
    y_sorted = y_slots[index]
    want = torch.zeros(T, N)
    for j in range(k):  # slot order, dropped slots adding 0
        kept = (ids[:, j] >= 0)[:, None]
        want = want + torch.where(kept, weights[:, j, None] * y_slots.view(T, k, N)[:, j], 0.0)
    got = reference.unpermute(y_sorted, index, weights, T, k)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_routing_weights_in_any_float_dtype_and_strides(backend, dtype):
    """Routing weights are read as they lie (the CPU kernels read them in place, in their dtype
    and strides): a transposed view in bf16 / fp16 / fp32 gives what the same values as contiguous
    fp32 give, in the forward and in both gradients (the weights' rounded to their dtype)."""
    gen = torch.Generator().manual_seed(5)  # (draws on the CPU, moved to the device under test)
    y_sorted = torch.randn(9, 7, generator=gen, device="cpu").to(DEVICE)
    index = torch.randperm(9, generator=gen, device="cpu").to(DEVICE)  # 3 tokens, k = 3
    weights = (torch.rand(3, 3, generator=gen, device="cpu") + 0.5).to(DEVICE, dtype).t().contiguous().t()
    assert not weights.is_contiguous()
    plain = weights.float().contiguous()
    outs = []
    for w in (weights, plain):
        y, w = y_sorted.clone().requires_grad_(), w.detach().clone().requires_grad_()
        with pangu_ops.use_backend(backend):
            out = pangu_ops.unpermute(y, index, w)
        out.backward(torch.arange(21.0).view(3, 7))
        outs.append((out, y.grad, w.grad.to(dtype).float()))
    for got, expected in zip(*outs):
        torch.testing.assert_close(got, expected)
