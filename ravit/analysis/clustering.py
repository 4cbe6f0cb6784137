"""k-way spectral clustering of one block's tokens, shown as a mask over the image (FAN paper, Fig. 1/4 style).

The FAN maintainers describe their figures as spectral clustering of each block's output tokens with
``n_clusters=2`` (NVlabs/FAN issue #3); their code was never released, so the details are ours: the affinity of
:mod:`ravit.analysis.spectra`, the Ng-Jordan-Weiss embedding (top-k eigenvectors of ``D^-1/2 W D^-1/2``, rows
L2-normalised) and k-means on it. Cluster ids carry no meaning (no foreground/background), so they are relabelled by
size: 0 is the largest cluster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ravit.analysis.features import Method, block_outputs
from ravit.analysis.spectra import Affinity, normalized_affinity, token_affinity
from ravit.errors import InvalidArgumentError

__all__ = ["cluster_masks", "kmeans", "labels_to_mask", "spectral_clustering", "spectral_embedding"]


def spectral_embedding(tokens: torch.Tensor, k: int, kind: Affinity = "gaussian", bandwidth: float = 0.1):
    """Rows of the top-k eigenvectors of the normalised affinity, L2-normalised: (N, C) -> (N, k)."""
    _, vectors = torch.linalg.eigh(normalized_affinity(token_affinity(tokens, kind, bandwidth)))  # ascending
    return F.normalize(vectors[:, -k:], dim=1)  # (N, k)


def kmeans(points: torch.Tensor, k: int, iterations: int = 100) -> torch.Tensor:
    """Labels (N,) of Lloyd's k-means on (N, D) points, deterministic farthest-point initialisation.

    Written here because this tiny loop is all we need and scikit-learn is not a dependency.
    """
    n = points.shape[0]
    if not 1 <= k <= n:
        raise InvalidArgumentError(f"k must be in [1, {n}] for {n} points, got {k}")
    centres = [points[0]]
    for _ in range(1, k):
        dist = torch.cdist(points, torch.stack(centres)).min(dim=1).values  # (N,)
        centres.append(points[int(dist.argmax())])
    centres = torch.stack(centres)  # (k, D)
    labels = torch.cdist(points, centres).argmin(dim=1)
    for _ in range(iterations):
        for j in range(k):
            members = points[labels == j]
            if len(members):
                centres[j] = members.mean(dim=0)
        new_labels = torch.cdist(points, centres).argmin(dim=1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def _relabel_by_size(labels: torch.Tensor, k: int) -> torch.Tensor:
    sizes = torch.bincount(labels, minlength=k)
    order = sorted(range(k), key=lambda j: (-int(sizes[j]), j))
    mapping = torch.empty(k, dtype=torch.long)
    mapping[torch.tensor(order)] = torch.arange(k)
    return mapping[labels]


def spectral_clustering(
    tokens: torch.Tensor, k: int = 2, kind: Affinity = "gaussian", bandwidth: float = 0.1
) -> torch.Tensor:
    """Cluster labels of each token set: (B, N, C) -> (B, N) long in [0, k), 0 = the largest cluster."""
    if tokens.ndim != 3:
        raise InvalidArgumentError(f"expected tokens (B, N, C), got shape {tuple(tokens.shape)}")
    labels = []
    for image_tokens in tokens.cpu():
        embedding = spectral_embedding(image_tokens, k, kind, bandwidth)
        labels.append(_relabel_by_size(kmeans(embedding, k), k))
    return torch.stack(labels)


def labels_to_mask(labels: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int] | None = None):
    """Token labels (B, h*w) in raster order -> (B, h, w), or (B, H, W) nearest-upsampled to ``image_size``."""
    h, w = grid
    if labels.shape[-1] != h * w:
        raise InvalidArgumentError(f"{labels.shape[-1]} labels do not fill a {h}x{w} grid")
    mask = labels.reshape(-1, h, w)
    if image_size is None:
        return mask
    return F.interpolate(mask[:, None].float(), size=image_size, mode="nearest")[:, 0].to(labels.dtype)


@torch.no_grad()
def cluster_masks(
    model: nn.Module,
    images: torch.Tensor,
    block: int = -1,
    k: int = 2,
    kind: Affinity = "gaussian",
    bandwidth: float = 0.1,
    method: Method = "auto",
) -> torch.Tensor:
    """k-way spectral clustering of block ``block``'s output tokens, as (B, H, W) label masks over the images."""
    outputs = block_outputs(model, images, indices=[block], method=method)
    labels = spectral_clustering(outputs.tokens[0], k, kind, bandwidth)
    return labels_to_mask(labels, outputs.grids[0], (images.shape[-2], images.shape[-1]))
