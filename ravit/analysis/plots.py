"""Figures for the analyses (matplotlib): every figure titled, axes labelled, maps with a colour bar.

Figures are built as ``matplotlib.figure.Figure`` objects rendered by the Agg canvas, without pyplot, so importing
this module never changes the user's matplotlib backend or global state. Each function writes one PNG through a
temporary file (never half-written) and returns its path.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from ravit.outputs import write_bytes

__all__ = ["plot_block_curves", "plot_histogram", "plot_image_maps", "plot_token_histogram"]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return write_bytes(path, buffer.getvalue())


def _display(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """A (C, H, W) model input as something imshow shows: min-max scaled, gray or RGB."""
    image = image.detach().float().cpu()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    if image.shape[0] == 1:
        return image[0].numpy(), "gray"
    return image[:3].permute(1, 2, 0).numpy(), None


def plot_block_curves(
    path: str | os.PathLike,
    series: Mapping[str, tuple[Sequence[float], Sequence[float] | None]],
    block_labels: Sequence[str],
    ylabel: str,
    title: str,
    xlabel: str = "block",
    log_y: bool = False,
) -> Path:
    """One line per series over the blocks: ``series[label] = (means, stds or None)`` (error bars = 1 std)."""
    fig = _figure(max(5.0, 0.45 * len(block_labels) + 2), 3.6)
    ax = fig.subplots()
    x = np.arange(len(block_labels))
    for label, (means, stds) in series.items():
        ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xticks(x, block_labels, rotation=45 if len(block_labels) > 6 else 0, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if any(series):
        ax.legend()
    return _save(fig, path)


def plot_image_maps(
    path: str | os.PathLike,
    images: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    title: str,
    colorbar_label: str,
    num_classes: int | None = None,
    column_titles: Sequence[str] | None = None,
) -> Path:
    """Input images (top row) and one row per entry of ``maps`` ((B, h, w) each) overlaid on them.

    ``num_classes`` switches to a discrete colour map with one colour per label (cluster ids); otherwise each row
    shares one continuous scale. Maps are stretched over the image (nearest neighbour, one cell per token).
    """
    n_images = images.shape[0]
    rows = ["input", *maps]
    fig = _figure(2.2 * n_images + 1.2, 2.2 * len(rows))
    axes = fig.subplots(len(rows), n_images, squeeze=False)
    height, width = images.shape[-2], images.shape[-1]
    extent = (0, width, height, 0)
    if num_classes is not None:
        cmap = ListedColormap(colormaps["tab10"].colors[: max(num_classes, 1)])
        norm = BoundaryNorm(np.arange(-0.5, num_classes + 0.5), cmap.N)
    for b in range(n_images):
        shown, gray = _display(images[b])
        axes[0, b].imshow(shown, cmap=gray, extent=extent)
        if column_titles is not None:
            axes[0, b].set_title(column_titles[b], fontsize=8)
    for r, (label, values) in enumerate(maps.items(), start=1):
        values = values.detach().float().cpu().numpy()
        if num_classes is None:
            kwargs = dict(cmap="inferno", vmin=float(values.min()), vmax=float(values.max()))
        else:
            kwargs = dict(cmap=cmap, norm=norm)
        for b in range(n_images):
            shown, gray = _display(images[b])
            axes[r, b].imshow(shown, cmap=gray, extent=extent)
            im = axes[r, b].imshow(values[b], alpha=0.65, extent=extent, interpolation="nearest", **kwargs)
        axes[r, 0].set_ylabel(label, fontsize=8)
        bar = fig.colorbar(im, ax=list(axes[r]), fraction=0.025, pad=0.01)
        bar.set_label(colorbar_label, fontsize=8)
        if num_classes is not None:
            bar.set_ticks(range(num_classes))
    axes[0, 0].set_ylabel("input", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[-1]:
        ax.set_xlabel("x (pixels)", fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_token_histogram(
    path: str | os.PathLike, histogram: torch.Tensor, block_labels: Sequence[str], title: str
) -> Path:
    """Heat map of (n_blocks, max_tokens + 1) counts: images that kept t tokens in each block."""
    counts = histogram.detach().cpu().numpy()
    used = np.nonzero(counts.sum(0))[0]
    lo, hi = (int(used.min()), int(used.max())) if len(used) else (0, counts.shape[1] - 1)
    lo, hi = max(lo - 1, 0), min(hi + 1, counts.shape[1] - 1)
    fig = _figure(7, 0.35 * len(block_labels) + 1.8)
    ax = fig.subplots()
    im = ax.imshow(
        counts[:, lo : hi + 1], aspect="auto", cmap="viridis", interpolation="nearest",
        extent=(lo - 0.5, hi + 0.5, len(block_labels) - 0.5, -0.5),
    )
    ax.set_yticks(range(len(block_labels)), block_labels)
    ax.set_xlabel("tokens kept (class token included)")
    ax.set_ylabel("ATS block")
    ax.set_title(title)
    fig.colorbar(im, ax=ax).set_label("images")
    return _save(fig, path)


def plot_histogram(path: str | os.PathLike, values: torch.Tensor, xlabel: str, title: str, bins: int = 30) -> Path:
    """Histogram of per-image values (e.g. GMACs), with the mean marked."""
    data = values.detach().float().cpu().numpy()
    fig = _figure(5.5, 3.6)
    ax = fig.subplots()
    ax.hist(data, bins=bins, color="tab:blue", alpha=0.8)
    ax.axvline(float(data.mean()), color="tab:red", linestyle="--", label=f"mean {data.mean():.4g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)
