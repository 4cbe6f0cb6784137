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
``F.scaled_dot_product_attention`` (or timm's explicit path when ``fused_attn`` is off); ``get_attention_maps`` runs
the explicit path. The model scripts with TorchScript; under ``torch.fx`` each block is one leaf, since its windows
follow the input size.

Official checkpoints (timm 0.5.4 layout: patch merging at the end of a stage, ``head``, persistent
``relative_position_index`` / ``attn_mask``) load through ``checkpoint_filter_fn``. No FAN-Swin weights were released.
"""

import re

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, calculate_drop_path_rates, register_notrace_module, to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models import swin_transformer as timm_swin
from torch import nn

from ravit.errors import InvalidArgumentError
from ravit.layers import ChannelProcessing
from ravit.models._pretrained import build_fan, fan_cfg
from ravit.models.fan import check_images

__all__ = ["FANSwin", "FANSwinBlock", "WindowAttention", "checkpoint_filter_fn", "relative_position_index",
           "window_geometry", "window_attention_mask"]


def _side_geometry(size: int, window: int, shifted: bool) -> tuple[int, int, int]:
    """(window, shift, padding) along one side of ``size`` tokens."""
    if size <= window:
        return size, 0, 0
    return window, window // 2 if shifted else 0, (window - size % window) % window


def window_geometry(hw: tuple[int, int], window: tuple[int, int],
                    shifted: bool) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Window, shift and bottom/right padding used on an (H, W) feature map.

    A side no longer than the window is covered by one window of that side and never shifted (the official rule,
    applied per side as in timm 1.0); a longer side uses the full window, shifted by half of it in shifted blocks,
    and is padded up to a multiple of the window.
    """
    win_h, shift_h, pad_h = _side_geometry(hw[0], window[0], shifted)
    win_w, shift_w, pad_w = _side_geometry(hw[1], window[1], shifted)
    return (win_h, win_w), (shift_h, shift_w), (pad_h, pad_w)


def relative_position_index(window: tuple[int, int], table_window: tuple[int, int],
                            device: torch.device | None = None) -> torch.Tensor:
    """Index into a relative-position bias table built for ``table_window`` of every token pair of ``window``.

    For ``window == table_window`` this is Swin's usual index; a smaller window reads the table's central offsets.
    Returns (Wh·Ww, Wh·Ww) long.
    """
    ys = torch.arange(window[0], device=device).repeat_interleave(window[1])  # (N,) row of each token
    xs = torch.arange(window[1], device=device).repeat(window[0])  # (N,) column of each token
    dy = ys[:, None] - ys[None, :] + table_window[0] - 1  # (N, N) in [0, 2·th - 2]
    dx = xs[:, None] - xs[None, :] + table_window[1] - 1
    return dy * (2 * table_window[1] - 1) + dx


def _shift_regions(size: int, window: int, shift: int, device: torch.device | None) -> torch.Tensor:
    """Region (0, 1 or 2) of each row (or column) of the shifted map, i.e. where it was before the cyclic shift:
    Swin's SW-MSA slices [0, size - window), [size - window, size - shift), [size - shift, size). (size,) long."""
    index = torch.arange(size, device=device)
    if shift == 0:
        return torch.zeros_like(index)
    return (index >= size - window).long() + (index >= size - shift).long()


def window_attention_mask(hw: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                          pad: tuple[int, int], device: torch.device | None = None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Additive mask (num_windows, N, N) for attention within windows, or None when nothing is masked.

    The padded, cyclically shifted (H + pad_h, W + pad_w) map is split into windows; a key is masked (-100) for a
    query when the two come from different regions of the shift (Swin's SW-MSA mask) or when the key is padding.
    """
    if shift[0] == 0 and shift[1] == 0 and pad[0] == 0 and pad[1] == 0:
        return None
    H, W = hw[0] + pad[0], hw[1] + pad[1]
    region = (_shift_regions(H, window[0], shift[0], device)[:, None] * 3
              + _shift_regions(W, window[1], shift[1], device)[None, :])  # (H, W)
    valid = torch.zeros(H, W, device=device)
    valid[:hw[0], :hw[1]] = 1.0
    valid = torch.roll(valid, shifts=(-shift[0], -shift[1]), dims=(0, 1))  # the same shift as the features
    region = timm_swin.window_partition(region[None, :, :, None], window).flatten(1)  # (nW, N)
    valid = timm_swin.window_partition(valid[None, :, :, None], window).flatten(1)  # (nW, N)
    masked = (region[:, None, :] != region[:, :, None]) | (valid[:, None, :] == 0)  # (nW, N query, N key)
    # -100: the official (and timm) Swin mask value; exp(-100) vanishes next to any unmasked logit
    return torch.zeros(masked.shape, device=device, dtype=dtype).masked_fill(masked, -100.0)


class WindowAttention(timm_swin.WindowAttention):
    """timm's window attention (keys ``qkv``, ``proj``, ``relative_position_bias_table``) for any window up to the
    constructed one (a smaller window reads the bias table's central offsets); SDPA or the explicit path by
    ``fused_attn``, as timm's.

    ``forward(x, window, mask)``: x (B·nW, Wh·Ww, C) windows of size ``window`` (default: the constructed window),
    mask (nW, N, N) additive or None; returns (B·nW, N, C).
    """

    def forward(self, x: torch.Tensor, window: tuple[int, int] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fused_attn:
            return self.forward_attention(x, window, mask)[0]
        q, k, v, bias = self._qkv_bias(x, window, mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)))  # (B_, N, C)

    def forward_attention(self, x: torch.Tensor, window: tuple[int, int] | None = None,
                          mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The explicit path: (output (B·nW, N, C), attention probabilities (B·nW, heads, N, N))."""
        q, k, v, bias = self._qkv_bias(x, window, mask)
        attn = self.softmax((q * self.scale) @ k.transpose(-2, -1) + bias)  # (B_, h, N, N)
        out = self.attn_drop(attn) @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))), attn

    def _qkv_bias(self, x: torch.Tensor, window: tuple[int, int] | None, mask: torch.Tensor | None):
        """q, k, v (B_, h, N, d) and the additive bias (B_, h, N, N): relative positions plus ``mask``."""
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._relative_position_bias(self.window_size if window is None else window, x.device)  # (h, N, N)
        if mask is not None:
            num_win = mask.shape[0]
            bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)  # (nW, h, N, N)
            bias = bias.unsqueeze(0).expand(B_ // num_win, -1, -1, -1, -1).reshape(B_, self.num_heads, N, N)
        return q, k, v, bias.to(q.dtype)

    def _relative_position_bias(self, window: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(heads, N, N) bias for a ``window`` (the full window uses timm's precomputed index)."""
        if window[0] == self.window_size[0] and window[1] == self.window_size[1]:
            index = self.relative_position_index
        else:
            index = relative_position_index(window, self.window_size, device=device)
        N = window[0] * window[1]
        return self.relative_position_bias_table[index.reshape(-1)].view(N, N, -1).permute(2, 0, 1)


# One leaf for FX: window, shift and padding follow each input's (H, W). timm's SwinTransformerBlock differs: it fixes
# them at construction and leaves padded keys unmasked, so it is not reused here.
@register_notrace_module
class FANSwinBlock(nn.Module):
    """Swin block (W-MSA or SW-MSA) whose MLP is FAN's channel processing; x (B, H, W, C) -> (B, H, W, C).

    x ← x + DropPath(WindowAttention(LN1 x)); x ← x + DropPath(CP(LN2 x, (H, W))) (Swin paper Eq. 3, with FAN's
    channel processing, arXiv 2204.12451 Sec. 4, for the MLP when ``channel_processing`` is set).
    """

    __constants__ = ["channel_processing"]  # TorchScript compiles only the MLP call that applies

    def __init__(self, dim: int, num_heads: int, window_size: int | tuple[int, int] = 7, shifted: bool = False,
                 channel_processing: bool = True, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.window_size = to_2tuple(window_size)
        self.shifted = shifted
        self.channel_processing = channel_processing
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_attention(x, return_attention=False)[0]

    def forward_attention(self, x: torch.Tensor,
                          return_attention: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, H, W, C) -> (B, H, W, C) and, with ``return_attention``, the window attention
        (B, heads, nW·N, N) from the explicit path: the rows are the queries of the nW windows (N tokens each) in
        timm's window order over the padded, shifted map, the columns the N keys of the query's own window
        (``.view(B, h, nW, N, N)``)."""
        B, H, W, C = x.shape
        y, attn = self._window_attention(self.norm1(x), return_attention)
        x = x + self.drop_path1(y)
        x = x.reshape(B, H * W, C)  # (B, N, C)
        y = self.norm2(x)
        y = self.mlp(y, (H, W)) if self.channel_processing else self.mlp(y)  # (B, N, C)
        x = (x + self.drop_path2(y)).reshape(B, H, W, C)
        return x, attn

    def _window_attention(self, x: torch.Tensor,
                          return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, H, W, C = x.shape
        window, shift, pad = window_geometry((H, W), self.window_size, self.shifted)
        x = F.pad(x, (0, 0, 0, pad[1], 0, pad[0]))  # (B, Hp, Wp, C)
        Hp, Wp = H + pad[0], W + pad[1]
        shifted = shift[0] > 0 or shift[1] > 0
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = timm_swin.window_partition(x, window).view(-1, window[0] * window[1], C)  # (B·nW, N, C)
        mask = window_attention_mask((H, W), window, shift, pad, device=x.device)
        attn: torch.Tensor | None = None
        if return_attention:
            out, probs = self.attn.forward_attention(windows, window, mask)
            nW, h, N = probs.shape[0] // B, probs.shape[1], probs.shape[2]
            attn = probs.view(B, nW, h, N, N).transpose(1, 2).reshape(B, h, nW * N, N)  # (B, heads, nW·N, N)
        else:
            out = self.attn(windows, window, mask)
        x = timm_swin.window_reverse(out.view(-1, window[0], window[1], C), window, Hp, Wp)  # (B, Hp, Wp, C)
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :H, :W].contiguous(), attn


class FANSwin(timm_swin.SwinTransformer):
    """Swin Transformer with FAN channel processing (arXiv 2204.12451 Sec. 4).

    Built as timm's ``SwinTransformer`` (so ``forward_head``/``forward_intermediates``, ``features_only``,
    ``group_matcher``, ``set_grad_checkpointing``, ``reset_classifier`` are timm's; ``forward_features`` adds the
    input check), with the stages' blocks replaced by ``FANSwinBlock``. ``channel_processing[i]`` picks FAN channel
    processing (True) or the plain MLP (False) in stage i; the official models use it in all stages but the last.
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
        return self.patch_size << (len(self.layers) - 1)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` after ``check_images`` (not compiled by TorchScript; one graph node under FX)."""
        if not torch.jit.is_scripting():
            name = getattr(self, "pretrained_cfg", {}).get("architecture") or type(self).__name__
            x = check_images(x, self.in_chans, self.stride, name)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/stride, W/stride, num_features), normed (NHWC, as timm's Swin)."""
        return self.norm(self.layers(self.patch_embed(self._check_input(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # timm's forward, restated here: FX wraps ``check_images`` only where the traced forward's module names it.
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        """timm's ``forward_intermediates`` (NCHW stage outputs) after the input check."""
        return super().forward_intermediates(self._check_input(x), *args, **kwargs)

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
        maps = {}
        x = self.patch_embed(self._check_input(x))  # (B, H, W, C)
        for i, stage in enumerate(self.layers):
            x = stage.downsample(x)
            for j, block in enumerate(stage.blocks):
                x, maps[f"layers.{i}.blocks.{j}"] = block.forward_attention(x)
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


# --- registry -----------------------------------------------------------------------------------------------------
def _cfg(**kwargs) -> dict:
    return fan_cfg(**{"crop_pct": 0.9, "pool_size": (7, 7), "first_conv": "patch_embed.proj", "classifier": "head.fc",
                      **kwargs})


# No FAN-Swin weights were released (NVlabs/FAN ee1b7df); load your own with pretrained_cfg_overlay=dict(file=...).
default_cfgs = generate_default_cfgs({
    "fan_swin_tiny_patch4_window7_224": _cfg(),
    "fan_swin_small_patch4_window7_224": _cfg(),
    "fan_swin_base_patch4_window7_224": _cfg(),
    "fan_swin_large_patch4_window7_224": _cfg(),
    "test_fan_swin": _cfg(input_size=(3, 64, 64), pool_size=(8, 8)),
})


def _create_fan_swin(variant: str, pretrained: bool = False, **kwargs) -> FANSwin:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (2, 2, 6, 2))))))
    return build_fan(FANSwin, variant, pretrained, checkpoint_filter_fn,
                     feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


@register_model
def fan_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> FANSwin:
    """FAN-Swin-T: Swin-T (96, depths 2-2-6-2) with channel processing in stages 1–3; 29.54M parameters."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_fan_swin("fan_swin_tiny_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def fan_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> FANSwin:
    """FAN-Swin-S: Swin-S (96, depths 2-2-18-2) with channel processing in stages 1–3; 53.06M parameters."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_fan_swin("fan_swin_small_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def fan_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> FANSwin:
    """FAN-Swin-B: Swin-B (128, depths 2-2-18-2) with channel processing in stages 1–3; 93.60M parameters."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_fan_swin("fan_swin_base_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def fan_swin_large_patch4_window7_224(pretrained: bool = False, **kwargs) -> FANSwin:
    """FAN-Swin-L: Swin-L (192, depths 2-2-18-2) with channel processing in stages 1–3; 208.94M parameters."""
    model_args = dict(patch_size=4, window_size=7, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
    return _create_fan_swin("fan_swin_large_patch4_window7_224", pretrained, **dict(model_args, **kwargs))


@register_model
def test_fan_swin(pretrained: bool = False, **kwargs) -> FANSwin:
    """Tiny FAN-Swin for fast tests (not an official model): 2 stages (channel processing, then MLP), window 4."""
    model_args = dict(img_size=64, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))
    return _create_fan_swin("test_fan_swin", pretrained, **dict(model_args, **kwargs))
