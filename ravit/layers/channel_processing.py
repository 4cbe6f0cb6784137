"""Channel processing: FAN's "efficient channel attention" (ECA), the second half of a FAN block.

FAN (Zhou et al., ICML 2022, arXiv 2204.12451) Sec. 3.2, Eq. 7 as released: per head, a per-channel gate
g_c = τ_h · sigmoid(Σ_n softmax_N(W_q z)[n, c] · mean_{c' in head} softmax_N(z)[n, c']) multiplies
v = LN_v(DWConvMlp(z)). There is no key/value projection and no output projection; LN_v has eps 1e-5.
"""

from __future__ import annotations

import torch
from torch import nn

from ravit.errors import InvalidArgumentError

from . import cpu_kernels
from .cpu_inference import Linear, fast_inference, layer_norm, linear
from .mlp import DWConvMlp

__all__ = ["ChannelProcessing", "channel_attention_gate"]


def channel_attention_gate(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel gate of ECA; q, k (B, N, C), temperature (h, 1, 1) -> gate (B, 1, C).

    q's softmax over tokens is taken per channel; k's per channel then averaged over the head's channels (the token
    "prototype"); their inner product over tokens lies in [0, 1], the gate is τ·sigmoid of it.
    """
    B, N, C = q.shape
    h = temperature.shape[0]
    d = C // h
    q = q.softmax(dim=1)  # (B, N, C)
    k = k.softmax(dim=1).view(B, N, h, d).mean(-1)  # (B, N, h)
    # One bmm over all head pairs, then keep each head with its own channels (the block diagonal): no copy of q.
    attn = torch.bmm(k.transpose(1, 2), q).view(B, h, h, d).diagonal(dim1=1, dim2=2)  # (B, d, h)
    return (attn.sigmoid() * temperature.view(1, 1, h)).transpose(1, 2).reshape(B, 1, C)


class ChannelProcessing(nn.Module):
    """FAN's channel attention; ``forward(x, hw)`` with x (B, N, C) on an (H, W) token grid returns (B, N, C)."""

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, dwconv_residual: bool = True):
        super().__init__()
        if dim % num_heads:
            raise InvalidArgumentError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.mlp_v = DWConvMlp(dim, int(dim * mlp_ratio), drop=drop, dwconv_residual=dwconv_residual)
        self.norm_v = nn.LayerNorm(dim)  # default eps 1e-5, as released (the rest of FAN uses 1e-6)
        self.q = Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], out_scale: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C) on an (H, W) grid -> (B, N, C).

        ``out_scale`` (C,) multiplies the output (folded into the gate); with ``residual`` the result is
        ``residual + output`` in one pass. Both serve the block's LayerScale and skip connection.
        """
        if not torch.jit.is_scripting():  # noqa: SIM102 (nested: TorchScript then compiles only the reference path)
            if fast_inference(x, self.training):
                return self.inference_forward(x, hw, out_scale, residual)
        gate = self.attn_drop(channel_attention_gate(self.q(x), x, self.temperature))  # (B, 1, C)
        v = self.norm_v(self.mlp_v(x, hw))  # (B, N, C)
        scale = gate if out_scale is None else gate * out_scale
        return v * scale if residual is None else torch.addcmul(residual, v, scale)

    @torch.jit.ignore
    def inference_forward(self, x: torch.Tensor, hw: tuple[int, int], out_scale: torch.Tensor | None,
                          residual: torch.Tensor | None) -> torch.Tensor:
        """:meth:`forward` where no gradient flows (``fast_inference``), through the submodules (so their hooks fire):
        the gate from :meth:`inference_gate`, the skip connection added into v's own buffer."""
        scale = self.inference_gate(self.q(x), x, out_scale)  # (B, 1, C)
        v = self.norm_v(self.mlp_v(x, hw))  # (B, N, C), this call's own buffer
        return v * scale if residual is None else torch.addcmul(residual, v, scale, out=v)

    @torch.jit.ignore
    def inference_gate(self, q: torch.Tensor, x: torch.Tensor, out_scale: torch.Tensor | None) -> torch.Tensor:
        """The gate times ``out_scale`` (B, 1, C) of q = ``self.q(x)``, both (B, N, C), where no gradient flows
        (``fast_inference``): one op of ravit's kernels where they are built (``cpu_kernels``), else the reference."""
        if cpu_kernels.available() and x.dtype == q.dtype == torch.float32:
            return cpu_kernels.channel_gate(q, x, self.temperature, out_scale)
        gate = channel_attention_gate(q, x, self.temperature)  # (B, 1, C)
        return gate if out_scale is None else gate * out_scale

    @torch.jit.ignore
    def fusable(self) -> bool:
        """Whether :meth:`fused_forward` computes this module's function (a LayerNorm on v; the MLP folds)."""
        return type(self.norm_v) is nn.LayerNorm and self.mlp_v.fusable()

    @torch.jit.ignore
    def fused_forward(self, x: torch.Tensor, hw: tuple[int, int], out_scale: torch.Tensor, residual: torch.Tensor
                      ) -> torch.Tensor:
        """``forward(x, hw, out_scale, residual)`` on the fused CPU path, the caller having checked it
        (``fast_inference``, ``fusable``) and that nothing hooks this module: (B, N, C) -> (B, N, C)."""
        scale = self.inference_gate(linear(x, self.q.weight, self.q.bias), x, out_scale)  # (B, 1, C)
        v = layer_norm(self.mlp_v.fused_forward(x, hw), self.norm_v)  # (B, N, C), this call's own buffer
        return torch.addcmul(residual, v, scale, out=v)
