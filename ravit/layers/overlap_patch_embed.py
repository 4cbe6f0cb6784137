"""Overlapping patch merging between FAN blocks whose widths differ (official ``OverlapPatchEmbed``, used by FAN's
Hybrid-XL; FAN arXiv 2204.12451, as released): 3×3 conv stride 2 on the token grid, then LayerNorm (eps 1e-5).
"""

from __future__ import annotations

import torch
from torch import nn

from .dwconv import tokens_to_map

__all__ = ["OverlapPatchEmbed"]


class OverlapPatchEmbed(nn.Module):
    """``forward(x, hw)``: tokens (B, H·W, in_chans) -> (tokens (B, H'·W', embed_dim), (H', W')), H' = ⌈H/stride⌉."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 3, stride: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(tokens_to_map(x.contiguous(), hw))  # (B, C', H', W')
        return self.norm(x.flatten(2).transpose(1, 2)), (x.shape[2], x.shape[3])
