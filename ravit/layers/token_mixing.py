"""Token mixing: multi-head self-attention over tokens, the first half of a FAN block.

FAN (Zhou et al., ICML 2022, arXiv 2204.12451) Sec. 3: standard MHSA with separate ``q`` and ``kv`` projections (the
official key names). The fused path runs on ``F.scaled_dot_product_attention``; the explicit path also returns the
attention maps (analysis) and gives the same output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ravit.errors import InvalidArgumentError

__all__ = ["TokenMixing", "explicit_attention"]


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ / √d) v with the attention map; q (B, h, Nq, d), k and v (B, h, N, d) -> ((B, h, Nq, d), map)."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, Nq, N); scale on q first, as the official code
    attn = attn.softmax(dim=-1)
    out = (dropout(attn) if dropout is not None else attn) @ v
    return out, attn


class TokenMixing(nn.Module):
    """Multi-head self-attention with ``q``/``kv``/``proj`` Linears (FAN Sec. 3, "token mixing")."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise InvalidArgumentError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False, out_scale: torch.Tensor | None = None):
        """x (B, N, C) -> (B, N, C); with ``return_attention`` also the maps (B, h, N, N) via the explicit path.

        ``out_scale`` (C,) multiplies the output; it is folded into the projection (the block's LayerScale γ1 costs
        no extra pass over the tokens).
        """
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).view(B, N, h, C // h).transpose(1, 2)  # (B, h, N, d), a strided view: SDPA takes it as is
        k, v = self.kv(x).view(B, N, 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, N, d)
        attn = None
        if return_attention:
            x, attn = explicit_attention(q, k, v, self.attn_drop)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C); a view for SDPA's output layout
        weight, bias = self.proj.weight, self.proj.bias
        if out_scale is not None:
            weight, bias = weight * out_scale[:, None], bias * out_scale
        x = self.proj_drop(F.linear(x, weight, bias))
        return (x, attn) if return_attention else x
