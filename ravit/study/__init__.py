"""The main job: both papers' claims, checked one by one on Fashion-MNIST with the shipped zoo models.

Three parts, on the same first N test images, then a verdict per claim (:mod:`ravit.study.claims`):

1. :mod:`~ravit.study.robustness` (FAN Sec. 5): ViT and FAN under the ImageNet-C corruptions.
2. :mod:`~ravit.study.reduction` (ATS Sec. 4): accuracy vs GMACs of ATS (multi- and single-stage, inverse transform
   and Top-K, three scorings), ToMe, ravit's fused ATS, and the ViT fine-tuned with ATS.
3. :mod:`~ravit.study.grouping` (FAN Sec. 3): significant eigenvalues and noise perturbation per block.

Everything is written to one folder: ``summary.json`` (all numbers, the claims under ``"claims"``), ``summary.md``
(the claims table first, then every table; also printed), ``summary.png`` (the claims on one page), CSV files and
PNG figures. The folder is built under a temporary name next to it and renamed into place when the study is done,
so a crash or a kill leaves the previous results as they were, and a rerun leaves no stale file.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ravit._factory import create_model
from ravit.analysis.results import write_csv, write_json
from ravit.ats import apply_ats
from ravit.ats.config import Budget
from ravit.data import CLASSES
from ravit.errors import InvalidArgumentError
from ravit.models.fan import FAN
from ravit.outputs import write_text
from ravit.robustness.benchmarks import check_classes
from ravit.robustness.registry import BENCHMARK_CORRUPTIONS, SEVERITIES, resolve_corruptions
from ravit.study._folder import check_out, publish, work_folder
from ravit.study.claims import claims
from ravit.study.figures import plot_grouping, plot_reduction, plot_robustness, plot_summary
from ravit.study.grouping import measure_grouping
from ravit.study.reduction import first_ats_block, measure_fan_reduction, measure_reduction
from ravit.study.report import markdown
from ravit.study.robustness import measure_robustness

__all__ = ["DEFAULTS", "DEFAULT_FAN", "DEFAULT_VIT", "DEFAULT_VIT_ATS", "FINETUNED", "QUICK", "run_study"]

DEFAULT_VIT = "fmnist_deit12_p4"
DEFAULT_FAN = "fmnist_fan12_p4"
# The zoo's ViTs fine-tuned with ATS in the loop (claim 8), by the ViT they start from: vit_ats="auto" takes the one
# of the study's ViT, or none.
FINETUNED = {"fmnist_deit12_p4": "fmnist_deit12_p4_ats"}
DEFAULT_VIT_ATS = FINETUNED[DEFAULT_VIT]

# The study's scale: the default run and --quick. Any of them can be set on its own; the rest come from the preset.
DEFAULTS = {"limit": 1000, "corruption_images": 500, "corruptions": tuple(BENCHMARK_CORRUPTIONS),
            "severities": (1, 2, 3, 4, 5),
            "budgets": (None, 0.9, 0.8, 0.7), "analysis_images": 64, "gmacs_images": 64}
QUICK = {"limit": 200, "corruption_images": 100, "corruptions": tuple(BENCHMARK_CORRUPTIONS), "severities": (1, 3, 5),
         "budgets": (None, 0.7), "analysis_images": 16, "gmacs_images": 16}


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidArgumentError(f"{name} must be positive (an integer >= 1), got {value!r}")


def _check_roles(models: dict[str, nn.Module], names: dict[str, str | None]) -> None:
    """The ViT (and the fine-tuned ViT) must be timm ViTs, the FAN a FAN: the study compares the two families."""
    role_names = {"vit": "ViT", "vit_ats": "fine-tuned ViT (--finetuned)", "fan": "FAN"}
    for role, kind, expected in (("vit", VisionTransformer, "a timm VisionTransformer (DeiT-style, class token)"),
                                 ("vit_ats", VisionTransformer, "a timm VisionTransformer (DeiT-style, class token)"),
                                 ("fan", FAN, "a FAN-ViT or FAN-Hybrid")):
        if role in models and not isinstance(models[role], kind):
            raise InvalidArgumentError(
                f"the {role_names[role]} must be {expected}, got {names[role]} ({type(models[role]).__name__})")


def _check_budgets(vit: nn.Module, budgets: Sequence[Budget]) -> list[Budget]:
    """Each budget checked against the ViT (the rule of :func:`ravit.apply_ats`), normalised (3.0 -> 3), once each."""
    if isinstance(budgets, (str, bytes)) or not budgets:
        raise InvalidArgumentError(f"budgets must be a non-empty list of ATS budgets, got {budgets!r}")
    blocks = range(first_ats_block(len(vit.blocks)), len(vit.blocks))
    checked = {}
    for budget in budgets:
        value = apply_ats(copy.deepcopy(vit), blocks=blocks, budget=budget).ats_config.budgets[0]
        checked.setdefault((type(value), value), value)  # 1 token and the ratio 1.0 are different budgets
    return list(checked.values())


def _check_lists(corruptions: Sequence[str], severities: Sequence[int]) -> tuple[list[str], list[int]]:
    severities = list(dict.fromkeys(severities))  # a repeated severity would count twice in the means
    if not severities or any(isinstance(s, bool) or s not in SEVERITIES for s in severities):
        raise InvalidArgumentError(f"severities must be a non-empty list of {list(SEVERITIES)}, got {severities}")
    if isinstance(corruptions, (str, bytes)) or not corruptions:
        raise InvalidArgumentError(f"corruptions must be a non-empty list of names or groups, got {corruptions!r}")
    return resolve_corruptions(list(corruptions)), severities


def _label(model: nn.Module, role: str) -> str:
    return {"vit": "ViT", "fan": "FAN", "vit_ats": "ViT+ATS-FT"}[role] + f"-{len(model.blocks)}"


def run_study(
    out_dir: str | Path,
    vit: str = DEFAULT_VIT,
    fan: str = DEFAULT_FAN,
    vit_ats: str | None = "auto",
    *,
    quick: bool = False,
    limit: int | None = None,
    corruption_images: int | None = None,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    budgets: Sequence[Budget] | None = None,
    analysis_images: int | None = None,
    gmacs_images: int | None = None,
    noise_std: float = 0.5,
    batch_size: int = 100,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict:
    """Run the three parts and the verdicts, and write everything to ``out_dir``; returns the summary.

    The token-reduction part runs on the first ``limit`` test images, the robustness part on the first
    ``corruption_images`` (every one of them under every corruption and severity: 75 times the images with the 15 at
    5 severities), the grouping part on the first ``analysis_images``; both models always see the same images.

    ``vit`` is a zoo ViT with a class token (ATS and ToMe run on it; its errors normalise the mCE), ``fan`` a zoo
    FAN, ``vit_ats`` the ViT fine-tuned with ATS in the loop ("auto": ``FINETUNED[vit]`` when the zoo has one; None:
    claim 8 is reported as not shown). Settings left
    None come from ``QUICK`` when ``quick`` is set, else from ``DEFAULTS``. Every argument is checked before any
    image is read. ``out_dir`` is replaced as a whole when the study is done (it must be new, empty or a previous
    study's folder); until then the results grow in a hidden sibling folder, which a failure removes (and the next
    run, if the process was killed).
    """
    started = time.perf_counter()
    preset = QUICK if quick else DEFAULTS
    given = {"limit": limit, "corruption_images": corruption_images, "corruptions": corruptions,
             "severities": severities, "budgets": budgets,
             "analysis_images": analysis_images, "gmacs_images": gmacs_images}
    s = {k: preset[k] if v is None else v for k, v in given.items()}
    for name in ("limit", "corruption_images", "analysis_images", "gmacs_images"):
        _check_positive(name, s[name])
    _check_positive("batch_size", batch_size)
    s["corruptions"], s["severities"] = _check_lists(s["corruptions"], s["severities"])
    if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real) or not 0 <= noise_std < math.inf:
        raise InvalidArgumentError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    names = {"vit": vit, "fan": fan, "vit_ats": FINETUNED.get(vit) if vit_ats == "auto" else vit_ats}
    if len({n for n in names.values() if n is not None}) < len([n for n in names.values() if n is not None]):
        raise InvalidArgumentError(f"the ViT, the FAN and the fine-tuned ViT must be different models, got {names}")
    out = Path(out_dir).resolve()
    check_out(out)
    device = torch.device(device)
    models = {role: create_model(name, pretrained=True).eval() for role, name in names.items() if name is not None}
    _check_roles(models, names)
    s["budgets"] = _check_budgets(models["vit"], s["budgets"])
    if "vit_ats" in models:
        _check_budgets(models["vit_ats"], s["budgets"])
    for model in models.values():
        check_classes(list(CLASSES), model.num_classes)
        model.to(device)
    labels = {names[role]: _label(model, role) for role, model in models.items()}
    pair = {names[r]: models[r] for r in ("vit", "fan")}  # the ViT first: the mCE's baseline

    work = work_folder(out)
    try:
        summary = {
            "roles": names,
            "labels": labels,
            "models": {names[r]: {"params": sum(p.numel() for p in m.parameters()), "depth": len(m.blocks)}
                       for r, m in models.items()},
            "settings": {**s, "noise_std": noise_std, "batch_size": batch_size, "quick": quick},
        }
        summary["robustness"] = measure_robustness(pair, labels, s["corruption_images"], s["corruptions"],
                                                   s["severities"], work, progress, device)
        summary["token_reduction"] = measure_reduction(
            {r: m for r, m in models.items() if r != "fan"}, labels[vit], s["limit"], s["budgets"], batch_size,
            s["gmacs_images"], quick, progress)
        summary["token_reduction_fan"] = measure_fan_reduction(
            models["fan"], labels[fan], s["limit"], s["budgets"], batch_size, s["gmacs_images"], quick, progress)
        summary["grouping"] = measure_grouping(pair, labels, s["analysis_images"], noise_std, progress)
        summary["claims"] = claims(summary)
        summary["seconds"] = time.perf_counter() - started
        for key, model in (("token_reduction", "vit"), ("token_reduction_fan", "fan")):
            rows = [{"model": names[model], **r} for r in summary[key]["rows"]]
            write_csv(work / f"{key}.csv", list(rows[0]), [list(r.values()) for r in rows])
        write_csv(work / "claims.csv", list(summary["claims"][0]), [list(c.values()) for c in summary["claims"]])
        plot_robustness(summary, work / "robustness.png")
        plot_reduction(summary, work / "token_reduction.png")
        plot_grouping(summary, work / "grouping.png")
        plot_summary(summary, work / "summary.png")
        write_json(work / "summary.json", summary)
        write_text(work / "summary.md", markdown(summary))
        publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return json.loads(json.dumps(summary))
