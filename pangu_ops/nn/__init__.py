"""Model layers built only from pangu_ops ops: MoE feed-forward (top-k or RRE), decoder block, a
small PanGu-Σ-style LM, and the RRE domain operations."""
from .domains import add_domain, extract_domain, remove_domain, required_experts, rre_layers
from .model import DecoderBlock, PanguSigmaConfig, PanguSigmaLM
from .moe import MoEFeedForward, RREMoE, SwiGLU

__all__ = ["DecoderBlock", "MoEFeedForward", "PanguSigmaConfig", "PanguSigmaLM", "RREMoE", "SwiGLU", "add_domain",
           "extract_domain", "remove_domain", "required_experts", "rre_layers"]
