"""FAN-Swin: timm's Swin Transformer with FAN channel processing in place of the MLP of stages 1–3.

FAN (Zhou et al., "Understanding The Robustness in Vision Transformers", ICML 2022, arXiv 2204.12451) Sec. 4 applies
its channel attention to Swin (Liu et al., arXiv 2103.14030): windowed self-attention (W-MSA / SW-MSA, relative
position bias) is kept, and the MLP of every block in the first three stages becomes ``ChannelProcessing`` whose
DWConv-MLP has no residual around the DWConv (as released in NVlabs/FAN ee1b7df); the last stage keeps the plain MLP.

The model is timm's ``SwinTransformer`` (patch embedding, patch merging, norm, head, ``forward_intermediates``,
``group_matcher`` …) whose stages are filled with ``FANSwinBlock``s. Window size, shift and masks are derived from
the feature map of every call, never stored: a stage whose side is at most the window uses one unshifted window
(as the official code does), any other side is padded to a multiple of the window and the padded keys are masked out,
so any input divisible by the stride (32 for the four-stage models) works. Attention runs on
``F.scaled_dot_product_attention``; ``get_attention_maps`` runs the explicit path.

Official checkpoints (timm 0.5.4 layout: patch merging at the end of a stage, ``head``, persistent
``relative_position_index`` / ``attn_mask``) load through ``checkpoint_filter_fn``. No FAN-Swin weights were released.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, calculate_drop_path_rates, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import swin_transformer as timm_swin
from torch import nn

from ravit.checkpoint import use_ravit_loader
from ravit.errors import InvalidArgumentError
from ravit.layers import ChannelProcessing

__all__ = ["FANSwin", "FANSwinBlock", "WindowAttention", "checkpoint_filter_fn", "relative_position_index",
           "window_geometry", "window_attention_mask"]

_MASK_VALUE = -100.0  # the official (and timm) Swin mask value: exp(-100) vanishes next to any unmasked logit


def window_geometry(hw: tuple[int, int], window: tuple[int, int], shifted: bool):
    """Window, shift and bottom/right padding used on an (H, W) feature map.

    A side no longer than the window is covered by one window of that side and never shifted (the official rule,
    applied per side as in timm 1.0); a longer side uses the full window, shifted by half of it in shifted blocks,
    and is padded up to a multiple of the window.
    """
    win, shift, pad = [], [], []
    for size, w in zip(hw, window, strict=True):
        if size <= w:
            win.append(size)
            shift.append(0)
            pad.append(0)
        else:
            win.append(w)
            shift.append(w // 2 if shifted else 0)
            pad.append(-size % w)
    return tuple(win), tuple(shift), tuple(pad)


def relative_position_index(window: tuple[int, int], table_window: tuple[int, int], device=None) -> torch.Tensor:
    """Index into a relative-position bias table built for ``table_window`` of every token pair of ``window``.

    For ``window == table_window`` this is Swin's usual index; a smaller window reads the table's central offsets.
    Returns (Wh·Ww, Wh·Ww) long.
    """
    (wh, ww), (th, tw) = window, table_window
    ys, xs = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # (N,)
    dy = ys[:, None] - ys[None, :] + th - 1  # (N, N) in [0, 2·th - 2]
    dx = xs[:, None] - xs[None, :] + tw - 1
    return dy * (2 * tw - 1) + dx


def window_attention_mask(hw: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                          pad: tuple[int, int], device=None, dtype=torch.float32) -> torch.Tensor | None:
    """Additive mask (num_windows, N, N) for attention within windows, or None when nothing is masked.

    The padded, cyclically shifted (H + pad_h, W + pad_w) map is split into windows; a key is masked (-100) for a
    query when the two come from different regions of the shift (Swin's SW-MSA mask) or when the key is padding.
    """
    if not any(shift) and not any(pad):
        return None
    H, W = hw[0] + pad[0], hw[1] + pad[1]
    region = torch.zeros(H, W, device=device)
    for i, rows in enumerate(_shift_slices(H, window[0], shift[0])):
        for j, cols in enumerate(_shift_slices(W, window[1], shift[1])):
            region[rows, cols] = i * 3 + j
    valid = torch.zeros(H, W, device=device)
    valid[:hw[0], :hw[1]] = 1.0
    valid = torch.roll(valid, shifts=(-shift[0], -shift[1]), dims=(0, 1))  # the same shift as the features
    region = timm_swin.window_partition(region[None, :, :, None], window).flatten(1)  # (nW, N)
    valid = timm_swin.window_partition(valid[None, :, :, None], window).flatten(1)  # (nW, N)
    masked = (region[:, None, :] != region[:, :, None]) | (valid[:, None, :] == 0)  # (nW, N query, N key)
    return torch.zeros(masked.shape, device=device, dtype=dtype).masked_fill(masked, _MASK_VALUE)


def _shift_slices(size: int, window: int, shift: int) -> tuple[slice, ...]:
    """Rows (or columns) of the shifted map that came from one contiguous region before the cyclic shift."""
    if not shift:
        return (slice(0, size),)
    return slice(0, size - window), slice(size - window, size - shift), slice(size - shift, size)


class WindowAttention(timm_swin.WindowAttention):
    """timm's window attention (keys ``qkv``, ``proj``, ``relative_position_bias_table``) run on SDPA for any window.

    ``forward(x, window, mask)``: x (B·nW, Wh·Ww, C) windows of size ``window`` (at most the constructed window),
    mask (nW, N, N) additive or None.
    """

    def forward(self, x: torch.Tensor, window: tuple[int, int] | None = None, mask: torch.Tensor | None = None,
                return_attention: bool = False):
        """Returns (B·nW, N, C), and with ``return_attention`` also the attention (B·nW, heads, N, N)."""
        window = tuple(window or self.window_size)
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B_, h, N, d)
        bias = self._relative_position_bias(window, x.device)  # (h, N, N)
        if mask is not None:
            num_win = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype))  # (nW, h, N, N)
            bias = bias.unsqueeze(0).expand(B_ // num_win, -1, -1, -1, -1).reshape(B_, self.num_heads, N, N)
        bias = bias.to(q.dtype)
        if return_attention:
            attn = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B_, h, N, N)
            out = self.attn_drop(attn) @ v
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B_, N, -1)))  # (B_, N, C)
        return (out, attn) if return_attention else out

    def _relative_position_bias(self, window: tuple[int, int], device) -> torch.Tensor:
        """(heads, N, N) bias for a ``window`` (the full window uses timm's precomputed index)."""
        if window == tuple(self.window_size):
            index = self.relative_position_index
        else:
            index = relative_position_index(window, tuple(self.window_size), device=device)
        N = window[0] * window[1]
        return self.relative_position_bias_table[index.reshape(-1)].view(N, N, -1).permute(2, 0, 1)


class FANSwinBlock(nn.Module):
    """Swin block (W-MSA or SW-MSA) whose MLP is FAN's channel processing; x (B, H, W, C) -> (B, H, W, C).

    x ← x + DropPath(WindowAttention(LN1 x)); x ← x + DropPath(CP(LN2 x, (H, W))) (Swin paper Eq. 3, with FAN's
    channel processing, arXiv 2204.12451 Sec. 4, for the MLP when ``channel_processing`` is set).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int | tuple[int, int] = 7, shifted: bool = False,
                 channel_processing: bool = True, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.window_size = to_2tuple(window_size)
        self.shifted = shifted
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, num_heads=num_heads, window_size=self.window_size, qkv_bias=qkv_bias,
                                    attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        if channel_processing:
            self.mlp = ChannelProcessing(dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                         drop=proj_drop, attn_drop=attn_drop, dwconv_residual=False)
        else:
            self.mlp = Mlp(dim, hidden_features=hidden, act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        """x (B, H, W, C) -> (B, H, W, C); with ``return_attention`` also the window attention
        (B, heads, nW·N, N): the rows are the queries of the nW windows (N tokens each) in timm's window order over
        the padded, shifted map, the columns the N keys of the query's own window (``.view(B, h, nW, N, N)``)."""
        B, H, W, C = x.shape
        y, attn = self._window_attention(self.norm1(x), return_attention)
        x = x + self.drop_path1(y)
        x = x.reshape(B, H * W, C)  # (B, N, C)
        y = self.norm2(x)
        y = self.mlp(y, (H, W)) if isinstance(self.mlp, ChannelProcessing) else self.mlp(y)  # (B, N, C)
        x = (x + self.drop_path2(y)).reshape(B, H, W, C)
        return (x, attn) if return_attention else x

    def _window_attention(self, x: torch.Tensor, return_attention: bool):
        B, H, W, C = x.shape
        window, shift, pad = window_geometry((H, W), self.window_size, self.shifted)
        x = F.pad(x, (0, 0, 0, pad[1], 0, pad[0]))  # (B, Hp, Wp, C)
        Hp, Wp = H + pad[0], W + pad[1]
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = timm_swin.window_partition(x, window).view(-1, window[0] * window[1], C)  # (B·nW, N, C)
        mask = window_attention_mask((H, W), window, shift, pad, device=x.device)
        out = self.attn(windows, window, mask, return_attention=return_attention)
        attn = None
        if return_attention:
            out, attn = out
            nW, h, N = attn.shape[0] // B, attn.shape[1], attn.shape[2]
            attn = attn.view(B, nW, h, N, N).transpose(1, 2).reshape(B, h, nW * N, N)  # (B, heads, nW·N, N)
        x = timm_swin.window_reverse(out.view(-1, window[0], window[1], C), window, Hp, Wp)  # (B, Hp, Wp, C)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :H, :W].contiguous(), attn


class FANSwin(timm_swin.SwinTransformer):
    """Swin Transformer with FAN channel processing (arXiv 2204.12451 Sec. 4).

    Built as timm's ``SwinTransformer`` (so ``forward_features``/``forward_head``/``forward_intermediates``,
    ``features_only``, ``group_matcher``, ``set_grad_checkpointing``, ``reset_classifier`` are timm's), with the
    stages' blocks replaced by ``FANSwinBlock``. ``channel_processing[i]`` picks FAN channel processing (True) or
    the plain MLP (False) in stage i; the official models use it in all stages but the last.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 96,
                 depths: tuple[int, ...] = (2, 2, 6, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                 window_size: int = 7, channel_processing: tuple[bool, ...] | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, norm_layer: type[nn.Module] = nn.LayerNorm,
                 weight_init: str = ""):
        num_stages = len(depths)
        if channel_processing is None:
            channel_processing = (True,) * (num_stages - 1) + (False,)
        if not (len(num_heads) == len(channel_processing) == num_stages):
            raise InvalidArgumentError(
                f"depths, num_heads and channel_processing need one entry per stage, got {len(depths)}, "
                             f"{len(num_heads)} and {len(channel_processing)}")
        # timm builds patch embedding, patch merging, norm and head; empty stages avoid building blocks twice.
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         global_pool=global_pool, embed_dim=embed_dim, depths=(0,) * num_stages, num_heads=num_heads,
                         window_size=window_size, strict_img_size=False, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         drop_rate=drop_rate, proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
                         drop_path_rate=0.0, norm_layer=norm_layer, weight_init="skip")
        self.patch_size = patch_size
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        for i, stage in enumerate(self.layers):
            dim = self.feature_info[i]["num_chs"]
            stage.blocks = nn.Sequential(*[
                FANSwinBlock(dim, num_heads=num_heads[i], window_size=window_size, shifted=j % 2 == 1,
                             channel_processing=channel_processing[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                             proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i][j],
                             norm_layer=norm_layer)
                for j in range(depths[i])])
            stage.depth = depths[i]
        self.weight_init_mode = "reset" if weight_init == "skip" else weight_init  # what timm's init_weights() uses
        if weight_init != "skip":
            self.init_weights(weight_init, needs_reset=False)

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this: the patch size times one ×2 merge per later stage."""
        return self.patch_size * 2 ** (len(self.layers) - 1)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` saying what was expected when x is not a usable (B, C, H, W) image batch."""
        name = getattr(self, "pretrained_cfg", {}).get("architecture") or type(self).__name__
        if x.ndim != 4:
            raise InvalidArgumentError(f"{name} expects images (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        batch, chans, H, W = x.shape
        if chans != self.in_chans:
            raise InvalidArgumentError(f"{name} expects {self.in_chans} input channels, got {chans} (input shape "
                             f"{tuple(x.shape)})")
        if batch == 0:
            raise InvalidArgumentError(
                f"{name} got an empty batch (input shape {tuple(x.shape)}); pass at least one image")
        if not x.is_floating_point():  # integer pixels (uint8 0..255) would run unnormalised or fail in the stem
            raise InvalidArgumentError(
                f"{name} expects float images, got {x.dtype}: convert and normalise them first (e.g. x.float() / 255, "
                f"then the model's mean and std)")
        if H % self.stride or W % self.stride:
            raise InvalidArgumentError(f"{name} needs height and width divisible by its stride {self.stride} "
                             f"(patch {self.patch_size} × 2^{len(self.layers) - 1} patch merges), got {H}×{W}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/stride, W/stride, num_features), normed (NHWC, as timm's Swin)."""
        self.check_input(x)
        return super().forward_features(x)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """timm's ``forward_intermediates`` (NCHW stage outputs) after the input check."""
        self.check_input(x)
        return super().forward_intermediates(x, *args, **kwargs)

    def set_input_size(self, *args, **kwargs) -> None:
        """Not needed: windows, shifts and masks follow each input (any side divisible by ``stride`` works)."""
        raise NotImplementedError("FAN-Swin derives its windows from every input; any size divisible by "
                                  f"{self.stride} works without set_input_size")

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """timm's hook for ``pretrained_cfg`` files (``custom_load``): ravit's loader, head re-initialised if needed."""
        from ..checkpoint import load_checkpoint

        load_checkpoint(self, checkpoint_path)

    def _explicit(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_input(x)
        maps = {}
        x = self.patch_embed(x)  # (B, H, W, C)
        for i, stage in enumerate(self.layers):
            x = stage.downsample(x)
            for j, block in enumerate(stage.blocks):
                x, maps[f"layers.{i}.blocks.{j}"] = block(x, return_attention=True)
        return self.norm(x), maps

    @torch.jit.ignore
    def get_attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Window attention of every block (explicit path): 'layers.{i}.blocks.{j}' -> (B, heads, nW·N, N).

        Rows are the queries of nW windows of N tokens (timm's window order over the padded, shifted stage map),
        columns the keys of the query's window; ``.view(B, heads, nW, N, N)`` separates the windows.
        """
        return self._explicit(x)[1]

    @torch.jit.ignore
    def forward_explicit(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` through the explicit (non-fused) window attention; same outputs, for checking and analysis."""
        return self.forward_head(self._explicit(x)[0])


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: FANSwin) -> dict[str, torch.Tensor]:
    """Map an official FAN-Swin state dict (timm 0.5.4 Swin layout) onto ``FANSwin``; ravit files pass as-is.

    Patch merging moves from the end of stage i to the start of stage i+1 (``layers.i.downsample`` ->
    ``layers.{i+1}.downsample``), ``head`` becomes ``head.fc``, and the ``relative_position_index`` / ``attn_mask``
    buffers are dropped (derived, and not persistent here). FAN's channel-processing keys (``mlp.q``,
    ``mlp.temperature``, ``mlp.mlp_v.*``, ``mlp.norm_v``) need no renaming. Written out rather than timm's Swin filter,
    which also resizes mismatched bias tables and so would hide a checkpoint of another variant from the loader.
    """
    old_layout = "layers.0.downsample.reduction.weight" in state_dict or "head.weight" in state_dict
    out = {}
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if old_layout:
            key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
            key = "head.fc." + key[len("head."):] if key.startswith("head.") else key
        out[key] = value
    return out


def _create_fan_swin(variant: str, pretrained: bool = False, **kwargs) -> FANSwin:
    kwargs = use_ravit_loader(kwargs)
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (2, 2, 6, 2))))))
    return build_model_with_cfg(FANSwin, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **kwargs)


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
            "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head.fc",
            "custom_load": True,  # files given through pretrained_cfg_overlay go through ravit.load_checkpoint
            "paper_ids": "arXiv:2204.12451", "origin_url": "https://github.com/NVlabs/FAN", **kwargs}


# No FAN-Swin weights were released (NVlabs/FAN ee1b7df); load your own with pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs({
    "fan_swin_tiny_patch4_window7_224": _cfg(),
    "fan_swin_small_patch4_window7_224": _cfg(),
    "fan_swin_base_patch4_window7_224": _cfg(),
    "fan_swin_large_patch4_window7_224": _cfg(),
    "test_fan_swin": _cfg(input_size=(3, 64, 64)),
})


def _args(kwargs: dict, **defaults) -> dict:
    """Entry-point defaults, overridden by the caller's keyword arguments."""
    return {**defaults, **kwargs}


@register_model
def fan_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> FANSwin:
    """FAN-Swin-T: Swin-T (96, depths 2-2-6-2) with channel processing in stages 1–3; 29.54M parameters."""
    return _create_fan_swin("fan_swin_tiny_patch4_window7_224", pretrained, **_args(
        kwargs, patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)))


@register_model
def fan_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> FANSwin:
    """FAN-Swin-S: Swin-S (96, depths 2-2-18-2) with channel processing in stages 1–3; 53.06M parameters."""
    return _create_fan_swin("fan_swin_small_patch4_window7_224", pretrained, **_args(
        kwargs, patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)))


@register_model
def fan_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> FANSwin:
    """FAN-Swin-B: Swin-B (128, depths 2-2-18-2) with channel processing in stages 1–3; 93.60M parameters."""
    return _create_fan_swin("fan_swin_base_patch4_window7_224", pretrained, **_args(
        kwargs, patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)))


@register_model
def fan_swin_large_patch4_window7_224(pretrained: bool = False, **kwargs) -> FANSwin:
    """FAN-Swin-L: Swin-L (192, depths 2-2-18-2) with channel processing in stages 1–3; 208.94M parameters."""
    return _create_fan_swin("fan_swin_large_patch4_window7_224", pretrained, **_args(
        kwargs, patch_size=4, window_size=7, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)))


@register_model
def test_fan_swin(pretrained: bool = False, **kwargs) -> FANSwin:
    """Tiny FAN-Swin for fast tests (not an official model): 2 stages (channel processing, then MLP), window 4."""
    return _create_fan_swin("test_fan_swin", pretrained, **_args(
        kwargs, img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2)))
