"""FAN-ViT: Fully Attentional Networks (Zhou et al., "Understanding The Robustness in Vision Transformers", ICML 2022,
arXiv 2204.12451), timm-native.

A FAN block is pre-norm x + γ1·TokenMixing(LN x), then x + γ2·ChannelProcessing(LN x) (Sec. 3.2); a convolutional
patch embedding and a Fourier positional encoding come before the blocks, two XCiT class-attention blocks and the head
after them. The XCiT parts are timm's (``timm.models.xcit``: ``PositionalEncodingFourier``, ``ClassAttentionBlock``,
and ``ConvPatchEmbed`` with FAN's p4 stem added), which FAN uses unchanged, quirks included: patch tokens also get
+γ1·LN1(x) in class attention, whose MLP residual starts from the normalised tokens (NVlabs/FAN issue #19).
Every official FAN-ViT name is registered with the official state_dict keys and parameter counts; the
same ``FAN`` class serves FAN-Hybrid through ``embed_layer`` and Hybrid-XL's width change through ``channel_dims``.
The models script (``torch.jit.script``) and trace (``torch.fx``) as timm's own do.
Written from the paper and the released model's shapes and outputs (no official code copied; that code is
NVIDIA-NC licensed).
"""

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.utils.checkpoint
from timm.layers import DropPath, register_notrace_function, register_notrace_module, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.xcit import ClassAttentionBlock, PositionalEncodingFourier
from torch import nn

from ravit.errors import InvalidArgumentError

from ..checkpoint import load_checkpoint
from ..layers import (
    ChannelProcessing,
    ConvPatchEmbed,
    DWConvMlp,
    OverlapPatchEmbed,
    TokenMixing,
    capture_attention,
    explicit_attention,
    squeeze_excite,
)
from ..layers.cpu_inference import fast_inference, hooked, layer_norm
from ._pretrained import LICENSE, RELEASE_URL, build_fan, fan_cfg

__all__ = ["FAN", "FANBlock", "check_images", "checkpoint_filter_fn", "init_weights"]

_norm_layer = partial(nn.LayerNorm, eps=1e-6)


@register_notrace_function  # reason: branches on the input's shape and dtype (kept as one call in FX graphs)
@torch.jit.ignore  # an FX graph scripted afterwards calls it in Python; the models themselves skip it when scripted
def check_images(x: torch.Tensor, in_chans: int, stride: int, name: str) -> torch.Tensor:
    """``x`` unchanged if it is a usable (B, in_chans, H, W) float batch with H and W divisible by ``stride``;
    otherwise ``InvalidArgumentError`` saying what ``name`` expected."""
    if x.ndim != 4:
        raise InvalidArgumentError(f"{name} expects images (B, {in_chans}, H, W), got shape {tuple(x.shape)}")
    batch, chans, H, W = x.shape
    if chans != in_chans:
        raise InvalidArgumentError(
            f"{name} expects {in_chans} input channels, got {chans} (input shape {tuple(x.shape)})")
    if batch == 0:
        raise InvalidArgumentError(f"{name} got an empty batch (input shape {tuple(x.shape)}); pass at least one image")
    if not x.is_floating_point():  # integer pixels (uint8 0..255) would run unnormalised or fail in the stem
        raise InvalidArgumentError(
            f"{name} expects float images, got {x.dtype}: convert and normalise them first (e.g. x.float() / 255, "
            f"then the model's mean and std)")
    if H % stride or W % stride:
        raise InvalidArgumentError(f"{name} needs height and width divisible by its stride {stride}, got {H}×{W}")
    return x


@register_notrace_module  # an FX leaf: traced graphs call it, so eager and FX take the same (fused or reference) path
class FANBlock(nn.Module):
    """x + γ1·TokenMixing(LN1 x), then x + γ2·ChannelProcessing(LN2 x) (FAN Sec. 3.2); optional overlapping downsample.

    ``forward(x, hw)`` takes tokens (B, H·W, C) and the grid (H, W) and returns (tokens, grid): the grid changes only
    when ``out_dim`` differs from ``dim`` (the width change of Hybrid-XL). ``se_mlp`` swaps channel processing for the
    paper's SE-MLP ablation.
    """

    __constants__ = ["fused_attn_skip", "fused_cp"]  # TorchScript compiles only the branches taken

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, eta: float = 1.0, se_mlp: bool = False,
                 out_dim: int | None = None):
        super().__init__()
        self.norm1 = _norm_layer(dim)
        self.attn = TokenMixing(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = _norm_layer(dim)
        if se_mlp:
            self.mlp = DWConvMlp(dim, int(dim * mlp_ratio), drop=drop, se_layer=squeeze_excite)
        else:
            self.mlp = ChannelProcessing(dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop,
                                         attn_drop=attn_drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2 = nn.Parameter(eta * torch.ones(dim))
        self.downsample = OverlapPatchEmbed(dim, out_dim) if out_dim is not None and out_dim != dim else None
        # Without stochastic depth the skip connections join inside the branches' last ops: token mixing adds x to
        # its projection, channel processing takes γ2 and x into its last multiply.
        self.fused_attn_skip = isinstance(self.drop_path, nn.Identity)
        self.fused_cp = not se_mlp and self.fused_attn_skip

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, N, C), (H, W) -> ((B, N', C'), (H', W'))."""
        if not torch.jit.is_scripting():  # noqa: SIM102 (nested: TorchScript then compiles only the reference path)
            if fast_inference(x, self.training) and self._fusable():
                x = self._fused_forward(x, hw)
                return self.downsample(x, hw) if self.downsample is not None else (x, hw)
        # The LayerScale γ's are folded into the branches' last linear maps (same function, fewer passes).
        if self.fused_attn_skip:
            x = self.attn(self.norm1(x), out_scale=self.gamma1, residual=x)
        else:
            x = x + self.drop_path(self.attn(self.norm1(x), out_scale=self.gamma1))
        if self.fused_cp:
            x = self.mlp(self.norm2(x), hw, out_scale=self.gamma2, residual=x)
        else:
            x = x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), hw))
        if self.downsample is not None:
            x, hw = self.downsample(x, hw)
        return x, hw

    @torch.jit.ignore
    def _fusable(self) -> bool:
        """Whether :meth:`_fused_forward` computes this block's function: channel processing without stochastic
        depth, SDPA attention (``capture_attention`` turns it off), LayerNorms, folding convs, and no hook to fire."""
        return (self.fused_cp and self.attn.fused_attn and type(self.norm1) is type(self.norm2) is nn.LayerNorm
                and self.mlp.fusable() and not hooked(self))

    @torch.jit.ignore
    def _fused_forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """The block without its downsample on the fused CPU path (``cpu_inference``): the layers' weights through
        its functions, no submodule calls; (B, N, C) -> (B, N, C)."""
        x = self.attn.fused_forward(layer_norm(x, self.norm1), self.gamma1, x)
        return self.mlp.fused_forward(layer_norm(x, self.norm2), hw, self.gamma2, x)


def init_weights(module: nn.Module, name: str = "") -> None:
    """The official initialisation: Linear trunc-normal(0.02) with zero bias, LayerNorm (1, 0); convs inside the
    FAN blocks N(0, √(2/fan_out)); the patch-embedding and positional-encoding convs keep PyTorch's defaults."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d) and name.startswith("blocks."):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class FAN(nn.Module):
    """Fully Attentional Network with class-attention pooling (FAN-ViT, and FAN-Hybrid through ``embed_layer``).

    Args:
        img_size: nominal input size (the model runs at any size divisible by ``patch_size``).
        patch_size: total stride of ``embed_layer``.
        embed_layer: builds the patch embedding, called with ``img_size``, ``patch_size``, ``in_chans``,
            ``embed_dim``; its ``forward(x)`` returns (tokens (B, N, C), (H, W)).
        channel_dims: width of each FAN block; where it changes, the block ends with an overlapping stride-2
            downsample (Hybrid-XL). Default: ``embed_dim`` everywhere.
        num_heads: an int, or one per block.
        se_mlp: use the SE-MLP ablation instead of channel processing.
        eta: initial value of the LayerScale γ's (1.0 in every released model).
        tokens_norm: class-attention blocks normalise every token (True in every released model).
        head_init_scale: multiplies the initial head weight and bias.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 768, depth: int = 12,
                 num_heads: int | list[int] = 12, channel_dims: list[int] | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, se_mlp: bool = False, cls_attn_layers: int = 2,
                 use_pos_embed: bool = True, eta: float = 1.0, tokens_norm: bool = False, head_init_scale: float = 1.0,
                 embed_layer: Callable[..., nn.Module] = ConvPatchEmbed):
        super().__init__()
        num_heads = list(num_heads) if isinstance(num_heads, (list, tuple)) else [num_heads] * depth
        channel_dims = list(channel_dims) if channel_dims is not None else [embed_dim] * depth
        if len(num_heads) != depth or len(channel_dims) != depth:
            raise InvalidArgumentError(
                f"num_heads ({len(num_heads)}) and channel_dims ({len(channel_dims)}) need one entry "
                             f"per block (depth={depth})")
        if channel_dims[0] != embed_dim:
            raise InvalidArgumentError(f"channel_dims[0]={channel_dims[0]} must equal embed_dim={embed_dim}")
        if global_pool not in ("token", "avg", ""):
            raise InvalidArgumentError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.num_features = self.head_hidden_size = self.embed_dim = channel_dims[-1]
        self.num_prefix_tokens = 1  # the class token leads forward_features' output
        self.grad_checkpointing = False

        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                       embed_dim=embed_dim)
        self.pos_embed = PositionalEncodingFourier(dim=embed_dim) if use_pos_embed else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList()
        self.feature_info = []
        reduction = patch_size
        for i in range(depth):
            out_dim = channel_dims[i + 1] if i + 1 < depth else channel_dims[i]
            self.blocks.append(FANBlock(
                channel_dims[i], num_heads[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=drop_path_rate, eta=eta, se_mlp=se_mlp, out_dim=out_dim))
            reduction *= 2 if out_dim != channel_dims[i] else 1
            self.feature_info.append(dict(num_chs=out_dim, reduction=reduction, module=f"blocks.{i}"))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.num_features))
        self.cls_attn_blocks = nn.ModuleList([
            ClassAttentionBlock(self.num_features, num_heads[-1], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                proj_drop=drop_rate, attn_drop=attn_drop_rate, norm_layer=_norm_layer, eta=eta,
                                tokens_norm=tokens_norm)
            for _ in range(cls_attn_layers)])
        self.norm = _norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            init_weights(module, name)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    # --- timm model API -------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^cls_attn_blocks\.(\d+)", (99999,)), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg", ""):
                raise InvalidArgumentError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's hook for ``pretrained_cfg`` files (``custom_load``): ravit's loader, head re-initialised if needed."""
        load_checkpoint(self, checkpoint_path)

    # --- forward ----------------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` after ``check_images`` (not compiled by TorchScript; one graph node under FX)."""
        if not torch.jit.is_scripting():
            name = getattr(self, "pretrained_cfg", {}).get("architecture") or type(self).__name__
            x = check_images(x, self.in_chans, self.patch_size, name)
        return x

    def _add_pos_embed(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Patch tokens (B, N, C) on an (H, W) grid plus the Fourier positional encoding, then dropout."""
        if self.pos_embed is not None:
            x = x + self.pos_embed(1, hw[0], hw[1]).flatten(2).transpose(1, 2)  # (1, C, H, W) -> (1, N, C)
        return self.pos_drop(x)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, hw = self.patch_embed(self._check_input(x))  # (B, N, C), (H, W)
        return self._add_pos_embed(x, hw), hw

    def _run_block(self, blk: nn.Module, x: torch.Tensor, hw: tuple[int, int]):
        """One FAN block, recomputed in backward under gradient checkpointing (eager only)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, hw, use_reentrant=False)
        return blk(x, hw)

    def _class_attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, C)
        for blk in self.cls_attn_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, 1+N, C), the class token first."""
        x, hw = self._embed(x)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for blk in self.blocks:
                x, hw = self._run_block(blk, x, hw)
        else:  # TorchScript cannot pass a block to a method
            for blk in self.blocks:
                x, hw = blk(x, hw)
        return self.norm(self._class_attention(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Outputs of the FAN blocks named by ``indices`` (timm semantics), as NCHW maps or NLC tokens.

        FAN blocks carry no prefix tokens (the class token joins only in the class-attention blocks), so
        ``return_prefix_tokens`` is rejected. ``norm`` applies the final LayerNorm (only where widths match).
        Returns ``(final tokens as forward_features, intermediates)`` or, with ``intermediates_only``, the list.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise InvalidArgumentError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if return_prefix_tokens:
            raise InvalidArgumentError(
                "FAN blocks carry no prefix tokens; the class token joins after the last FAN block")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        if norm and any(self.feature_info[i]["num_chs"] != self.num_features for i in take_indices):
            raise InvalidArgumentError(
                "norm=True needs intermediates as wide as the final norm; this model changes width")
        x, hw = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early or intermediates_only else self.blocks
        x, intermediates = self._blocks_with_intermediates(x, hw, blocks, take_indices, norm, output_fmt)
        if intermediates_only:
            return intermediates
        return self.norm(self._class_attention(x)), intermediates

    def _blocks_with_intermediates(self, x: torch.Tensor, hw: tuple[int, int], blocks, take_indices, norm: bool,
                                   output_fmt: str, start: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run ``blocks`` (numbered from ``start``), keeping the outputs whose number is in ``take_indices``."""
        intermediates = []
        for i, blk in enumerate(blocks, start=start):
            x, hw = self._run_block(blk, x, hw)
            if i in take_indices:
                y = self.norm(x) if norm else x  # (B, N, C)
                if output_fmt == "NCHW":
                    y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], hw[0], hw[1])  # (B, C, H, W)
                intermediates.append(y)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last index needed (and the class-attention head); returns absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self._prune(max_index + 1, prune_norm, prune_head)
        return take_indices

    def _prune(self, n_blocks: int, prune_norm: bool, prune_head: bool) -> None:
        """Keep the first ``n_blocks`` FAN blocks; optionally drop the final norm and the class-attention head."""
        self.blocks = self.blocks[:n_blocks]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.cls_attn_blocks = nn.ModuleList()
            self.cls_token = None
            self.reset_classifier(0, "")

    @torch.jit.ignore
    def get_attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Attention maps (explicit path): 'blocks.{i}' -> (B, h, N, N), 'cls_attn_blocks.{j}' -> (B, h, 1, 1+N)."""
        modules = {f"blocks.{i}": blk.attn for i, blk in enumerate(self.blocks)}
        modules.update({f"cls_attn_blocks.{j}": blk.attn for j, blk in enumerate(self.cls_attn_blocks)})
        with capture_attention(modules) as maps:
            self.forward_features(x)
        return dict(maps)

    @torch.jit.ignore
    def forward_explicit(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` through the explicit (non-fused) attention path; same outputs, for checking and analysis."""
        with explicit_attention(self):
            return self.forward(x)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: FAN) -> dict[str, torch.Tensor]:
    """Map an official FAN state dict onto ``model``: ``pos_embeder.*`` -> ``pos_embed.*`` (dropped when
    the model has no PE), and a fused class-attention ``qkv`` split into ``q``, ``k``, ``v``. ravit files pass as-is."""
    out: dict[str, torch.Tensor] = {}
    has_pe = getattr(model, "pos_embed", None) is not None
    for key, value in state_dict.items():
        if key.startswith(("pos_embeder.", "pos_embed.")):
            if has_pe:
                out[key.replace("pos_embeder.", "pos_embed.", 1)] = value
            continue
        if key.startswith("cls_attn_blocks.") and ".attn.qkv." in key:
            prefix, kind = key.rsplit(".qkv.", 1)
            for name, part in zip("qkv", value.reshape(3, -1, *value.shape[1:]).unbind(0), strict=True):
                out[f"{prefix}.{name}.{kind}"] = part
            continue
        out[key] = value
    return out


# --- registry -----------------------------------------------------------------------------------------------------
def _cfg(**kwargs) -> dict:
    return fan_cfg(first_conv="patch_embed.proj.0.0", classifier="head", **kwargs)


default_cfgs = generate_default_cfgs({
    "fan_tiny_12_p16_224.nv_in1k": _cfg(url=RELEASE_URL + "fan_vit_tiny.pth.tar", license=LICENSE),
    "fan_small_12_p16_224.nv_in1k": _cfg(url=RELEASE_URL + "fan_vit_small.pth.tar", license=LICENSE),
    "fan_base_18_p16_224.nv_in1k": _cfg(url=RELEASE_URL + "fan_vit_base.pth.tar", license=LICENSE),
    "fan_large_24_p16_224": _cfg(),  # never released (NVlabs/FAN issue #18)
    "fan_small_12_p16_224_se_attn": _cfg(),
    "test_fan_vit": _cfg(input_size=(3, 64, 64)),
    "test_fan_vit_downsample": _cfg(input_size=(3, 64, 64)),
})


def _create_fan(variant: str, pretrained: bool = False, **kwargs) -> FAN:
    out_indices = kwargs.pop("out_indices", 3)
    return build_fan(FAN, variant, pretrained, checkpoint_filter_fn,
                     feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


_VIT = dict(patch_size=16, eta=1.0, tokens_norm=True)


@register_model
def fan_tiny_12_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-T-ViT: 192 wide, 12 blocks, 4 heads, 7.32M parameters."""
    model_args = dict(_VIT, embed_dim=192, depth=12, num_heads=4)
    return _create_fan("fan_tiny_12_p16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def fan_small_12_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-S-ViT: 384 wide, 12 blocks, 8 heads, 28.35M parameters."""
    model_args = dict(_VIT, embed_dim=384, depth=12, num_heads=8)
    return _create_fan("fan_small_12_p16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def fan_base_18_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-B-ViT: 448 wide, 18 blocks, 8 heads, 54.35M parameters."""
    model_args = dict(_VIT, embed_dim=448, depth=18, num_heads=8)
    return _create_fan("fan_base_18_p16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def fan_large_24_p16_224(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-L-ViT: 480 wide, 24 blocks, 10 heads, 80.57M parameters."""
    model_args = dict(_VIT, embed_dim=480, depth=24, num_heads=10)
    return _create_fan("fan_large_24_p16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def fan_small_12_p16_224_se_attn(pretrained: bool = False, **kwargs) -> FAN:
    """FAN-S-ViT with the SE-MLP instead of channel processing (paper Table 6 ablation; the official one crashes)."""
    model_args = dict(_VIT, embed_dim=384, depth=12, num_heads=8, se_mlp=True)
    return _create_fan("fan_small_12_p16_224_se_attn", pretrained, **dict(model_args, **kwargs))


@register_model
def test_fan_vit(pretrained: bool = False, **kwargs) -> FAN:
    """Tiny FAN-ViT for fast tests (not an official model)."""
    model_args = dict(_VIT, img_size=64, embed_dim=32, depth=2, num_heads=2)
    return _create_fan("test_fan_vit", pretrained, **dict(model_args, **kwargs))


@register_model
def test_fan_vit_downsample(pretrained: bool = False, **kwargs) -> FAN:
    """Tiny FAN-ViT that changes width between blocks (Hybrid-XL's downsample path), for fast tests."""
    model_args = dict(_VIT, img_size=64, embed_dim=32, depth=3, num_heads=[2, 2, 4], channel_dims=[32, 32, 48])
    return _create_fan("test_fan_vit_downsample", pretrained, **dict(model_args, **kwargs))
