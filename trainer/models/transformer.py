"""Transformer encoder (sequence classification/regression) and decoder-only language model.

Attention is written with nn.Linear + scaled_dot_product_attention rather than
nn.MultiheadAttention, whose forward reads `out_proj.weight` without calling `out_proj`:
ZeRO-3 gathers a module's partitioned weights only when that module's forward runs.
"""

import torch
import torch.nn.functional as F
from torch import nn

from stoker.errors import UserError
from stoker.trainer.models.sequence import ToSequence


class Block(nn.Module):
    """Pre-norm Transformer block: self-attention and a GELU MLP, each with a residual."""

    def __init__(self, width: int, heads: int, ff: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, ff), nn.Linear(ff, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.down(F.gelu(self.up(self.norm2(x)))))


class Backbone(nn.Module):
    def __init__(self, config, spec, causal: bool) -> None:
        super().__init__()
        width = config.embed_dim
        self.inputs = ToSequence(spec, width)
        self.max_len = config.max_len or self.inputs.steps
        if self.inputs.steps > self.max_len:
            raise UserError(
                f"model.max_len: {self.max_len} is shorter than the dataset's sequences ({self.inputs.steps})"
            )
        self.position = nn.Embedding(self.max_len, width)
        ff = config.ff_dim or 4 * width
        self.blocks = nn.ModuleList(
            Block(width, config.num_heads, ff, config.dropout, causal) for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inputs(x)
        h = h + self.position(torch.arange(h.shape[1], device=h.device))
        for block in self.blocks:
            h = block(h)
        return self.norm(h)


class TransformerEncoder(nn.Module):
    def __init__(self, config, spec) -> None:
        super().__init__()
        self.backbone = Backbone(config, spec, causal=False)
        self.head = nn.Linear(config.embed_dim, spec.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).mean(dim=1))


class DecoderLM(nn.Module):
    """Next-token logits [B, L, vocab] for every position."""

    def __init__(self, config, spec) -> None:
        super().__init__()
        self.backbone = Backbone(config, spec, causal=True)
        self.head = nn.Linear(config.embed_dim, spec.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_transformer(config, spec) -> nn.Module:
    return TransformerEncoder(config, spec)


def build_gpt(config, spec) -> nn.Module:
    return DecoderLM(config, spec)
