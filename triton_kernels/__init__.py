"""Triton GPU kernels of pangu_ops (the "triton" backend), installed as `pangu_ops.triton_kernels`.

Each module holds one op's kernels and the host functions with the signature of the internal op
of the same name (`torch.ops.pangu.<name>`). On CPU tensors they run in Triton's interpreter when
TRITON_INTERPRET=1 was set before import (the CI configuration).
"""
from .expert_mlp import expert_mlp, gated_backward
from .grouped_gemm import grouped_gemm, grouped_gemm_wgrad
from .permute import permute, rre_dispatch
from .unpermute import unpermute, unpermute_backward

__all__ = ["expert_mlp", "gated_backward", "grouped_gemm", "grouped_gemm_wgrad", "permute", "rre_dispatch", "unpermute",
           "unpermute_backward"]
