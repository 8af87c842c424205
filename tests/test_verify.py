"""The verifier itself: it must flag wrong kernels (a check that cannot fail checks nothing)."""
import types

import pytest
import torch

from pangu_ops import backends, reference, verify


def _broken(op: str):
    """The reference with one realistic bug in `op`."""
    def permute(x, ids, e):
        x_sorted, sizes, index = reference.permute(x, ids, e)
        return x_sorted.flip(0), sizes, index  # rows in the wrong order

    def unpermute(y, index, weights, t, k):
        return reference.unpermute(y, index, None, t, k)  # ignores the weights

    def grouped_gemm(x, w, sizes, trans_b):
        return reference.grouped_gemm(x, w, sizes.flip(0), trans_b)  # groups matched to wrong experts

    def grouped_gemm_wgrad(x, dy, sizes):
        return reference.grouped_gemm_wgrad(x, dy, sizes) * 1.01  # 1% off

    bugs = {"permute": permute, "unpermute": unpermute, "grouped_gemm": grouped_gemm,
            "grouped_gemm_wgrad": grouped_gemm_wgrad}
    return types.SimpleNamespace(**{**vars(reference), op: bugs[op]})


@pytest.mark.parametrize("op, bug", [("permute", "permute"), ("unpermute", "unpermute"),
                                     ("grouped_gemm", "grouped_gemm"), ("grouped_gemm", "grouped_gemm_wgrad")])
def test_verifier_flags_a_wrong_kernel(monkeypatch, op, bug):
    monkeypatch.setattr(backends, "load", lambda name: _broken(bug))
    monkeypatch.setattr(backends, "_kernels", {})  # the per-call lookup cache
    case = verify.Case(40, 16, 12, 5, 2, empty=1)
    results = verify.check(op, "reference", torch.float32, case)
    assert any(not r.ok for r in results), f"the verifier missed a broken {bug}"


def test_tolerance_rejects_one_percent_error():
    expected = torch.randn(100) + 5
    for dtype in verify.DTYPES:
        e = expected.to(dtype)
        assert verify.compare("c", e, e, dtype)[2]
        assert not verify.compare("c", (e.float() * 1.03).to(dtype), e, dtype)[2]


def test_exact_comparison_and_shape_mismatch():
    a = torch.randn(4, 3)
    assert not verify.compare("c", a.nextafter(a + 1), a, None)[2]
    assert not verify.compare("c", a[:3], a, torch.float32)[2]
    assert not verify.compare("c", a.double(), a, torch.float32)[2]
