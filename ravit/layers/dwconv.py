"""Depthwise-conv token mixer inside FAN's MLP: 3×3 DWConv → GELU → BatchNorm → 3×3 DWConv on the token grid.

FAN (arXiv 2204.12451) Sec. 3 / official ``DWConv``: the MLP of a FAN block sees the tokens as an (H, W) map. Key names
``conv1``, ``bn``, ``conv2`` follow the official checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import nn

from ravit.errors import InvalidArgumentError

from . import cpu_kernels
from .cpu_inference import bn_scale_shift, conv_act, fast_inference

__all__ = ["DWConv", "tokens_to_map", "map_to_tokens"]


@register_notrace_function  # reason: checks the token count against the grid (FX cannot branch on traced shapes)
def tokens_to_map(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) tokens -> (B, C, H, W) map, channels-last in memory (a view, no copy)."""
    B, N, C = x.shape
    H, W = hw
    if N != H * W:
        raise InvalidArgumentError(f"{N} tokens do not form a {H}×{W} grid")
    return x.view(B, H, W, C).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) map -> (B, H·W, C) tokens."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


class DWConv(nn.Module):
    """Depthwise 3×3 conv, GELU, BatchNorm2d, depthwise 3×3 conv; ``forward(x, hw)`` on (B, N, C) tokens.

    ``out_scale`` (C,) multiplies the output at no extra pass: joined to the skip connection when there is one
    (one multiply-add), else folded into ``conv2``'s weight and bias. The BatchNorm is not folded into ``conv2``:
    ``conv2`` zero-pads BN's *output*, so BN's shift would need a per-position border correction, which measured
    slower than one BatchNorm pass. Off the fused CPU path (GPUs, autograd, export) every op is a launch, so this path
    keeps their number low: 27 aten ops per FAN-T block where the folds and a hand-written BatchNorm took 36 (the
    released code: 37).
    """

    def __init__(self, dim: int, kernel_size: int = 3, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], out_scale: torch.Tensor | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, C) tokens on an (H, W) grid -> (B, N, C); with ``residual`` (B, N, C) the result is
        ``DWConv(x)·out_scale + residual``, which the fused inference path accumulates into ``residual``'s own memory
        (pass a buffer this call may overwrite, as ``DWConvMlp`` does with its fc1 output)."""
        if not torch.jit.is_scripting():  # noqa: SIM102 (nested: TorchScript then compiles only the reference path)
            if fast_inference(x, self.training) and self.fusable():
                return self.fused_forward(x, hw, out_scale, residual)
        # Convs and BatchNorm see (B, C, H, W) maps with channels-last strides (oneDNN's fast depthwise path); GELU
        # runs on the same memory viewed as contiguous (B, N, C) tokens.
        x = map_to_tokens(self.conv1(tokens_to_map(x.contiguous(), hw)))  # (B, N, C)
        x = self.bn(tokens_to_map(self.act(x), hw))  # one kernel, where BN as a multiply-add costs six launches
        conv = self.conv2
        if residual is not None:  # the LayerScale joins the skip connection: one multiply-add pass, two fewer ops
            x = map_to_tokens(conv(x))  # (B, N, C)
            return x + residual if out_scale is None else torch.addcmul(residual, x, out_scale)
        weight, bias = conv.weight, conv.bias
        if out_scale is not None:  # no skip connection to join: folded into the conv, no extra pass
            weight = weight * out_scale.view(-1, 1, 1, 1)
            bias = bias * out_scale if bias is not None else None
        return map_to_tokens(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups))

    @torch.jit.ignore
    def fusable(self) -> bool:
        """oneDNN's GELU post-op is the erf GELU; folding needs BatchNorm's running statistics."""
        return isinstance(self.act, nn.GELU) and self.act.approximate == "none" and self.bn.track_running_stats

    @torch.jit.ignore
    def fused_forward(self, x: torch.Tensor, hw: tuple[int, int], out_scale: torch.Tensor | None,
                      residual: torch.Tensor | None) -> torch.Tensor:
        """Inference: ravit's one-pass kernel where it is built and applies (``cpu_kernels``), else conv1 with GELU as
        its post-op, BatchNorm in place, conv2 with ``out_scale`` folded and the residual added by the conv itself
        into the residual's memory (``cpu_inference``); one fresh (B, N, C) buffer instead of five (two when the
        residual is strided or of another dtype, then added afterwards). Accumulating into a warm buffer measured 1-2%
        faster for a whole FAN-T than adding into conv2's fresh output, and than the out-of-place fused conv + add."""
        if cpu_kernels.available() and cpu_kernels.supports_chain(x, self.conv1, self.conv2):
            return cpu_kernels.dwconv_chain(x, hw, self.conv1, self.bn, self.conv2, out_scale, residual)
        x = conv_act(tokens_to_map(x.contiguous(), hw), self.conv1, act="gelu")  # (B, C, H, W), channels-last
        scale, shift = bn_scale_shift(self.bn)
        x = torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1), out=x)
        if residual is None or not residual.is_contiguous() or residual.dtype != x.dtype:
            x = map_to_tokens(conv_act(x, self.conv2, out_scale=out_scale))  # (B, N, C), a view of fresh memory
            return x if residual is None else x.add_(residual)
        conv_act(x, self.conv2, out_scale=out_scale, accumulate=tokens_to_map(residual, hw))
        return residual  # (B, N, C)
