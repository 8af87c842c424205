"""torch.library.opcheck on every op: schema, fake kernel, autograd registration, AOT dispatch."""
import pytest
import torch

import pangu_ops
from pangu_ops import verify

from conftest import BACKENDS


def _samples():
    case = verify.Case(24, 16, 12, 5, 2, drop=0.1, empty=1)
    gen = verify.generator(11)
    ids, w = verify.routing(case, gen)
    x = verify.randn((case.tokens, case.hidden), torch.float32, gen).requires_grad_()
    _, sizes, index = pangu_ops.reference.permute(x, ids, case.experts)
    rows = index.numel()
    y_sorted = verify.randn((rows, case.ffn), torch.float32, gen).requires_grad_()
    xs = verify.randn((rows, case.hidden), torch.float32, gen).requires_grad_()
    wt = verify.randn((case.experts, case.hidden, case.ffn), torch.float32, gen).requires_grad_()
    dy = verify.randn((rows, case.ffn), torch.float32, gen)
    g = verify.randn((case.tokens, case.ffn), torch.float32, gen)
    ops = torch.ops.pangu
    return {
        "permute": (ops.permute, (x, ids, case.experts)),
        "permute int32": (ops.permute, (x, ids.int(), case.experts)),
        "unpermute": (ops.unpermute, (y_sorted, index, w.requires_grad_(), case.tokens, case.topk)),
        "unpermute no weights": (ops.unpermute, (y_sorted, index, None, case.tokens, case.topk)),
        "unpermute_backward": (ops.unpermute_backward, (g, index, w.detach(), y_sorted.detach(), case.topk)),
        "grouped_gemm": (ops.grouped_gemm, (xs, wt, sizes, False)),
        "grouped_gemm trans_b": (ops.grouped_gemm, (xs, wt.transpose(1, 2).contiguous(), sizes, True)),
        "grouped_gemm_wgrad": (ops.grouped_gemm_wgrad, (xs.detach(), dy, sizes)),
        "expert_mlp": (ops.expert_mlp, (xs, verify.randn((case.experts, case.hidden, 2 * case.ffn), torch.float32, gen)
                                        .requires_grad_(), wt.transpose(1, 2).contiguous().detach().requires_grad_(),
                                        sizes, "swiglu", False, float("inf"))),
        "expert_mlp geglu trans_b clamped": (ops.expert_mlp, (xs, verify.randn((case.experts, 2 * case.ffn, case.hidden),
                                                                               torch.float32, gen).requires_grad_(),
                                                              wt.detach().requires_grad_(), sizes, "geglu", True, 0.7)),
        "router_logits": (ops.router_logits, (x, verify.randn((case.experts, case.hidden), torch.float32, gen)
                                              .requires_grad_())),
        "router_logits bf16": (ops.router_logits, (x.detach().bfloat16().requires_grad_(),
                                                   verify.randn((case.experts, case.hidden), torch.bfloat16, gen)
                                                   .requires_grad_())),
        "router_logits_backward": (ops.router_logits_backward, (verify.randn((case.tokens, case.experts), torch.float32,
                                                                             gen), x.detach().half(),
                                                                verify.randn((case.experts, case.hidden),
                                                                             torch.float16, gen), True, True)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_samples()))
def test_opcheck(backend, name):
    op, args = _samples()[name]
    with pangu_ops.use_backend(backend):
        torch.library.opcheck(op, args)
