"""Fourier positional encoding (XCiT, El-Nouby et al. 2021, Sec. 3), as used by FAN (arXiv 2204.12451).

For a grid (H, W): per axis, positions i/(H+ε)·2π for i = 1..H, divided by 10000^{2⌊k/2⌋/D} (D = ``hidden_dim``),
sin on even and cos on odd k; (y, x) features concatenated (2D channels), then a 1×1 conv to ``dim`` (XCiT Sec. 3).
Computed for any grid, so models run at any input size divisible by their stride.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PositionalEncodingFourier", "fourier_features"]


def fourier_features(hw: tuple[int, int], hidden_dim: int = 32, temperature: float = 10000.0,
                     device: torch.device | None = None) -> torch.Tensor:
    """Sin/cos features of an (H, W) grid: (1, 2·hidden_dim, H, W), float32."""
    H, W = hw
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, H + 1, dtype=torch.float32, device=device) / (H + eps) * scale  # (H,)
    x = torch.arange(1, W + 1, dtype=torch.float32, device=device) / (W + eps) * scale  # (W,)
    k = torch.arange(hidden_dim, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / hidden_dim)  # (D,)

    def encode(p: torch.Tensor) -> torch.Tensor:  # (L,) -> (L, D) with interleaved sin/cos
        p = p[:, None] / dim_t
        return torch.stack([p[:, 0::2].sin(), p[:, 1::2].cos()], dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(H, W, hidden_dim)
    pos_x = encode(x)[None, :, :].expand(H, W, hidden_dim)
    return torch.cat([pos_y, pos_x], dim=2).permute(2, 0, 1).unsqueeze(0)  # (1, 2D, H, W)


class PositionalEncodingFourier(nn.Module):
    """``forward(hw)`` -> positional tokens (1, H·W, dim), added to the patch tokens (key ``token_projection``)."""

    def __init__(self, hidden_dim: int = 32, dim: int = 768, temperature: float = 10000.0):
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.hidden_dim = hidden_dim
        self.temperature = temperature

    def forward(self, hw: tuple[int, int]) -> torch.Tensor:
        w = self.token_projection.weight
        feats = fourier_features(hw, self.hidden_dim, self.temperature, device=w.device)  # (1, 2D, H, W)
        feats = feats.flatten(2).transpose(1, 2).to(w.dtype)  # (1, N, 2D)
        return F.linear(feats, w.flatten(1), self.token_projection.bias)  # (1, N, dim): the 1×1 conv as a Linear
