"""Part 1 of the study, FAN's robustness claim (Zhou et al., ICML 2022, Sec. 5, Table 8): both models under the
ImageNet-C corruptions on the same images; mean corruption accuracy, retention, and the mCE with the ViT as the
normalising baseline (Hendrycks & Dietterich 2019 normalise by AlexNet; below 100% = more robust than the ViT)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ravit.robustness.evaluate import ModelInput, evaluate_corruptions, image_dataset
from ravit.robustness.metrics import mce, mean_accuracy
from ravit.robustness.registry import BENCHMARK_CORRUPTIONS

__all__ = ["measure_robustness"]


def measure_robustness(models: dict[str, nn.Module], labels: dict[str, str], limit: int, corruptions: Sequence[str],
               severities: Sequence[int], out: Path, progress: bool, device: torch.device) -> dict:
    """``{model name: row}`` for every model of ``models`` (the first is the ViT, the mCE's baseline); each model's
    counts go to ``out/robustness/<name>/``. ``labels`` name the models on the progress bars."""
    results = {}
    for name, model in models.items():
        spec = ModelInput.from_model(model)
        result = evaluate_corruptions(
            model, image_dataset("fashion-mnist", spec), corruptions=corruptions, severities=severities,
            name=labels[name], limit=limit, device=device, progress=progress,
        )
        result = dataclasses.replace(result, model=name)
        result.save(out / "robustness" / name, plots=False)  # the study draws both models in one figure
        results[name] = result
    vit_name = next(iter(models))
    benchmark = [c for c in corruptions if c in BENCHMARK_CORRUPTIONS]
    # On a small run the ViT can make no error on a corruption; the ratio is then undefined and reported as None.
    vit_err = {c: 1 - mean_accuracy(results[vit_name].accuracy, [c]) for c in benchmark}
    mce_defined = bool(benchmark) and all(err > 0 for err in vit_err.values())
    rows = {}
    for name, result in results.items():
        clean = result.clean_accuracy
        mean_benchmark = mean_accuracy(result.accuracy, benchmark) if benchmark else None
        rows[name] = {
            "clean_accuracy": clean,
            "mean_corruption_accuracy": mean_accuracy(result.accuracy, corruptions),
            "mean_corruption_accuracy_15": mean_benchmark,
            "retention_15": mean_benchmark / clean if mean_benchmark is not None and clean > 0 else None,
            "mce_vs_vit_15": mce(result.accuracy, baseline=vit_err) if mce_defined else None,
            "per_corruption": {c: mean_accuracy(result.accuracy, [c]) for c in corruptions},
            "per_severity": {str(s): sum(result.accuracy[c][s] for c in corruptions) / len(corruptions)
                             for s in severities},
        }
    return rows
