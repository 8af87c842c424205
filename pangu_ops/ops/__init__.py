"""The ops, one module each: schema, fake kernel and autograd (`_define.define`: a torch.library
custom op in namespace `pangu`), argument checks, and the public function; kernels by op name from
the backend chosen by `pangu_ops.backends`."""
from .adamw_experts import adamw_experts
from .expert_mlp import expert_mlp
from .grouped_gemm import grouped_gemm
from .moe_experts import moe_experts
from .permute import permute
from .router_logits import router_logits
from .rre_dispatch import rre_dispatch
from .unpermute import unpermute

__all__ = ["adamw_experts", "expert_mlp", "grouped_gemm", "moe_experts", "permute", "router_logits", "rre_dispatch", "unpermute"]
