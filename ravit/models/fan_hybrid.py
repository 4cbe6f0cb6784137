"""FAN-Hybrid: the first ConvNeXt stages as a convolutional stem, then FAN blocks and class attention.

FAN (Zhou et al., "Understanding The Robustness in Vision Transformers", ICML 2022, arXiv 2204.12451) Sec. 4
(FAN-Hybrid; FAN Sec. 4): ConvNeXt's 4×4 patchify stem and its first two stages (depths [3, 3], [3, 5] or [3, 7] at
128/256 channels; Liu et al., arXiv 2201.03545) produce a stride-8 map, a 2×2 stride-2 convolution projects it to
tokens (total stride 16, despite the "p4" in the names), and the FAN-ViT trunk of ``ravit.models.fan.FAN`` follows.

The stem is composed from timm's public ConvNeXt pieces (``ConvNeXtStage``, ``LayerNorm2d``), not forked, so its keys
are the official ``patch_embed.backbone.stem.{0,1}.*`` / ``patch_embed.backbone.stages.{i}.*`` (no head, no
``norm_pre``: the official stem has neither). ``features_only`` gives the stem stages (strides 4 and 8) and the FAN
blocks (stride 16, 32 after Hybrid-XL's width change) as one multi-scale pyramid.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import LayerNorm2d, trunc_normal_
from timm.models import generate_default_cfgs, register_model, register_model_deprecations
from timm.models._features import feature_take_indices
from timm.models.convnext import ConvNeXtStage
from torch import nn

from ravit.errors import InvalidArgumentError

from ._pretrained import LICENSE, RELEASE_URL, build_fan, fan_cfg
from .fan import FAN
from .fan import checkpoint_filter_fn as _fan_checkpoint_filter_fn

__all__ = ["ConvNeXtStem", "FANHybrid", "HybridEmbed", "UnbiasedLayerNorm2d", "checkpoint_filter_fn"]


class UnbiasedLayerNorm2d(LayerNorm2d):
    """LayerNorm over the channels of (B, C, H, W) using the *unbiased* channel variance (official-weights quirk).

    The official stem is timm 0.5.4's ConvNeXt, whose ``LayerNorm2d`` takes ``torch.var_mean`` (unbiased) whenever
    its input is not contiguous, which is the case for every norm in the stages (depthwise-conv and residual outputs
    stay channels-last after the stem's permuted norm); the stem's own norm sees a contiguous map and is a plain
    LayerNorm. Kept so released weights give the released outputs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=1, keepdim=True)  # (B, 1, H, W), unbiased
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ConvNeXtStem(nn.Module):
    """ConvNeXt's patchify stem and first stages (timm's ``ConvNeXtStage``); (B, 3, H, W) -> (B, dims[-1], H/s, W/s).

    Stage 0 keeps the stem's resolution, each later stage halves it (LayerNorm2d + 2×2 stride-2 conv, then blocks);
    s = ``stem_stride`` · 2^(len(depths) - 1). Blocks use 1×1-conv MLPs as the official stem does (same key shapes),
    LayerScale starts at 1e-6 and there is no stochastic depth (the official stem has none). The norms inside the
    stages are ``UnbiasedLayerNorm2d`` (see there).
    """

    def __init__(self, in_chans: int = 3, depths: tuple[int, ...] = (3, 3), dims: tuple[int, ...] = (128, 256),
                 stem_stride: int = 4):
        super().__init__()
        if len(depths) != len(dims) or not depths:
            raise InvalidArgumentError(f"need one ConvNeXt width per stage, got depths={depths} and dims={dims}")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], stem_stride, stride=stem_stride),
                                  LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.Sequential(*[
            ConvNeXtStage(dims[max(i - 1, 0)], dims[i], stride=2 if i else 1, depth=depth, ls_init_value=1e-6,
                          conv_mlp=True, norm_layer=partial(UnbiasedLayerNorm2d, eps=1e-6))
            for i, depth in enumerate(depths)])
        self.stride = stem_stride * 2 ** (len(depths) - 1)
        for module in self.modules():  # ConvNeXt's initialisation: trunc-normal(0.02) convs, zero biases
            if isinstance(module, nn.Conv2d):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward_stages(self, x: torch.Tensor, num_stages: int | None = None) -> list[torch.Tensor]:
        """Output map of each of the first ``num_stages`` stages (all by default), (B, dims[i], H_i, W_i)."""
        x = self.stem(x)
        maps = []
        for stage in self.stages[:num_stages]:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class HybridEmbed(nn.Module):
    """ConvNeXt stem + a ``proj_size``×``proj_size`` stride-``proj_size`` projection to tokens (FAN-Hybrid's embed).

    Called like every FAN patch embedding (``img_size``, ``patch_size``, ``in_chans``, ``embed_dim``) where
    ``patch_size`` is the total stride; ``forward(x)`` -> (tokens (B, N, embed_dim), (H, W)).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 384, depths: tuple[int, ...] = (3, 3), dims: tuple[int, ...] = (128, 256),
                 proj_size: int = 2):
        super().__init__()
        self.backbone = ConvNeXtStem(in_chans, depths, dims)
        if patch_size != self.backbone.stride * proj_size:
            raise InvalidArgumentError(f"patch_size {patch_size} must equal the stem's stride {self.backbone.stride} × "
                             f"proj_size {proj_size}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise InvalidArgumentError(f"img_size {img_size} must be divisible by the stride {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.proj = nn.Conv2d(dims[-1], embed_dim, proj_size, stride=proj_size)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Stem output map (B, dims[-1], h, w) -> tokens (B, N, embed_dim) on an (H, W) grid."""
        x = self.proj(x)  # (B, C, H, W)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        return self.project(self.backbone(x))


class FANHybrid(FAN):
    """FAN with a ConvNeXt stem (FAN-Hybrid, arXiv 2204.12451 Sec. 4); every other argument is ``FAN``'s.

    Args:
        convnext_depths: ConvNeXt blocks per stem stage.
        convnext_dims: width of each stem stage.
        hybrid_patch_size: kernel and stride of the projection from the stem's last map to tokens.

    ``feature_info`` (and so ``forward_intermediates``' indices and ``features_only``) lists the stem stages first,
    then the FAN blocks.
    """

    def __init__(self, convnext_depths: tuple[int, ...] = (3, 3), convnext_dims: tuple[int, ...] = (128, 256),
                 hybrid_patch_size: int = 2, **kwargs):
        for name in ("patch_size", "embed_layer"):
            if name in kwargs:
                raise InvalidArgumentError(
                    f"FAN-Hybrid sets {name} from its ConvNeXt stem; got {name}={kwargs[name]!r}")
        stem_stride = 4
        stride = stem_stride * 2 ** (len(convnext_depths) - 1) * hybrid_patch_size
        embed = partial(HybridEmbed, depths=tuple(convnext_depths), dims=tuple(convnext_dims),
                        proj_size=hybrid_patch_size)
        super().__init__(patch_size=stride, embed_layer=embed, **kwargs)
        self.feature_info = [
            dict(num_chs=dim, reduction=stem_stride * 2 ** i, module=f"patch_embed.backbone.stages.{i}")
            for i, dim in enumerate(convnext_dims)] + self.feature_info

    @property
    def num_stem_stages(self) -> int:
        return len(self.patch_embed.backbone.stages)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Outputs of the stem stages and FAN blocks named by ``indices`` (into ``feature_info``), NCHW or NLC.

        As ``FAN.forward_intermediates``; ``norm`` applies the final LayerNorm to FAN-block outputs only.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise InvalidArgumentError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if return_prefix_tokens:
            raise InvalidArgumentError(
                "FAN blocks carry no prefix tokens; the class token joins after the last FAN block")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        n_stem = self.num_stem_stages
        if norm and any(self.feature_info[i]["num_chs"] != self.num_features for i in take_indices if i >= n_stem):
            raise InvalidArgumentError(
                "norm=True needs intermediates as wide as the final norm; this model changes width")
        x = self._check_input(x)
        maps = self.patch_embed.backbone.forward_stages(x, min(max_index + 1, n_stem) if intermediates_only else None)
        intermediates = [m if output_fmt == "NCHW" else m.flatten(2).transpose(1, 2)  # (B, C, H, W) or (B, N, C)
                         for i, m in enumerate(maps) if i in take_indices]
        if intermediates_only and max_index < n_stem:
            return intermediates
        x, hw = self.patch_embed.project(maps[-1])  # (B, N, C)
        x = self._add_pos_embed(x, hw)
        blocks = self.blocks[: max_index + 1 - n_stem] if stop_early or intermediates_only else self.blocks
        x, fan_intermediates = self._blocks_with_intermediates(x, hw, blocks, take_indices, norm, output_fmt, n_stem)
        intermediates += fan_intermediates
        if intermediates_only:
            return intermediates
        return self.norm(self._class_attention(x)), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the FAN blocks (and class-attention head) after the last index needed; indices into feature_info."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self._prune(max(max_index + 1 - self.num_stem_stages, 0), prune_norm, prune_head)
        return take_indices


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: FANHybrid) -> dict[str, torch.Tensor]:
    """Map an official FAN-Hybrid state dict onto ``FANHybrid``: the stem's keys are already the official ones
    (timm ConvNeXt layout, 1×1-conv MLPs), the trunk maps as FAN-ViT's (``ravit.models.fan.checkpoint_filter_fn``)."""
    return _fan_checkpoint_filter_fn(state_dict, model)


# --- registry -----------------------------------------------------------------------------------------------------
def _cfg(**kwargs) -> dict:
    return fan_cfg(first_conv="patch_embed.backbone.stem.0", classifier="head", **kwargs)


default_cfgs = generate_default_cfgs({
    "fan_tiny_8_p4_hybrid.nv_in1k": _cfg(url=RELEASE_URL + "fan_hybrid_tiny.pth.tar", license=LICENSE),
    "fan_small_12_p4_hybrid.nv_in1k": _cfg(url=RELEASE_URL + "fan_hybrid_small.pth.tar", license=LICENSE),
    "fan_base_16_p4_hybrid.nv_in1k": _cfg(url=RELEASE_URL + "fan_hybrid_base.pth.tar", license=LICENSE),
    "fan_base_16_p4_hybrid.nv_in22k_ft_in1k": _cfg(
        url=RELEASE_URL + "fan_hybrid_base_in22k_1k.pth.tar", license=LICENSE),
    "fan_base_16_p4_hybrid.nv_in22k_ft_in1k_384": _cfg(
        url=RELEASE_URL + "fan_hybrid_base_in22k_1k_384.pth.tar", license=LICENSE, input_size=(3, 384, 384)),
    # ImageNet-22k without fine-tuning: 19167 classes (the winter-2021 ImageNet-21k), inferred from the sizes of the
    # released files next to their 1000-class fine-tunes, not read from a file.
    "fan_base_16_p4_hybrid.nv_in22k": _cfg(
        url=RELEASE_URL + "fan_hybrid_base_in22k.pth.tar", license=LICENSE, num_classes=19167),
    # FAN-L-Hybrid on ImageNet-1k alone was never released (NVlabs/FAN issue #18).
    "fan_large_16_p4_hybrid.nv_in22k_ft_in1k": _cfg(
        url=RELEASE_URL + "fan_hybrid_large_in22k_1k.pth.tar", license=LICENSE),
    "fan_large_16_p4_hybrid.nv_in22k_ft_in1k_384": _cfg(
        url=RELEASE_URL + "fan_hybrid_large_in22k_1k_384.pth.tar", license=LICENSE, input_size=(3, 384, 384)),
    "fan_large_16_p4_hybrid.nv_in22k": _cfg(
        url=RELEASE_URL + "fan_hybrid_large_in22k.pth.tar", license=LICENSE, num_classes=19167),
    "fan_xlarge_16_p4_hybrid": _cfg(),
    "test_fan_hybrid": _cfg(input_size=(3, 64, 64)),
})


def _create_fan_hybrid(variant: str, pretrained: bool = False, **kwargs) -> FANHybrid:
    num_features = len(kwargs.get("convnext_depths", (3, 3))) + kwargs.get("depth", 12)
    out_indices = kwargs.pop("out_indices", (0, 1, num_features - 1))
    return build_fan(FANHybrid, variant, pretrained, checkpoint_filter_fn,
                     feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


_HYBRID = dict(eta=1.0, tokens_norm=True, hybrid_patch_size=2, convnext_dims=(128, 256))


@register_model
def fan_tiny_8_p4_hybrid(pretrained: bool = False, **kwargs) -> FANHybrid:
    """FAN-T-Hybrid: ConvNeXt stem [3, 3], 8 FAN blocks 192 wide with 8 heads; 7.47M parameters."""
    model_args = dict(_HYBRID, convnext_depths=(3, 3), embed_dim=192, depth=8, num_heads=8)
    return _create_fan_hybrid("fan_tiny_8_p4_hybrid", pretrained, **dict(model_args, **kwargs))


@register_model
def fan_small_12_p4_hybrid(pretrained: bool = False, **kwargs) -> FANHybrid:
    """FAN-S-Hybrid: ConvNeXt stem [3, 3], 10 FAN blocks (not 12) 384 wide with 8 heads; 26.12M parameters."""
    model_args = dict(_HYBRID, convnext_depths=(3, 3), embed_dim=384, depth=10, num_heads=8)
    return _create_fan_hybrid("fan_small_12_p4_hybrid", pretrained, **dict(model_args, **kwargs))


@register_model
def fan_base_16_p4_hybrid(pretrained: bool = False, **kwargs) -> FANHybrid:
    """FAN-B-Hybrid: ConvNeXt stem [3, 3], 16 FAN blocks 448 wide with 8 heads; 50.48M parameters."""
    model_args = dict(_HYBRID, convnext_depths=(3, 3), embed_dim=448, depth=16, num_heads=8)
    return _create_fan_hybrid("fan_base_16_p4_hybrid", pretrained, **dict(model_args, **kwargs))


@register_model
def fan_large_16_p4_hybrid(pretrained: bool = False, **kwargs) -> FANHybrid:
    """FAN-L-Hybrid: ConvNeXt stem [3, 5], 22 FAN blocks (not 16) 480 wide with 10 heads, head init ×0.001;
    76.86M parameters."""
    model_args = dict(_HYBRID, convnext_depths=(3, 5), embed_dim=480, depth=22, num_heads=10, head_init_scale=0.001)
    return _create_fan_hybrid("fan_large_16_p4_hybrid", pretrained, **dict(model_args, **kwargs))


@register_model
def fan_xlarge_16_p4_hybrid(pretrained: bool = False, **kwargs) -> FANHybrid:
    """FAN-XL-Hybrid (official name ``fan_Xlarge_16_p4_hybrid``): ConvNeXt stem [3, 7], 20 FAN blocks 528 wide with
    11 heads, an overlapping stride-2 downsample to 768, 3 blocks with 16 heads; 120.41M parameters. No weights."""
    model_args = dict(_HYBRID, convnext_depths=(3, 7), embed_dim=528, depth=23, channel_dims=[528] * 20 + [768] * 3,
                      num_heads=[11] * 20 + [16] * 3)
    return _create_fan_hybrid("fan_xlarge_16_p4_hybrid", pretrained, **dict(model_args, **kwargs))


@register_model
def test_fan_hybrid(pretrained: bool = False, **kwargs) -> FANHybrid:
    """Tiny FAN-Hybrid for fast tests (not an official model): stem [1, 1] at 16/32, 2 FAN blocks 32 wide."""
    model_args = dict(_HYBRID, img_size=64, convnext_depths=(1, 1), convnext_dims=(16, 32), embed_dim=32, depth=2,
                      num_heads=2)
    return _create_fan_hybrid("test_fan_hybrid", pretrained, **dict(model_args, **kwargs))


register_model_deprecations(__name__, {"fan_Xlarge_16_p4_hybrid": "fan_xlarge_16_p4_hybrid"})
