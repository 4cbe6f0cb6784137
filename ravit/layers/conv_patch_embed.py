"""Convolutional patch embedding (XCiT, El-Nouby et al. 2021, Sec. 3; FAN adds the p4 option).

Stages of [3×3 conv stride 2 (no bias) → BatchNorm] with GELU between stages: p16 = 3 → C/8 → C/4 → C/2 → C,
p8 = 3 → C/4 → C/2 → C, p4 = 3 → C/4 → C (NVlabs/FAN ee1b7df). Keys ``proj.{0,2,4,6}.{0 (conv), 1 (bn)}`` as released.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ravit.errors import InvalidArgumentError

__all__ = ["ConvPatchEmbed", "conv_bn", "fused_conv_bn"]

_STAGE_DIVISORS = {16: (8, 4, 2, 1), 8: (4, 2, 1), 4: (4, 1)}


def conv_bn(in_chs: int, out_chs: int, stride: int = 2) -> nn.Sequential:
    """3×3 conv without bias followed by BatchNorm2d (keys ``0``, ``1``)."""
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out_chs))


def fused_conv_bn(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``seq(x)`` for a ``conv_bn`` pair; in eval mode the BatchNorm is folded into the conv for this call only.

    Folding saves a full pass over the (large, early) feature map; the weights are recomputed per call, so nothing is
    cached on the module and loading new weights can never leave a stale copy.
    """
    conv, bn = seq[0], seq[1]
    if bn.training or not bn.track_running_stats:
        return bn(conv(x))
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C,)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class ConvPatchEmbed(nn.Module):
    """Image (B, in_chans, H, W) -> tokens (B, H/p · W/p, embed_dim) and the grid (H/p, W/p); p in {4, 8, 16}."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        if patch_size not in _STAGE_DIVISORS:
            raise InvalidArgumentError(f"ConvPatchEmbed supports patch_size 4, 8 or 16, got {patch_size}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise InvalidArgumentError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        chs = in_chans
        for i, div in enumerate(_STAGE_DIVISORS[patch_size]):
            if i:
                layers.append(act_layer())
            layers.append(conv_bn(chs, embed_dim // div))
            chs = embed_dim // div
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN convs run ~25% faster on NHWC than NCHW
        for layer in self.proj:
            if isinstance(layer, nn.Sequential):
                x = fused_conv_bn(layer, x)
            else:  # the activation on the NHWC view: elementwise ops are slower on channels-last NCHW strides
                x = layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        H, W = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (H, W)  # (B, N, C), (H, W)
