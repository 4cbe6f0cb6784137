"""Token grouping spectra: how many groups a block's output tokens form (FAN paper, Sec. 3 / Fig. 3 analysis).

The FAN paper counts the "significant eigenvalues" of the tokens' affinity per block and reads a drop in the middle
layers as tokens grouping. Its exact affinity and threshold were never published (no code: NVlabs/FAN issues #3,
#28), so **the definition below is ours**, chosen from standard spectral clustering (Ng, Jordan & Weiss 2002):

1. Tokens are L2-normalised, so only their directions matter (a block's output norm varies a lot with depth).
2. Affinity (``kind='gaussian'``, default): ``W_ij = exp(-||z_i - z_j||^2 / (2 * bandwidth)) = exp((cos_ij - 1) /
   bandwidth)``, the Gaussian kernel on the unit sphere. ``kind='cosine'`` uses ``max(cos_ij, 0)`` instead.
3. Normalised affinity ``D^-1/2 W D^-1/2`` (D = row sums). Its largest eigenvalue is 1 and it has one eigenvalue
   near 1 per well-separated group of tokens (the spectrum of a block-diagonal affinity), so
4. the number of *significant* eigenvalues is the count of eigenvalues >= ``threshold`` * the largest.

With the defaults (bandwidth 0.1, threshold 0.5) k tight, well-separated clusters give exactly k, unrelated tokens
(cosine near 0) give about N, identical tokens give 1. Both parameters are exposed; compare models only under the
same setting.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ravit.analysis.features import Method, block_outputs
from ravit.errors import InvalidArgumentError

__all__ = [
    "Affinity",
    "affinity_spectrum",
    "count_significant",
    "grouping_spectra",
    "normalized_affinity",
    "significant_eigenvalues",
    "token_affinity",
]

Affinity = Literal["gaussian", "cosine"]


def token_affinity(tokens: torch.Tensor, kind: Affinity = "gaussian", bandwidth: float = 0.1) -> torch.Tensor:
    """Affinity of L2-normalised tokens: (..., N, C) -> (..., N, N), symmetric, non-negative, unit diagonal."""
    z = F.normalize(tokens.double(), dim=-1)
    cos = (z @ z.transpose(-1, -2)).clamp(-1.0, 1.0)  # (..., N, N)
    if kind == "gaussian":
        if bandwidth <= 0:
            raise InvalidArgumentError(f"bandwidth must be positive, got {bandwidth}")
        return torch.exp((cos - 1.0) / bandwidth)
    if kind == "cosine":
        return cos.clamp_min(0.0)
    raise InvalidArgumentError(f"unknown affinity {kind!r}; expected 'gaussian' or 'cosine'")


def normalized_affinity(affinity: torch.Tensor) -> torch.Tensor:
    """``D^-1/2 W D^-1/2`` for an affinity W (..., N, N) with positive row sums D."""
    inv_sqrt = affinity.sum(-1).clamp_min(torch.finfo(affinity.dtype).tiny).rsqrt()  # (..., N)
    return inv_sqrt[..., :, None] * affinity * inv_sqrt[..., None, :]


def affinity_spectrum(tokens: torch.Tensor, kind: Affinity = "gaussian", bandwidth: float = 0.1) -> torch.Tensor:
    """Eigenvalues of the normalised token affinity, largest first: (..., N, C) -> (..., N)."""
    matrix = normalized_affinity(token_affinity(tokens, kind, bandwidth))
    return torch.linalg.eigvalsh(matrix).flip(-1)


def count_significant(eigenvalues: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Number of eigenvalues >= ``threshold`` times the largest one, per row of (..., N) sorted descending."""
    if not 0 < threshold <= 1:
        raise InvalidArgumentError(f"threshold must be in (0, 1], got {threshold}")
    return (eigenvalues >= threshold * eigenvalues[..., :1]).sum(-1)


def significant_eigenvalues(
    tokens: torch.Tensor, threshold: float = 0.5, kind: Affinity = "gaussian", bandwidth: float = 0.1
) -> torch.Tensor:
    """Number of significant eigenvalues of each token set's normalised affinity: (..., N, C) -> (...,) long."""
    return count_significant(affinity_spectrum(tokens, kind, bandwidth), threshold)


@torch.no_grad()
def grouping_spectra(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    threshold: float = 0.5,
    kind: Affinity = "gaussian",
    bandwidth: float = 0.1,
    indices: Sequence[int] | None = None,
    method: Method = "auto",
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Significant-eigenvalue counts of every selected block's output tokens, for every image of ``batches``.

    Returns ``{block name: (n_images,) long tensor}`` in block order; average over images for the paper's curve.
    The model is used in its current mode (call ``model.eval()`` first for deterministic numbers).
    """
    counts: dict[str, list[torch.Tensor]] = {}
    for images in batches:
        outputs = block_outputs(model, images, indices=indices, method=method, names=names)
        for name, tokens in zip(outputs.names, outputs.tokens, strict=True):
            counts.setdefault(name, []).append(significant_eigenvalues(tokens, threshold, kind, bandwidth).cpu())
    if not counts:
        raise InvalidArgumentError("no images to analyse")
    return {name: torch.cat(values) for name, values in counts.items()}
