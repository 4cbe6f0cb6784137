"""Robustness metrics: mean corruption accuracy, mCE, relative mCE, retention.

Definitions follow Hendrycks & Dietterich (ICLR 2019, Sec. 4): for corruption c with top-1 error E_{s,c} at
severity s, ``CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}`` and ``mCE`` is the mean of CE_c over the 15 benchmark
corruptions; ``relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean)``. The paper's
baseline is AlexNet on ImageNet-C; its errors below are already averaged over the five severities (the table in
FAN's ``utils/mce_utils.py`` and AugMix, from hendrycks/robustness), so sums over severities become means and an
mCE over fewer than the five severities is not the published metric. Any other model's results can be the baseline
(``Baseline.from_results``): its errors are kept per severity, so it normalises exactly the severities evaluated.
FAN's "IN-C" column is the *mean accuracy*, not 100 - mCE (FAN README, NVlabs/FAN#10): we report both, labelled,
over the 15 and over all 19 corruptions.

A CE whose baseline error is 0 (or, for the relative CE, no higher than the baseline's clean error) is undefined:
``mce`` raises a clear error and ``summarize`` reports ``None`` with the reason, never a division by zero.

All accuracies and errors are fractions in [0, 1]; ``accuracy`` maps corruption -> severity -> top-1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ravit.errors import DataError, InvalidArgumentError, MissingFileError
from ravit.robustness.registry import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS, SEVERITIES

__all__ = [
    "ALEXNET",
    "ALEXNET_ERR",
    "ALEXNET_CLEAN_ERR",
    "Baseline",
    "mean_accuracy",
    "corruption_errors",
    "mce",
    "mce_summary",
    "relative_mce",
    "resolve_baseline",
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


@dataclass(frozen=True)
class Baseline:
    """The errors an mCE divides by: per corruption either one error averaged over severities 1-5 (the AlexNet
    table) or a mapping severity -> error (another model's results), and optionally the clean error."""

    name: str
    errors: Mapping[str, float | Mapping[int, float]]
    clean_error: float | None = None

    def error(self, corruption: str, severities: Iterable[int]) -> float:
        """Mean baseline error of ``corruption`` over ``severities`` (a 1-5 mean when only that is known)."""
        err = self.errors[corruption]
        if not isinstance(err, Mapping):
            return float(err)
        severities = list(severities)
        missing = [s for s in severities if s not in err]
        if missing:
            raise InvalidArgumentError(
                f"the mCE baseline {self.name} has no {corruption} error at severity "
                f"{', '.join(map(str, missing))}; evaluate the baseline at the same severities"
            )
        return _mean(err[s] for s in severities)

    def matches(self, corruption: str, severities: Iterable[int]) -> bool:
        """Whether the baseline error of ``corruption`` covers exactly ``severities`` (a table mean covers 1-5)."""
        return isinstance(self.errors[corruption], Mapping) or sorted(severities) == list(SEVERITIES)

    @classmethod
    def from_results(cls, path: str | os.PathLike) -> Baseline:
        """Another model's ``robustness.json`` (``ravit robustness``) as a baseline, errors kept per severity."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"mCE baseline results not found: {path} (expected a robustness.json)")
        try:
            data = json.loads(path.read_text())
            accuracy = data["accuracy"]
            errors = {c: {int(s): 1 - float(a) for s, a in sev.items()} for c, sev in accuracy.items()}
            clean = data.get("clean")
            clean_error = 1 - clean["correct"] / clean["total"] if clean and clean.get("total") else None
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as err:
            raise DataError(f"{path}: not a ravit robustness.json ({type(err).__name__}: {err})") from None
        if not errors:
            raise DataError(f"{path}: holds no corruption results to use as an mCE baseline")
        return cls(f"{data.get('model', 'model')} ({path})", errors, clean_error)


ALEXNET = Baseline("AlexNet (ImageNet-C table)", ALEXNET_ERR, ALEXNET_CLEAN_ERR)


def resolve_baseline(spec: str | os.PathLike | Baseline | Mapping[str, float] | None) -> Baseline:
    """``None`` / ``'alexnet'``: the AlexNet table; a path: a ``robustness.json``; a mapping: errors per corruption
    averaged over severities 1-5 (named 'custom')."""
    if spec is None or (isinstance(spec, str) and spec.lower() == "alexnet"):
        return ALEXNET
    if isinstance(spec, Baseline):
        return spec
    if isinstance(spec, Mapping):
        return Baseline("custom", spec)
    return Baseline.from_results(spec)


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


def _covered(accuracy: Accuracy, baseline: Baseline) -> list[str]:
    """The corruptions an mCE averages: those evaluated and in the baseline, only the 15 benchmark ones if any."""
    names = [c for c in baseline.errors if c in accuracy and accuracy[c]]
    return [c for c in BENCHMARK_CORRUPTIONS if c in names] or names


def _undefined(accuracy: Accuracy, baseline: Baseline, names: list[str], offset: float = 0.0) -> list[str]:
    return [c for c in names if baseline.error(c, accuracy[c]) - offset <= 0]


def corruption_errors(
    accuracy: Accuracy, baseline: Baseline | Mapping[str, float] | None = None
) -> dict[str, float | None]:
    """CE_c = mean_s (1 - acc_{s,c}) / mean_s baseline_{s,c} for every corruption present in both (``None`` where
    the baseline error is 0, i.e. the CE is undefined)."""
    base = resolve_baseline(baseline)
    out: dict[str, float | None] = {}
    for c in (c for c in base.errors if c in accuracy and accuracy[c]):
        denom = base.error(c, accuracy[c])
        out[c] = _mean(1 - a for a in accuracy[c].values()) / denom if denom > 0 else None
    return out


def mce(accuracy: Accuracy, baseline: Baseline | Mapping[str, float] | None = None) -> float:
    """Mean corruption error over the baseline's corruptions that were evaluated (all 15 for the standard mCE)."""
    base = resolve_baseline(baseline)
    names = _covered(accuracy, base)
    if not names:
        raise InvalidArgumentError(f"mCE needs at least one of: {', '.join(base.errors)}")
    zero = _undefined(accuracy, base, names)
    if zero:
        raise InvalidArgumentError(
            f"mCE is undefined: the baseline {base.name} makes no error on {', '.join(zero)} (nothing to normalise "
            "by); evaluate on more images or use another baseline"
        )
    return _mean(_mean(1 - a for a in accuracy[c].values()) / base.error(c, accuracy[c]) for c in names)


def relative_mce(
    accuracy: Accuracy,
    clean_accuracy: float,
    baseline: Baseline | Mapping[str, float] | None = None,
    baseline_clean_err: float | None = None,
) -> float:
    """Mean over corruptions of (mean_s E_{s,c} - E_clean) / (mean_s E^base_{s,c} - E^base_clean)."""
    base = resolve_baseline(baseline)
    base_clean = base.clean_error if baseline_clean_err is None else baseline_clean_err
    if base_clean is None:
        raise InvalidArgumentError(f"relative mCE needs the clean error of the baseline {base.name}")
    names = _covered(accuracy, base)
    if not names:
        raise InvalidArgumentError(f"relative mCE needs at least one of: {', '.join(base.errors)}")
    flat = _undefined(accuracy, base, names, base_clean)
    if flat:
        raise InvalidArgumentError(
            f"relative mCE is undefined: the baseline {base.name} is no worse on {', '.join(flat)} than clean "
            "(nothing to normalise by)"
        )
    clean_err = 1 - clean_accuracy
    return _mean(
        (_mean(1 - a for a in accuracy[c].values()) - clean_err) / (base.error(c, accuracy[c]) - base_clean)
        for c in names
    )


def retention(accuracy: Accuracy, clean_accuracy: float) -> dict[str, dict[int, float]]:
    """Corrupted / clean accuracy per corruption and severity."""
    if clean_accuracy <= 0:
        raise InvalidArgumentError("retention needs a positive clean accuracy")
    return {c: {s: a / clean_accuracy for s, a in sev.items()} for c, sev in accuracy.items()}


def mce_summary(
    accuracy: Accuracy, clean_accuracy: float | None = None, baseline: Baseline | Mapping[str, float] | None = None
) -> dict[str, object]:
    """mCE and relative mCE with what they cover: the baseline, corruptions and severities used, whether that is
    the complete benchmark (15 corruptions x 5 severities, the baseline over the same), and why a value is missing.
    """
    base = resolve_baseline(baseline)
    names = _covered(accuracy, base)
    severities = sorted({s for c in names for s in accuracy[c]})
    notes: list[str] = []
    value = relative = None
    if names:
        zero = _undefined(accuracy, base, names)
        if zero:
            notes.append(f"mCE undefined: the baseline makes no error on {', '.join(zero)}")
        else:
            value = mce(accuracy, base)
        base_clean = base.clean_error
        if clean_accuracy is not None and base_clean is not None:
            flat = _undefined(accuracy, base, names, base_clean)
            if flat:
                notes.append(f"relative mCE undefined: the baseline is no worse than clean on {', '.join(flat)}")
            else:
                relative = relative_mce(accuracy, clean_accuracy, base)
    missing = [c for c in BENCHMARK_CORRUPTIONS if c not in names]
    partial = [c for c in names if sorted(accuracy[c]) != list(SEVERITIES)]
    mismatched = [c for c in names if not base.matches(c, accuracy[c])]
    if missing:
        notes.append(f"incomplete: {len(names)} of 15 benchmark corruptions")
    if partial:
        notes.append(f"incomplete: severities {', '.join(map(str, severities))} of 1-5")
    if mismatched:
        notes.append(f"the baseline {base.name} averages severities 1-5, not only the ones evaluated")
    return {
        "mce": value,
        "relative_mce": relative,
        "mce_baseline": base.name,
        "mce_corruptions": names,
        "mce_severities": severities,
        "mce_complete": bool(names) and not (missing or partial or mismatched),
        "mce_notes": notes,
    }


def summarize(
    accuracy: Accuracy, clean_accuracy: float | None = None, baseline: Baseline | Mapping[str, float] | None = None
) -> dict[str, object]:
    """Every headline number, each labelled with the corruptions it covers (``None`` where not computable)."""
    std = [c for c in BENCHMARK_CORRUPTIONS if c in accuracy]
    every = [c for c in ALL_CORRUPTIONS if c in accuracy] + [c for c in accuracy if c not in ALL_CORRUPTIONS]
    base = resolve_baseline(baseline)
    out: dict[str, object] = {
        "clean_accuracy": clean_accuracy,
        "mean_corruption_accuracy_15": mean_accuracy(accuracy, std) if std else None,
        "mean_corruption_accuracy_all": mean_accuracy(accuracy, every) if every else None,
        **mce_summary(accuracy, clean_accuracy, base),
        "corruption_errors": corruption_errors(accuracy, base),
        "corruptions_in_15": std,
        "corruptions_in_all": every,
        "complete_15": len(std) == len(BENCHMARK_CORRUPTIONS) and all(len(accuracy[c]) == 5 for c in std),
    }
    if clean_accuracy:
        ret = retention(accuracy, clean_accuracy)
        out["retention"] = ret
        out["mean_retention_all"] = mean_accuracy(ret, every) if every else None
    return out
