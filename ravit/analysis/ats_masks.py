"""Which tokens ATS keeps: per-block masks over the image, kept-token histograms and per-image GMACs.

ATS (Fayyaz et al., ECCV 2022, Sec. 3 and the "# tokens per stage" figure of its poster) keeps a per-image number of
tokens in every ATS block; the paper explains its accuracy by *which* tokens survive. Everything here reads
``ravit.ats.trace(model, images)`` (a model with ATS applied): ``.kept_tokens`` (B, n_ats_blocks) counting prefix
tokens, ``.kept_indices`` (per ATS block, per image: original patch indices kept) and ``.gmacs`` (B,).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ravit.analysis.features import check_images, patch_grid
from ravit.ats import trace
from ravit.errors import InvalidArgumentError

__all__ = ["ATSStatistics", "ats_statistics", "ats_token_masks", "kept_token_masks", "kept_token_histogram"]


def _block_labels(result) -> list[str]:
    return [f"blocks.{int(b)}" for b in result.blocks]


def kept_token_masks(kept_indices: Sequence[Sequence[torch.Tensor]], grid: tuple[int, int]) -> torch.Tensor:
    """Boolean masks (n_blocks, B, h, w) of the patches kept, from per-block, per-image patch indices (raster)."""
    h, w = grid
    masks = torch.zeros(len(kept_indices), len(kept_indices[0]) if kept_indices else 0, h * w, dtype=torch.bool)
    for j, per_image in enumerate(kept_indices):
        if len(per_image) != masks.shape[1]:
            raise InvalidArgumentError(f"ATS block {j} lists {len(per_image)} images, block 0 lists {masks.shape[1]}")
        for b, indices in enumerate(per_image):
            indices = torch.as_tensor(indices, dtype=torch.long).cpu()
            if len(indices) and (indices.min() < 0 or indices.max() >= h * w):
                raise InvalidArgumentError(f"ATS block {j}, image {b}: patch index outside the {h}x{w} grid")
            masks[j, b, indices] = True
    return masks.reshape(masks.shape[0], masks.shape[1], h, w)


def kept_token_histogram(kept_tokens: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """Counts (n_blocks, max_tokens + 1): how many images kept t tokens in each block, from (n_images, n_blocks)."""
    if kept_tokens.numel() and (kept_tokens.min() < 0 or kept_tokens.max() > max_tokens):
        raise InvalidArgumentError(f"kept-token counts must lie in [0, {max_tokens}]")
    return torch.stack([torch.bincount(column, minlength=max_tokens + 1) for column in kept_tokens.long().T.cpu()])


@torch.no_grad()
def ats_token_masks(model: nn.Module, images: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """(ATS block labels, boolean masks (n_ats_blocks, B, h, w) of the patches each block keeps)."""
    check_images(model, images)
    result = trace(model, images, count_gmacs=False)
    masks = kept_token_masks(result.kept_indices, patch_grid(model, images))
    return _block_labels(result), masks


@dataclass(frozen=True)
class ATSStatistics:
    """Per-image ATS numbers over a dataset: ``kept_tokens`` (n_images, n_blocks) with prefix tokens, ``gmacs``."""

    blocks: list[str]
    kept_tokens: torch.Tensor
    gmacs: torch.Tensor
    max_tokens: int


@torch.no_grad()
def ats_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> ATSStatistics:
    """Kept tokens per ATS block and GMACs for every image of ``batches``."""
    kept, gmacs, labels, max_tokens = [], [], None, 0
    for images in batches:
        check_images(model, images)
        result = trace(model, images, count_gmacs=True)
        kept.append(torch.as_tensor(result.kept_tokens).long().cpu())
        gmacs.append(torch.as_tensor(result.gmacs).float().cpu())
        h, w = patch_grid(model, images)
        max_tokens = max(max_tokens, h * w + int(getattr(model, "num_prefix_tokens", 0)))
        labels = labels or _block_labels(result)
    if not kept:
        raise InvalidArgumentError("no images to analyse")
    return ATSStatistics(labels, torch.cat(kept), torch.cat(gmacs), max_tokens)
