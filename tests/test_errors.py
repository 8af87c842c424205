"""Bad input raises ValueError/TypeError naming the argument, on every backend."""
import pytest
import torch

import pangu_ops

from conftest import BACKENDS, DEVICE

x = torch.randn(4, 8, device=DEVICE)
ids = torch.tensor([[0, 1], [1, 2], [2, 0], [-1, 1]], device=DEVICE)
y_sorted, index = torch.randn(7, 6, device=DEVICE), torch.tensor([0, 2, 5, 1, 7, 3, 4], device=DEVICE)
w = torch.randn(3, 8, 5, device=DEVICE)
sizes = torch.tensor([2, 3, 2], device=DEVICE)

BAD_CALLS = {
    # permute
    "x rank": (lambda: pangu_ops.permute(x[0], ids, 3), ValueError, "x must be 2-D"),
    "integer x": (lambda: pangu_ops.permute(x.long(), ids, 3), TypeError, "x must have dtype"),
    "float expert ids": (lambda: pangu_ops.permute(x, ids.float(), 3), TypeError, "expert_ids must have dtype"),
    "1-D expert ids": (lambda: pangu_ops.permute(x, ids[:, 0], 3), ValueError, r"expert_ids must be 2-D \[T, k\]"),
    "ids rows": (lambda: pangu_ops.permute(x, ids[:3], 3), ValueError, "expert_ids: expected rows"),
    "expert id too large": (lambda: pangu_ops.permute(x, ids, 2), ValueError, r"expert_ids\[1, 1\] = 2 is out of range"),
    "expert id below -1": (lambda: pangu_ops.permute(x, torch.tensor([[0, -2]] * 4), 3), ValueError,
                           r"expert_ids\[0, 1\] = -2 is out of range"),
    "num_experts zero": (lambda: pangu_ops.permute(x, ids, 0), ValueError, "num_experts must be a positive int"),
    "mixed devices": (lambda: pangu_ops.permute(x, ids.to("meta"), 3), ValueError, "one device"),
    # unpermute
    "index out of range": (lambda: pangu_ops.unpermute(y_sorted, index, torch.rand(3, 2)), ValueError,
                           r"sorted_index\[4\] = 7 is out of range"),
    "index twice": (lambda: pangu_ops.unpermute(y_sorted, torch.tensor([0, 1, 2, 3, 4, 5, 0]), torch.rand(4, 2)),
                    ValueError, "twice"),
    "index length": (lambda: pangu_ops.unpermute(y_sorted, index[:5], torch.rand(4, 2)), ValueError,
                     "sorted_index: expected length"),
    "index dtype": (lambda: pangu_ops.unpermute(y_sorted, index.int(), torch.rand(4, 2)), TypeError,
                    "sorted_index must have dtype int64"),
    "weights shape": (lambda: pangu_ops.unpermute(y_sorted, index, torch.rand(4, 2), 5), ValueError,
                      r"weights must be \[num_tokens, topk\] = \[5, 2\]"),
    "no topk without weights": (lambda: pangu_ops.unpermute(y_sorted, index, None, 4), ValueError, "topk"),
    "integer y": (lambda: pangu_ops.unpermute(y_sorted.int(), index, torch.rand(4, 2)), TypeError,
                  "y_sorted must have dtype"),
    # grouped_gemm
    "sizes do not sum": (lambda: pangu_ops.grouped_gemm(torch.randn(6, 8), w, sizes), ValueError,
                         "group_sizes sum to 7 but x has 6 rows"),
    "negative size": (lambda: pangu_ops.grouped_gemm(torch.randn(7, 8), w, torch.tensor([4, -1, 4])), ValueError,
                      r"group_sizes\[1\] = -1 is negative"),
    "sizes length": (lambda: pangu_ops.grouped_gemm(torch.randn(7, 8), w, torch.tensor([3, 4])), ValueError,
                     "group_sizes: expected length"),
    "float sizes": (lambda: pangu_ops.grouped_gemm(torch.randn(7, 8), w, sizes.float()), TypeError,
                    "group_sizes must have dtype"),
    "K mismatch": (lambda: pangu_ops.grouped_gemm(torch.randn(7, 9), w, sizes), ValueError, r"K \(x.shape\[1\]\)"),
    "K mismatch trans_b": (lambda: pangu_ops.grouped_gemm(torch.randn(7, 8), w, sizes, trans_b=True), ValueError,
                           r"w \[E, N, K\]"),
    "w rank": (lambda: pangu_ops.grouped_gemm(torch.randn(7, 8), w[0], sizes), ValueError, "w must be 3-D"),
    "dtype mismatch": (lambda: pangu_ops.grouped_gemm(torch.randn(7, 8), w.half(), sizes), TypeError,
                       "x .* and w .* must have the same dtype"),
    "not a tensor": (lambda: pangu_ops.grouped_gemm([[1.0]], w, sizes), TypeError, "x must be a torch.Tensor"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_clear_error(backend, name):
    call, exc, message = BAD_CALLS[name]
    with pangu_ops.use_backend(backend), pytest.raises(exc, match=message):
        call()
