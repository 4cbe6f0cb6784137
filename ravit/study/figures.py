"""The study's figures: FAN vs ViT robustness side by side, accuracy vs GMACs for every token-reduction setting,
grouping and perturbation per block for both models, and a one-page summary with the claims table.

Built on ``matplotlib.figure.Figure`` without pyplot (as :mod:`ravit.analysis.plots`), saved atomically.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ravit.outputs import atomic_open
from ravit.study.reduction import FAN_METHODS, METHODS

__all__ = ["plot_grouping", "plot_reduction", "plot_robustness", "plot_summary"]

_MARKERS = {"dense": "*", "ats": "o", "ats_single": "^", "topk_single": "v", "ats_attention": "D", "random": "x",
            "tome": "s", "ats_fused_linear": "P", "ats_flat_fused": "X", "ats_redundant_fused": "d",
            "ats_finetuned": "h"}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    return path


def plot_robustness(summary: dict, path: Path) -> Path:
    """Left: accuracy per corruption (mean over severities), the models' bars side by side, clean first. Right:
    mean accuracy over the corruptions against severity (0 = clean)."""
    names, labels = list(summary["robustness"]), summary["labels"]
    corruptions = list(summary["robustness"][names[0]]["per_corruption"])
    fig = Figure(figsize=(max(9.0, 0.5 * len(corruptions) + 5), 4.2))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(corruptions) + 1)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        r = summary["robustness"][name]
        values = [r["clean_accuracy"], *(r["per_corruption"][c] for c in corruptions)]
        left.bar(x + (i - (len(names) - 1) / 2) * width, [100 * v for v in values], width, label=labels[name])
        severities = [0, *(int(s) for s in r["per_severity"])]
        right.plot(severities, [100 * r["clean_accuracy"], *(100 * v for v in r["per_severity"].values())],
                   marker="o", label=labels[name])
    left.set_xticks(x, ["clean", *(c.replace("_", " ") for c in corruptions)], rotation=60, ha="right")
    left.set_ylabel("top-1 accuracy (%)")
    left.set_title("Accuracy per corruption (mean over severities)")
    left.legend()
    left.grid(axis="y", alpha=0.3)
    right.set_xlabel("severity (0 = clean)")
    right.set_ylabel("mean accuracy over the corruptions (%)")
    right.set_title("Accuracy vs severity")
    right.grid(alpha=0.3)
    right.legend()
    n = summary["settings"]["corruption_images"]
    fig.suptitle(f"FAN vs ViT under corruptions (Fashion-MNIST test, first {n} images)")
    fig.tight_layout()
    return _save(fig, path)


def _reduction_panel(ax, red: dict, names: dict[str, str], model: str) -> None:
    """One sweep's accuracy against GMACs / dense, each point labelled with its setting."""
    for method, name in names.items():
        points = sorted((r["gmacs_ratio"], 100 * r["accuracy"], r["setting"]) for r in red["rows"]
                        if r["method"] == method)
        if not points:
            continue
        g, a, s = zip(*points, strict=True)
        style = dict(marker=_MARKERS[method], label=name)
        if method == "dense":
            ax.scatter(g, a, s=160, color="k", zorder=3, **style)
            continue
        line = ax.plot(g, a, linestyle="-" if method not in ("random", "ats_attention") else ":", **style)[0]
        for gi, ai, si in zip(g, a, s, strict=True):
            ax.annotate(si, (gi, ai), textcoords="offset points", xytext=(4, 3), fontsize=7, color=line.get_color())
    ax.set_xlabel(f"GMACs per image / dense {model}")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def plot_reduction(summary: dict, path: Path) -> Path:
    """Accuracy against GMACs / dense for every method, each point labelled with its budget (K per ATS block, the
    final budget for fused + linear, r for ToMe): the ViT's sweep, and the FAN's beside it."""
    labels, roles = summary["labels"], summary["roles"]
    fig = Figure(figsize=(16.0, 6.0))
    left, right = fig.subplots(1, 2)
    _reduction_panel(left, summary["token_reduction"], METHODS, "ViT")
    left.set_title(f"Token reduction on the {labels[roles['vit']]} (ATS §4)", fontsize=10)
    _reduction_panel(right, summary["token_reduction_fan"], FAN_METHODS, "FAN")
    right.set_title(f"Token reduction on the {labels[roles['fan']]} (ravit's ATS and ToMe on FAN)", fontsize=10)
    fig.suptitle(f"Fashion-MNIST test, first {summary['token_reduction']['images']} images, no fine-tuning unless "
                 f"named; labels: budget K per ATS block (→K: tokens left at the end), r for ToMe", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_grouping(summary: dict, path: Path) -> Path:
    """Significant eigenvalues and relative perturbation per block (numbered from 1, as in the tables), both
    models, with the direction that means more grouping / more robustness written on each axis."""
    fig = Figure(figsize=(11.0, 4.0))
    axes = fig.subplots(1, 2)
    for ax, key, ylabel, title in (
        (axes[0], "significant_eigenvalues", "significant eigenvalues (lower = more grouping)",
         "Token grouping per block (ravit's eigenvalue count)"),
        (axes[1], "relative_perturbation", "‖f(x+δ) − f(x)‖ / ‖f(x)‖ (lower = more stable)",
         "Output change under Gaussian input noise"),
    ):
        for name, r in summary["grouping"].items():
            values = list(r[key].values())
            ax.plot(range(1, len(values) + 1), values, marker="o", label=summary["labels"][name])
        ax.set_xlabel("block (1 = first)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_summary(summary: dict, path: Path) -> Path:
    """One page: the claims table (claim, measured, verdict)."""
    rows = summary["claims"]
    wrapped = [(textwrap.fill(c["claim"], 60), textwrap.fill(c["measured"], 78), "yes" if c["holds"] else "no")
               for c in rows]
    heights = [max(t.count("\n") for t in row) + 1 for row in wrapped]
    fig = Figure(figsize=(15.0, 1.0 + 0.19 * sum(heights) + 0.12 * len(rows)))
    ax = fig.subplots()
    ax.axis("off")
    table = ax.table(cellText=[list(r) for r in wrapped], colLabels=["claim", "measured", "holds"],
                     colWidths=[0.38, 0.52, 0.1], loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7.5)
    total = sum(heights) + len(rows) + 1
    for (i, j), cell in table.get_celld().items():
        lines = 1 if i == 0 else heights[i - 1]
        cell.set_height((lines + 0.6) / total)
        if i > 0 and j == 2:
            cell.set_facecolor("#d8f0d8" if rows[i - 1]["holds"] else "#f6d5d5")
    pair = " vs ".join(summary["labels"][summary["roles"][r]] for r in ("vit", "fan"))
    ax.set_title(f"ravit study: {pair} on Fashion-MNIST — "
                 f"{sum(c['holds'] for c in rows)} of {len(rows)} claims hold", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
