"""Robustness metrics: mean corruption accuracy, mCE, relative mCE, retention.

Definitions follow Hendrycks & Dietterich (ICLR 2019, Sec. 4): for corruption c with top-1 error E_{s,c} at
severity s, ``CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}`` and ``mCE`` is the mean of CE_c over the 15 benchmark
corruptions; ``relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^AlexNet_{s,c} - E^AlexNet_clean)``. The AlexNet
errors below are already averaged over the five severities (the table in FAN's ``utils/mce_utils.py`` and AugMix,
from hendrycks/robustness), so sums over severities become means. FAN's "IN-C" column is the *mean accuracy*, not
100 - mCE (FAN README, NVlabs/FAN#10): we report both, labelled, over the 15 and over all 19 corruptions.

All accuracies and errors are fractions in [0, 1]; ``accuracy`` maps corruption -> severity -> top-1.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ravit.errors import InvalidArgumentError
from ravit.robustness.registry import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS

__all__ = [
    "ALEXNET_ERR",
    "ALEXNET_CLEAN_ERR",
    "mean_accuracy",
    "corruption_errors",
    "mce",
    "relative_mce",
    "retention",
    "summarize",
]

ALEXNET_ERR: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
# Clean top-1 error of torchvision's AlexNet (top-1 56.522 %), the network of the paper's normalisation (43.5 %).
ALEXNET_CLEAN_ERR = 0.43478

Accuracy = Mapping[str, Mapping[int, float]]


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        raise InvalidArgumentError("no values to average")
    return sum(values) / len(values)


def mean_accuracy(accuracy: Accuracy, names: Iterable[str] | None = None) -> float:
    """Mean top-1 over the given corruptions (default: all present) and all their severities (each corruption
    weighs the same)."""
    names = [n for n in (names or accuracy) if n in accuracy]
    return _mean(_mean(accuracy[n].values()) for n in names)


def corruption_errors(accuracy: Accuracy, baseline: Mapping[str, float] = ALEXNET_ERR) -> dict[str, float]:
    """CE_c = mean_s (1 - acc_{s,c}) / baseline[c] for every corruption present in both."""
    return {c: _mean(1 - a for a in accuracy[c].values()) / baseline[c] for c in baseline if c in accuracy}


def mce(accuracy: Accuracy, baseline: Mapping[str, float] = ALEXNET_ERR) -> float:
    """Mean corruption error over the baseline's corruptions that were evaluated (all 15 for the standard mCE)."""
    ce = corruption_errors(accuracy, baseline)
    if not ce:
        raise InvalidArgumentError(f"mCE needs at least one of: {', '.join(baseline)}")
    return _mean(ce.values())


def relative_mce(
    accuracy: Accuracy,
    clean_accuracy: float,
    baseline: Mapping[str, float] = ALEXNET_ERR,
    baseline_clean_err: float = ALEXNET_CLEAN_ERR,
) -> float:
    """Mean over corruptions of (mean_s E_{s,c} - E_clean) / (E^AlexNet_c - E^AlexNet_clean)."""
    clean_err = 1 - clean_accuracy
    rel = [
        (_mean(1 - a for a in accuracy[c].values()) - clean_err) / (baseline[c] - baseline_clean_err)
        for c in baseline
        if c in accuracy
    ]
    if not rel:
        raise InvalidArgumentError(f"relative mCE needs at least one of: {', '.join(baseline)}")
    return _mean(rel)


def retention(accuracy: Accuracy, clean_accuracy: float) -> dict[str, dict[int, float]]:
    """Corrupted / clean accuracy per corruption and severity."""
    if clean_accuracy <= 0:
        raise InvalidArgumentError("retention needs a positive clean accuracy")
    return {c: {s: a / clean_accuracy for s, a in sev.items()} for c, sev in accuracy.items()}


def summarize(accuracy: Accuracy, clean_accuracy: float | None = None) -> dict[str, object]:
    """Every headline number, each labelled with the corruptions it covers (``None`` where not computable)."""
    std = [c for c in BENCHMARK_CORRUPTIONS if c in accuracy]
    every = [c for c in ALL_CORRUPTIONS if c in accuracy] + [c for c in accuracy if c not in ALL_CORRUPTIONS]
    out: dict[str, object] = {
        "clean_accuracy": clean_accuracy,
        "mean_corruption_accuracy_15": mean_accuracy(accuracy, std) if std else None,
        "mean_corruption_accuracy_all": mean_accuracy(accuracy, every) if every else None,
        "mce": mce(accuracy) if std else None,
        "relative_mce": relative_mce(accuracy, clean_accuracy) if std and clean_accuracy is not None else None,
        "corruption_errors": corruption_errors(accuracy),
        "corruptions_in_15": std,
        "corruptions_in_all": every,
        "complete_15": len(std) == len(BENCHMARK_CORRUPTIONS) and all(len(accuracy[c]) == 5 for c in std),
    }
    if clean_accuracy:
        ret = retention(accuracy, clean_accuracy)
        out["retention"] = ret
        out["mean_retention_all"] = mean_accuracy(ret, every) if every else None
    return out
