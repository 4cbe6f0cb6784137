"""Class attention: the two XCiT-style blocks that pool FAN's patch tokens into the class token.

CaiT (Touvron et al., 2021) Sec. 3 introduced class attention; FAN (arXiv 2204.12451) uses XCiT's block verbatim,
quirks included (official issue #19): patch tokens also receive +γ1·LN1(x); with ``tokens_norm`` LN2 is
applied to every token and the residual of the MLP starts from the *normalised* tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from ravit.errors import InvalidArgumentError

from .token_mixing import explicit_attention

__all__ = ["ClassAttention", "ClassAttentionBlock"]


class ClassAttention(nn.Module):
    """Attention with the class token (index 0) as the only query; keys/values from every token. Keys q, k, v, proj."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise InvalidArgumentError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """x (B, 1+N, C) -> class token (B, 1, C); with ``return_attention`` also the map (B, h, 1, 1+N)."""
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x[:, :1]).view(B, 1, h, C // h).transpose(1, 2)  # (B, h, 1, d)
        k = self.k(x).view(B, N, h, C // h).transpose(1, 2)  # (B, h, N, d)
        v = self.v(x).view(B, N, h, C // h).transpose(1, 2)
        attn = None
        if return_attention:
            x_cls, attn = explicit_attention(q, k, v, self.attn_drop)
        else:
            x_cls = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x_cls = self.proj_drop(self.proj(x_cls.transpose(1, 2).reshape(B, 1, C)))  # (B, 1, C)
        return (x_cls, attn) if return_attention else x_cls


class ClassAttentionBlock(nn.Module):
    """XCiT class-attention block as used by FAN; operates on (B, 1+N, C) with the class token first."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm, eta: float = 1.0, tokens_norm: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ClassAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.tokens_norm = tokens_norm

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """x (B, 1+N, C) -> (B, 1+N, C); with ``return_attention`` also the class-attention map (B, h, 1, 1+N)."""
        u = self.norm1(x)
        if return_attention:
            x_cls, attn = self.attn(u, return_attention=True)
        else:
            x_cls, attn = self.attn(u), None
        x = x + self.drop_path(self.gamma1 * torch.cat([x_cls, u[:, 1:]], dim=1))  # patch tokens get +γ1·LN1(x) too
        x = self.norm2(x) if self.tokens_norm else torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)
        cls = self.gamma2 * self.mlp(x[:, :1])  # (B, 1, C)
        x = x + self.drop_path(torch.cat([cls, x[:, 1:]], dim=1))  # residual from the normalised tokens: patches x2
        return (x, attn) if return_attention else x
