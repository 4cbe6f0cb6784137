"""Block outputs of a vision model as patch-token grids, read without changing the model.

Two routes, both leaving the model exactly as it was:

- ``forward_intermediates(x, indices=[...], output_fmt='NCHW', intermediates_only=True)`` where the model has it
  (timm ViTs, ravit's FAN family): the raw block outputs (no final norm), spatial tokens only.
- Forward hooks on named modules (``blocks.{i}`` by default, any module names on request, e.g. a ResNet's
  ``layer1``..``layer4`` for the FAN paper's CNN comparison), registered in a context manager and always removed.
  A hooked output must be tokens (B, [prefix +] h*w, C) or a map (B, C, h, w); channels-last stage outputs (timm's
  Swin) are read through ``forward_intermediates`` instead.

Both return :class:`BlockOutputs`: per block a ``(B, N, C)`` tensor of patch tokens in raster order, plus its
token grid ``(h, w)``, so the analyses never guess shapes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ravit.errors import InvalidArgumentError

__all__ = [
    "BlockOutputs",
    "block_names",
    "block_outputs",
    "capture_outputs",
    "check_images",
    "expected_image_size",
    "input_channels",
    "patch_grid",
    "resolve_indices",
    "token_grid",
]

Method = Literal["auto", "intermediates", "hooks"]


@dataclass(frozen=True)
class BlockOutputs:
    """Patch tokens after each selected block: ``tokens[i]`` is (B, h*w, C) on grid ``grids[i] = (h, w)``."""

    names: list[str]
    tokens: list[torch.Tensor]
    grids: list[tuple[int, int]]


def block_names(model: nn.Module) -> list[str]:
    """Module names of the units the analyses index: ``blocks.{i}`` (ViT, FAN), else ``layers.{i}`` / ``stages.{i}``
    (hierarchical models such as Swin or ConvNeXt, whose ``forward_intermediates`` indexes stages)."""
    for attr in ("blocks", "layers", "stages"):
        units = getattr(model, attr, None)
        if isinstance(units, (nn.Sequential, nn.ModuleList)) and len(units) > 0:
            return [f"{attr}.{i}" for i in range(len(units))]
    raise InvalidArgumentError(
        f"{type(model).__name__} has no `blocks` (or `layers` / `stages`) sequence to analyse; pass the module names "
        "to analyse (names=['layer1', 'layer2'] here, --layers layer1 layer2 in the CLI)"
    )


def resolve_indices(n_blocks: int, indices: Sequence[int] | None) -> list[int]:
    """Block indices as non-negative ints (negative ones count from the end); None means all blocks."""
    if indices is None:
        return list(range(n_blocks))
    resolved = []
    for i in indices:
        j = i + n_blocks if i < 0 else i
        if not 0 <= j < n_blocks:
            raise InvalidArgumentError(f"block index {i} out of range for a model with {n_blocks} blocks")
        resolved.append(j)
    return resolved


def input_channels(model: nn.Module) -> int | None:
    """Input channels of the model's first convolution (its stem or patch embedding), None if it has none."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def expected_image_size(model: nn.Module) -> tuple[int, int] | None:
    """The (H, W) a model insists on, or None when it accepts any size (dynamic or convolutional models)."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or getattr(model, "dynamic_img_size", False):
        return None
    if getattr(patch_embed, "dynamic_img_size", False) or not getattr(patch_embed, "strict_img_size", False):
        return None
    size = getattr(patch_embed, "img_size", None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def check_images(model: nn.Module, images: torch.Tensor) -> None:
    """Raise ValueError unless ``images`` is a (B, C, H, W) batch the model accepts (channels, fixed size)."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise InvalidArgumentError(f"expected a non-empty image batch (B, C, H, W), got shape {tuple(images.shape)}")
    channels = input_channels(model)
    if channels is not None and images.shape[1] != channels:
        raise InvalidArgumentError(f"model expects {channels}-channel images, got {images.shape[1]} channels")
    size = expected_image_size(model)
    if size is not None and tuple(images.shape[-2:]) != size:
        raise InvalidArgumentError(
            f"model expects {size[0]}x{size[1]} images, got {images.shape[-2]}x{images.shape[-1]}; resize them first "
            "(`ravit analyze` resizes to the model's input size)"
        )


def patch_grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """The (h, w) patch-token grid a ViT-style model makes of ``images`` (from its patch embedding's stride)."""
    height, width = images.shape[-2], images.shape[-1]
    patch_embed = getattr(model, "patch_embed", None)
    if hasattr(patch_embed, "dynamic_feat_size"):
        return tuple(int(s) for s in patch_embed.dynamic_feat_size((height, width)))
    stride = getattr(model, "patch_size", None) or getattr(patch_embed, "patch_size", None)
    if stride is None:
        raise InvalidArgumentError(
            f"{type(model).__name__} has no patch_size / patch_embed to lay tokens out on the image")
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    return height // sh, width // sw


@contextlib.contextmanager
def capture_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named submodules while the block runs; the hooks are removed on exit.

    The dict is filled by each forward pass (the last call wins). A tuple output keeps its first element.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise InvalidArgumentError(f"{type(model).__name__} has no submodule(s) {missing}")
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name):
        def hook(module, args, output):
            captured[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def token_grid(n_tokens: int, image_hw: tuple[int, int], n_prefix: int) -> tuple[int, int, int]:
    """(prefix, h, w) with prefix + h*w == n_tokens and h/w matching the image's aspect ratio."""
    height, width = image_hw
    for prefix in dict.fromkeys((n_prefix, 0, 1)):
        n = n_tokens - prefix
        if n <= 0:
            continue
        w = round(math.sqrt(n * width / height))
        if w > 0 and n % w == 0 and (n // w) * width == w * height:
            return prefix, n // w, w
    raise InvalidArgumentError(f"cannot lay out {n_tokens} tokens as a grid for a {height}x{width} image")


def _to_tokens(output: torch.Tensor, model: nn.Module, image_hw: tuple[int, int]):
    if output.ndim == 4:  # (B, C, h, w) feature map
        return output.flatten(2).transpose(1, 2), (output.shape[-2], output.shape[-1])
    if output.ndim == 3:  # (B, prefix + h*w, C)
        prefix, h, w = token_grid(output.shape[1], image_hw, int(getattr(model, "num_prefix_tokens", 0)))
        return output[:, prefix:], (h, w)
    raise InvalidArgumentError(f"cannot read tokens from a block output of shape {tuple(output.shape)}")


@torch.no_grad()
def block_outputs(
    model: nn.Module,
    images: torch.Tensor,
    indices: Sequence[int] | None = None,
    method: Method = "auto",
    names: Sequence[str] | None = None,
) -> BlockOutputs:
    """Patch tokens after the selected blocks (all by default) for a batch of images, model in its current mode.

    Args:
        model: a timm/ravit model; ``forward_intermediates`` is used where it exists (``method='auto'``).
        images: (B, C, H, W) input batch, already normalised and of the size the model expects.
        indices: block indices (negative counts from the end); None for every block.
        method: 'intermediates', 'hooks', or 'auto' (intermediates when available, else hooks).
        names: module names to hook instead of ``blocks.{i}`` (implies ``method='hooks'``; ``indices`` then
            index into ``names``).
    """
    check_images(model, images)
    if names is not None:
        method = "hooks"
        all_names = list(names)
    else:
        all_names = block_names(model)
    take = resolve_indices(len(all_names), indices)
    if method == "auto":
        method = "intermediates" if hasattr(model, "forward_intermediates") and names is None else "hooks"
    image_hw = (images.shape[-2], images.shape[-1])
    if method == "intermediates":
        if not hasattr(model, "forward_intermediates"):
            raise InvalidArgumentError(f"{type(model).__name__} has no forward_intermediates; use method='hooks'")
        maps = model.forward_intermediates(images, indices=take, output_fmt="NCHW", intermediates_only=True)
        outputs = [_to_tokens(m, model, image_hw) for m in maps]
    elif method == "hooks":
        selected = [all_names[i] for i in take]
        with capture_outputs(model, selected) as captured:
            model(images)
        outputs = [_to_tokens(captured[n], model, image_hw) for n in selected]
    else:
        raise InvalidArgumentError(f"unknown method {method!r}; expected 'auto', 'intermediates' or 'hooks'")
    return BlockOutputs(
        names=[all_names[i] for i in take],
        tokens=[tokens.float() for tokens, _ in outputs],
        grids=[tuple(int(s) for s in grid) for _, grid in outputs],
    )
