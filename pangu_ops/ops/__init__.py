"""The ops, one module each: schema (torch.library, namespace `pangu`), fake kernel, autograd and
dispatch to the backend chosen by `pangu_ops.backends`."""
from .expert_mlp import expert_mlp
from .grouped_gemm import grouped_gemm
from .permute import permute
from .rre_dispatch import rre_dispatch
from .unpermute import unpermute

__all__ = ["expert_mlp", "grouped_gemm", "permute", "rre_dispatch", "unpermute"]
