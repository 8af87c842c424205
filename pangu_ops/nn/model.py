"""A decoder block and a small PanGu-Σ-style language model: shared dense layers and RRE layers."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .moe import MoEFeedForward, RREMoE, SwiGLU


class DecoderBlock(nn.Module):
    """Pre-norm block: causal self-attention (torch's SDPA), then the feed-forward `ffn` (a dense
    module, or a MoEFeedForward that gets token/domain ids and returns its auxiliary loss)."""

    def __init__(self, hidden: int, num_heads: int, ffn: nn.Module):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.attn_norm = nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.ffn_norm = nn.RMSNorm(hidden)
        self.ffn = ffn

    def forward(self, x: Tensor, token_ids: Tensor | None = None, domain_ids: Tensor | None = None):
        B, S, H = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, S, 3, self.num_heads, H // self.num_heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, S, H))
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoEFeedForward):
            out, aux = self.ffn(h, token_ids, domain_ids)
        else:
            out, aux = self.ffn(h), x.new_zeros((), dtype=torch.float32)
        return x + out, aux


@dataclass
class PanguSigmaConfig:
    """`rre_layers`: indices of the layers whose FFN is an RRE MoE; the others are shared dense
    SwiGLU layers (PanGu-Σ stacks dense layers below RRE layers)."""

    vocab_size: int = 256
    hidden: int = 64
    num_heads: int = 4
    num_layers: int = 4
    ffn: int = 128
    rre_layers: list[int] = field(default_factory=lambda: [2, 3])
    num_experts: int = 8
    num_domains: int = 2
    expert_ffn: int = 64
    seed: int = 0


class PanguSigmaLM(nn.Module):
    def __init__(self, config: PanguSigmaConfig):
        super().__init__()
        c = self.config = config
        bad = [i for i in c.rre_layers if not 0 <= i < c.num_layers]
        if bad:
            raise ValueError(f"rre_layers {bad} outside [0, num_layers={c.num_layers})")
        self.embed = nn.Embedding(c.vocab_size, c.hidden)
        self.blocks = nn.ModuleList(
            DecoderBlock(c.hidden, c.num_heads,
                         RREMoE(c.hidden, c.expert_ffn, c.num_experts, c.num_domains, c.vocab_size, seed=c.seed, layer=i)
                         if i in c.rre_layers else SwiGLU(c.hidden, c.ffn))
            for i in range(c.num_layers))
        self.norm = nn.RMSNorm(c.hidden)
        self.head = nn.Linear(c.hidden, c.vocab_size, bias=False)

    def forward(self, token_ids: Tensor, domain_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(logits [B, S, vocab], auxiliary loss)."""
        x = self.embed(token_ids)
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, a = block(x, token_ids, domain_ids)
            aux = aux + a
        return self.head(self.norm(x)), aux
