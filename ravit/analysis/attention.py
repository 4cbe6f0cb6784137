"""Attention maps over the image: CLS attention (ViT), class attention and token-mixing attention (FAN).

Two sources, neither of which changes the model:

- ``model.get_attention_maps(x)`` where the model provides it (ravit's FAN family): ``'blocks.{i}'`` -> (B, heads,
  N, N) token-mixing attention over patch tokens, ``'cls_attn_blocks.{j}'`` -> (B, heads, 1, 1 + N) class attention
  (class token first), FAN paper Sec. 2 / XCiT class attention.
- timm-style blocks (``blocks.{i}.attn`` with ``attn_drop`` applied to the softmax, as timm's ``Attention`` and
  ``AttentionExtract`` assume): inside a context, fused attention is switched off and the dropout's output (the
  attention probabilities, dropout being the identity in eval mode) is recorded by a forward hook
  (``ravit.layers.capture_attention``, which FAN's ``get_attention_maps`` uses too). On exit the hooks are removed
  and every ``fused_attn`` flag is restored; the explicit path gives the same numbers as the fused one.

The maps over the image (B, heads, h, w) are then the class token's row without its own column (``cls_attention``),
or, for attention among patch tokens, the attention each patch *receives* averaged over all patch queries, or one
query patch's row (``token_attention``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ravit.analysis.features import block_names, check_images, resolve_indices, token_grid
from ravit.errors import InvalidArgumentError
from ravit.layers import capture_attention

__all__ = ["attention_maps", "cls_attention", "model_has_cls_token", "recording_attention", "token_attention"]


def model_has_cls_token(model: nn.Module) -> bool:
    """Whether the model has a class token (``cls_token``), which CLS attention needs."""
    return getattr(model, "cls_token", None) is not None


@contextlib.contextmanager
def recording_attention(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the attention probabilities of timm-style blocks ``names`` (e.g. ``['blocks.11']``) during forwards.

    Yields ``{block name: (B, heads, N, N)}``, filled by each forward pass. Restores fused attention and removes the
    hooks on exit, also when the forward raises (``ravit.layers.capture_attention`` on each block's ``attn``).
    """
    modules = dict(model.named_modules())
    targets = {}
    for name in names:
        attn = getattr(modules.get(name), "attn", None)
        if attn is None or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
            raise InvalidArgumentError(
                f"{type(model).__name__}: attention maps need `get_attention_maps(x)` or timm-style blocks whose "
                f"`{name}.attn` applies an `attn_drop` module to the softmax; {name!r} has neither"
            )
        targets[name] = attn
    with capture_attention(targets) as captured:
        yield captured


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor, blocks: Sequence[int] | None = None):
    """Attention probabilities per block: ``{'blocks.{i}': (B, heads, N, N), ...}`` (all blocks by default).

    Uses ``get_attention_maps`` where the model has it (then class-attention maps are included too), else the
    timm-style recording of :func:`recording_attention`. Rows sum to 1; prefix tokens, if any, come first.
    """
    check_images(model, images)
    if hasattr(model, "get_attention_maps"):
        maps = dict(model.get_attention_maps(images))
        if blocks is not None:
            keep = {f"blocks.{i}" for i in resolve_indices(len(block_names(model)), blocks)}
            maps = {k: v for k, v in maps.items() if not k.startswith("blocks.") or k in keep}
        return maps
    names = block_names(model)
    selected = [names[i] for i in resolve_indices(len(names), blocks)]
    with recording_attention(model, selected) as captured:
        model(images)
    missing = [n for n in selected if n not in captured]
    if missing:
        raise InvalidArgumentError(f"{type(model).__name__}: no attention was recorded for {missing}")
    for name in selected:
        attn = captured[name]
        if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
            raise InvalidArgumentError(f"{name}: recorded a {tuple(attn.shape)} tensor, not (B, heads, N, N) attention")
    return {name: captured[name] for name in selected}


def _to_grid(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B, heads, n) patch values in raster order -> (B, heads, h, w)."""
    _, h, w = token_grid(values.shape[-1], (images.shape[-2], images.shape[-1]), 0)
    return values.reshape(*values.shape[:-1], h, w)


def _block_attention(model: nn.Module, images: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """(attention (B, heads, N, N) of ``blocks[block]``, number of prefix tokens at its start)."""
    names = block_names(model)
    name = names[resolve_indices(len(names), [block])[0]]
    maps = attention_maps(model, images, [block])
    if name not in maps:
        raise InvalidArgumentError(
            f"{type(model).__name__} gives no image-wide attention map for {name!r} (it gives {sorted(maps)[:3]}...); "
            "windowed attention (Swin) has none"
        )
    # FAN's token-mixing blocks run on patch tokens only (the class token joins in the class-attention blocks)
    prefix = 0 if hasattr(model, "get_attention_maps") else int(getattr(model, "num_prefix_tokens", 0))
    return maps[name], prefix


@torch.no_grad()
def cls_attention(model: nn.Module, images: torch.Tensor, block: int = -1) -> torch.Tensor:
    """The class token's attention to each patch, (B, heads, h, w).

    For models with class-attention blocks (FAN) ``block`` indexes ``cls_attn_blocks`` (default: the last); for
    ViTs with a class token it indexes ``blocks``, and the row of the class token is used.
    """
    if hasattr(model, "get_attention_maps"):
        check_images(model, images)
        maps = model.get_attention_maps(images)
        cls_keys = sorted((k for k in maps if k.startswith("cls_attn_blocks.")), key=lambda k: int(k.split(".")[1]))
        if cls_keys:
            attn = maps[cls_keys[resolve_indices(len(cls_keys), [block])[0]]]  # (B, heads, 1, 1 + N)
            return _to_grid(attn[:, :, 0, 1:], images)
    if not model_has_cls_token(model):
        raise InvalidArgumentError(
            f"CLS attention needs a class token (or FAN class-attention blocks): {type(model).__name__} has no "
            "`cls_token` (e.g. a ViT built with class_token=False); use token attention (`--kind tokens`) instead"
        )
    attn, prefix = _block_attention(model, images, block)
    return _to_grid(attn[:, :, 0, prefix:], images)  # class token row, patch columns


@torch.no_grad()
def token_attention(
    model: nn.Module, images: torch.Tensor, block: int = -1, query: int | None = None
) -> torch.Tensor:
    """Attention among patch tokens of ``blocks[block]`` as (B, heads, h, w) over the image.

    ``query=None``: the attention each patch receives, averaged over all patch queries; otherwise the row of patch
    ``query`` (raster index). Prefix tokens (class, register) are left out on both sides.
    """
    attn, prefix = _block_attention(model, images, block)
    patches = attn[:, :, prefix:, prefix:]  # (B, heads, h*w, h*w)
    if query is None:
        values = patches.mean(dim=2)
    else:
        if not 0 <= query < patches.shape[-1]:
            raise InvalidArgumentError(f"query patch {query} outside the {patches.shape[-1]} patch tokens")
        values = patches[:, :, query]
    return _to_grid(values, images)
