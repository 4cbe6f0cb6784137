"""FAN's MLPs: fc1 → h + γ·DWConv(h) → fc2 (``DWConvMlp``), and the SE-MLP ablation (``SEMlp``).

FAN (arXiv 2204.12451) Sec. 3 and the official ``Mlp``/``SEMlp``/swin ``FANMlp``. Quirks kept on purpose:
the GELU after fc1 is never applied (the only non-linearities are inside the DWConv), and dropout acts on the DWConv
branch before the residual. ``dwconv_residual=False`` gives FAN-Swin's variant, γ·DWConv(h) with no residual.
"""

from __future__ import annotations

import torch
from torch import nn

from .dwconv import DWConv, map_to_tokens, tokens_to_map

__all__ = ["DWConvMlp", "SEMlp", "SqueezeExcite"]


class DWConvMlp(nn.Module):
    """fc1 (C→hidden) → h + γ ⊙ DWConv(h) → fc2 (hidden→C); ``forward(x, hw)`` on (B, N, C) tokens."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 drop: float = 0.0, dwconv_residual: bool = True):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.gamma = nn.Parameter(torch.ones(hidden_features))
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop = nn.Dropout(drop)
        self.dwconv_residual = dwconv_residual

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h = self.fc1(x)  # (B, N, hidden)
        y = self.drop(self.dwconv(h, hw, out_scale=self.gamma))  # γ ⊙ DWConv(h), γ folded into the conv
        return self.drop(self.fc2(y + h if self.dwconv_residual else y))  # (B, N, out)


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation on a (B, C, H, W) map: avg-pool, 1×1 conv C→C/4, ReLU, 1×1 conv back, sigmoid gate."""

    def __init__(self, dim: int, se_ratio: float = 0.25):
        super().__init__()
        reduced = int(dim * se_ratio + 0.5)  # the official make_divisible(v, divisor=1) rounds half up
        self.conv_reduce = nn.Conv2d(dim, reduced, 1)
        self.act = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * self.conv_expand(self.act(self.conv_reduce(s))).sigmoid()


class SEMlp(nn.Module):
    """FAN's SE ablation (official ``SEMlp``): ``DWConvMlp`` followed by Squeeze-Excite on the token grid."""

    def __init__(self, in_features: int, hidden_features: int | None = None, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.gamma = nn.Parameter(torch.ones(hidden_features))
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)
        self.se = SqueezeExcite(in_features)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h = self.fc1(x)  # (B, N, hidden)
        h = self.drop(self.dwconv(h, hw, out_scale=self.gamma)) + h
        x = self.drop(self.fc2(h))  # (B, N, C)
        return map_to_tokens(self.se(tokens_to_map(x.contiguous(), hw)))
