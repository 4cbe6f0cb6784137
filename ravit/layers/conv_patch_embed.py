"""Convolutional patch embedding: XCiT's (El-Nouby et al. 2021, Sec. 3; ``timm.models.xcit.ConvPatchEmbed``) plus the
p4 stem that FAN (arXiv 2204.12451, as released in NVlabs/FAN ee1b7df) adds.

Stages of [3×3 conv stride 2 (no bias) → BatchNorm] with GELU between stages: p16 = 3 → C/8 → C/4 → C/2 → C,
p8 = 3 → C/4 → C/2 → C (both timm's), p4 = 3 → C/4 → C. Keys ``proj.{0,2,4,6}.{0 (conv), 1 (bn)}`` as released.
"""

from __future__ import annotations

import torch
from timm.layers import register_notrace_module, to_2tuple
from timm.models.xcit import ConvPatchEmbed as XCiTConvPatchEmbed
from timm.models.xcit import conv3x3
from torch import nn

from ravit.errors import InvalidArgumentError

from .cpu_inference import conv_act, fast_inference
from .dwconv import map_to_tokens

__all__ = ["ConvPatchEmbed"]


@register_notrace_module  # an FX leaf: traced graphs call it, so eager and FX take the same (fused or reference) path
class ConvPatchEmbed(XCiTConvPatchEmbed):
    """Image (B, in_chans, H, W) -> tokens (B, H/p · W/p, embed_dim) and the grid (H/p, W/p); p in {4, 8, 16}."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, act_layer: type[nn.Module] = nn.GELU):
        if patch_size not in (4, 8, 16):
            raise InvalidArgumentError(f"ConvPatchEmbed supports patch_size 4, 8 or 16, got {patch_size}")
        img_size = to_2tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise InvalidArgumentError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        super().__init__(img_size, 8 if patch_size == 4 else patch_size, in_chans, embed_dim, act_layer)
        if patch_size == 4:  # XCiT builds p8 and p16 only; FAN's p4 is the p8 stem without its middle stage
            self.proj = nn.Sequential(conv3x3(in_chans, embed_dim // 4, 2), act_layer(),
                                      conv3x3(embed_dim // 4, embed_dim, 2))
            self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, in_chans, H, W) -> tokens (B, N, C), grid (H/p, W/p)."""
        if not torch.jit.is_scripting():  # noqa: SIM102 (nested: TorchScript then compiles only the reference path)
            if fast_inference(x, self.training) and self._fusable():
                return self._forward_fused(x)
        x = self.proj(x)  # (B, C, H/p, W/p); timm's forward, spelled out because TorchScript has no super()
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])

    @torch.jit.ignore
    def _fusable(self) -> bool:
        """Every stage conv → BatchNorm (running statistics), with erf GELU between stages."""
        stages = [m for i, m in enumerate(self.proj) if i % 2 == 0]
        acts = [m for i, m in enumerate(self.proj) if i % 2 == 1]
        return (all(isinstance(m, nn.Sequential) and m[1].track_running_stats for m in stages)
                and all(isinstance(a, nn.GELU) and a.approximate == "none" for a in acts))

    @torch.jit.ignore
    def _forward_fused(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Inference: each stage one channels-last oneDNN conv with its BatchNorm folded and the following GELU as
        post-op (``cpu_inference``): one fresh map per stage instead of three. The images go to the first conv as
        they are (the op copies them to channels-last itself, which spares the heap's trim-and-refault cycle at
        batch 8)."""
        last = len(self.proj) - 1
        for i in range(0, len(self.proj), 2):
            conv, bn = self.proj[i]
            x = conv_act(x, conv, bn, act="gelu" if i < last else "none")  # (B, C_i, H_i, W_i), channels-last
        return map_to_tokens(x), (x.shape[2], x.shape[3])  # (B, N, C): a view, contiguous
