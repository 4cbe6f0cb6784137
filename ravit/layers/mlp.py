"""FAN's MLP: fc1 → h + γ·DWConv(h) → fc2 (``DWConvMlp``), optionally followed by squeeze-excite (the SE-MLP ablation).

FAN (arXiv 2204.12451) Sec. 3 and the official ``Mlp``/``SEMlp``/swin ``FANMlp``. Quirks kept on purpose:
the GELU after fc1 is never applied (the only non-linearities are inside the DWConv), and dropout acts on the DWConv
branch before the residual. ``dwconv_residual=False`` gives FAN-Swin's variant, γ·DWConv(h) with no residual.
timm has no MLP with a depthwise conv on the token grid, so ``DWConvMlp`` is ravit's; the SE is timm's.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from timm.layers import make_divisible
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn

from .cpu_inference import Linear, linear
from .dwconv import DWConv, map_to_tokens, tokens_to_map

__all__ = ["DWConvMlp", "squeeze_excite"]


def squeeze_excite(dim: int) -> nn.Module:
    """The SE of FAN's SE-MLP (Table 6 ablation) as timm's EfficientNet ``SqueezeExcite``: avg-pool, 1×1 conv
    C → C/4 (rounded half up, as the official ``make_divisible(·, 1)``), ReLU, 1×1 conv back, sigmoid gate; keys
    ``conv_reduce`` / ``conv_expand`` as released."""
    return SqueezeExcite(dim, rd_ratio=0.25, rd_round_fn=partial(make_divisible, divisor=1))


class DWConvMlp(nn.Module):
    """fc1 (C→hidden) → h + γ ⊙ DWConv(h) → fc2 (hidden→C) [→ ``se_layer`` on the token grid]; ``forward(x, hw)``
    on (B, N, C) tokens. ``se_layer`` (e.g. ``squeeze_excite``) gives the official ``SEMlp``."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 drop: float = 0.0, dwconv_residual: bool = True, se_layer: Callable[[int], nn.Module] | None = None):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.gamma = nn.Parameter(torch.ones(hidden_features))
        self.fc2 = Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)
        self.dwconv_residual = dwconv_residual
        self.se = se_layer(out_features) if se_layer is not None else None

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h = self.fc1(x)  # (B, N, hidden)
        if self.dwconv_residual and not (self.training and self.drop.p > 0):  # no dropout between: add inside DWConv
            y = self.dwconv(h, hw, out_scale=self.gamma, residual=h)  # h + γ ⊙ DWConv(h), γ folded into the conv
        else:
            y = self.drop(self.dwconv(h, hw, out_scale=self.gamma))
            y = y + h if self.dwconv_residual else y
        x = self.drop(self.fc2(y))  # (B, N, out)
        if self.se is not None:
            x = map_to_tokens(self.se(tokens_to_map(x.contiguous(), hw)))
        return x

    @torch.jit.ignore
    def fusable(self) -> bool:
        """Whether :meth:`fused_forward` computes this module's function (no SE; the DWConv folds)."""
        return self.se is None and self.dwconv.fusable()

    @torch.jit.ignore
    def fused_forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """``forward(x, hw)`` on the fused CPU path, the caller having checked it (``fast_inference``, ``fusable``)
        and that nothing hooks this module: (B, N, C) -> (B, N, out)."""
        h = linear(x, self.fc1.weight, self.fc1.bias)  # (B, N, hidden)
        y = self.dwconv.fused_forward(h, hw, self.gamma, h if self.dwconv_residual else None)
        return linear(y, self.fc2.weight, self.fc2.bias)  # (B, N, out)
