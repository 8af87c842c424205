"""pangu_ops: fused Mixture-of-Experts kernels for PyTorch.

    x_sorted, group_sizes, sorted_index = pangu_ops.permute(x, expert_ids, num_experts)
    h = pangu_ops.grouped_gemm(x_sorted, w, group_sizes)
    y = pangu_ops.unpermute(h, sorted_index, weights)

Ops are registered as `torch.ops.pangu.*` (differentiable, torch.compile-able, opcheck-clean) and
run on the backend chosen by `use_backend` (see `pangu_ops.backends`).
"""
from .backends import cpu_output_cache, cpu_pack_cache, current_backend, use_backend
from . import routing
from .packed_weights import prepack, unprepack
from .ops import adamw_experts, expert_mlp, grouped_gemm, moe_experts, permute, rre_dispatch, unpermute

__version__ = "0.1.0"
__all__ = ["adamw_experts", "cpu_output_cache", "cpu_pack_cache", "current_backend", "expert_mlp", "grouped_gemm", "moe_experts", "permute", "prepack", "routing", "rre_dispatch", "unpermute", "unprepack", "use_backend"]
