"""Token mixing: multi-head self-attention over tokens, the first half of a FAN block.

FAN (Zhou et al., ICML 2022, arXiv 2204.12451) Sec. 3: standard MHSA with separate ``q`` and ``kv`` projections (the
official key names; timm's ``Attention`` fuses them into ``qkv``). As in timm, ``fused_attn`` picks
``F.scaled_dot_product_attention`` or the explicit path, whose probabilities pass through ``attn_drop`` (where hooks
record attention maps); both give the same output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn
from torch import nn

from ravit.errors import InvalidArgumentError

from .cpu_inference import Linear, fast_inference, linear

__all__ = ["TokenMixing"]


def _heads(q: torch.Tensor, kv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q (B, N, C) and kv (B, N, 2C) projections as per-head (B, h, N, d) views (SDPA takes them as they are)."""
    B, N, C = q.shape
    k, v = kv.view(B, N, 2, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    return q.view(B, N, num_heads, C // num_heads).transpose(1, 2), k, v


class TokenMixing(nn.Module):
    """Multi-head self-attention with ``q``/``kv``/``proj`` Linears (FAN Sec. 3, "token mixing")."""

    __constants__ = ["fused_attn"]  # TorchScript compiles only the chosen attention path

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise InvalidArgumentError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn()
        self.q = Linear(dim, dim, bias=qkv_bias)
        self.kv = Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, out_scale: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C).

        ``out_scale`` (C,) multiplies the output (the block's LayerScale γ1) at no extra pass over the tokens: folded
        into the projection, or with ``residual`` (B, N, C) joined to the skip connection, ``residual + output``.
        """
        B, N, C = x.shape
        q, k, v = _heads(self.q(x), self.kv(x), self.num_heads)  # each (B, h, N, d)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N); scale on q first, as the official code
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C); a view for SDPA's output layout
        weight, bias = self.proj.weight, self.proj.bias
        fast = not torch.jit.is_scripting() and fast_inference(x, self.training)
        if out_scale is not None and (fast or residual is None):  # folded into the projection: no extra pass
            weight, bias = weight * out_scale[:, None], bias * out_scale
        if fast:  # eval: no dropout; the skip connection joins the matmul's output
            return linear(x, weight, bias, residual)
        x = self.proj_drop(F.linear(x, weight, bias))  # (B, N, C)
        if residual is None:
            return x
        # the LayerScale joins the skip connection: one multiply-add pass instead of two folds and an add
        return residual + x if out_scale is None else torch.addcmul(residual, x, out_scale)

    @torch.jit.ignore
    def fused_forward(self, x: torch.Tensor, out_scale: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``forward(x, out_scale, residual)`` on the fused CPU path with SDPA, the caller having checked both
        (``fast_inference``, ``fused_attn``) and that nothing hooks this module: (B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        q, k, v = _heads(linear(x, self.q.weight, self.q.bias), linear(x, self.kv.weight, self.kv.bias), self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return linear(x, self.proj.weight * out_scale[:, None], self.proj.bias * out_scale, residual)
