"""The main job: both papers' claims, in miniature, on Fashion-MNIST with the shipped zoo models.

1. FAN (Zhou et al., ICML 2022, Sec. 5, Table 8): a FAN-ViT keeps more of its clean accuracy under the ImageNet-C
   corruptions than a DeiT-style ViT of similar size (mean corruption accuracy, retention, and the mCE of FAN with the
   ViT as the normalising baseline: below 100% means more robust).
2. ATS (Fayyaz et al., ECCV 2022, Sec. 4, Table 1 and the Top-K ablation): plugged into the trained ViT without
   fine-tuning, adaptive token sampling cuts GMACs per image at a small cost in accuracy, and beats Top-K at equal
   budgets.
3. Grouping (FAN Sec. 3, Fig. 3): per block, the number of significant eigenvalues of the token affinity and the
   relative perturbation of block outputs under Gaussian input noise, for both models.

Everything is written to one folder: ``summary.json`` (all numbers), ``summary.md`` (the tables that are printed),
CSV files and PNG figures. The folder is built under a temporary name next to it and renamed into place when the
study is done, so a crash or a kill leaves the previous results as they were, and a rerun leaves no stale file.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ravit._factory import create_model
from ravit.analysis.perturbation import perturbation_profile
from ravit.analysis.plots import plot_block_curves
from ravit.analysis.results import write_csv, write_json
from ravit.analysis.spectra import grouping_spectra
from ravit.ats import apply_ats, trace
from ravit.ats.config import Budget
from ravit.bench.flops import count_gmacs
from ravit.data import CLASSES
from ravit.errors import InvalidArgumentError
from ravit.outputs import atomic_open, check_output_dir, write_text
from ravit.robustness.benchmarks import check_classes
from ravit.robustness.evaluate import ModelInput, evaluate_corruptions, image_dataset
from ravit.robustness.metrics import mce, mean_accuracy
from ravit.robustness.registry import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS, SEVERITIES

__all__ = ["DEFAULT_FAN", "DEFAULT_VIT", "run_study"]

DEFAULT_VIT = "fmnist_deit_p4"
DEFAULT_FAN = "fmnist_fan_p4"

# What a study writes at the top of its folder: an existing folder holding only these is a study's and is replaced.
_OUTPUTS = frozenset({"robustness", "summary.json", "summary.md", "ats.csv", "ats_accuracy_vs_gmacs.png",
                      "grouping_eigenvalues.png", "grouping_perturbation.png"})


def _test_images(model: nn.Module, limit: int) -> tuple[ModelInput, torch.Tensor, torch.Tensor]:
    """The first ``limit`` Fashion-MNIST test images at the model's input size: spec, (N, C, H, W) in [0, 1], labels."""
    spec = ModelInput.from_model(model)
    dataset = image_dataset("fashion-mnist", spec)
    n = min(limit, len(dataset))
    images, labels = zip(*(dataset[i] for i in range(n)), strict=True)
    return spec, torch.stack(images), torch.tensor(labels)


def _robustness(models: dict[str, nn.Module], limit: int, severities: Sequence[int], out: Path, progress: bool,
                device: torch.device):
    results = {}
    for name, model in models.items():
        spec = ModelInput.from_model(model)
        result = evaluate_corruptions(
            model, image_dataset("fashion-mnist", spec), severities=severities, name=name, limit=limit,
            device=device, progress=progress,
        )
        result.save(out / "robustness" / name)
        results[name] = result
    vit_name = next(iter(models))
    # mCE normalised by the ViT instead of AlexNet (Hendrycks & Dietterich 2019): below 100% = more robust than the ViT.
    # On a small run the ViT can make no error on a corruption; the ratio is then undefined and reported as None.
    vit_err = {c: 1 - mean_accuracy(results[vit_name].accuracy, [c]) for c in BENCHMARK_CORRUPTIONS}
    mce_defined = all(err > 0 for err in vit_err.values())
    rows = {}
    for name, result in results.items():
        summary = result.summary()
        clean = result.clean_accuracy
        rows[name] = {
            "clean_accuracy": clean,
            "mean_corruption_accuracy_15": summary["mean_corruption_accuracy_15"],
            "mean_corruption_accuracy_19": summary["mean_corruption_accuracy_all"],
            "retention_15": summary["mean_corruption_accuracy_15"] / clean if clean > 0 else None,
            "mce_vs_vit_15": mce(result.accuracy, baseline=vit_err) if mce_defined else None,
            "per_corruption": {c: mean_accuracy(result.accuracy, [c]) for c in ALL_CORRUPTIONS},
        }
    return rows


def _ats(vit: nn.Module, limit: int, budgets: Sequence[Budget], batch_size: int, gmacs_images: int,
         progress: bool):
    """Accuracy on ``limit`` images and GMACs counted per image on the first ``gmacs_images`` of them (counting runs
    one FlopCounterMode forward per distinct kept-token profile, so it is kept to a fixed subset)."""
    spec, images, labels = _test_images(vit, limit)
    inputs = spec.normalize(images).to(next(vit.parameters()).device)
    dense_gmacs = count_gmacs(vit, inputs[:1])
    with torch.no_grad():
        dense_preds = torch.cat([vit(x).argmax(-1).cpu() for x in inputs.split(batch_size)])
    dense_acc = float(dense_preds.eq(labels).float().mean())
    blocks = range(1, len(vit.blocks))
    rows = [{"sampler": "dense", "budget": "all", "accuracy": dense_acc, "gmacs": dense_gmacs, "gmacs_ratio": 1.0,
             "kept_tokens_last_block": float(vit.patch_embed.num_patches + vit.num_prefix_tokens)}]
    settings = [(s, b) for s in ("inverse_transform", "topk") for b in budgets if not (s == "topk" and b is None)]
    for sampler, budget in tqdm(settings, desc="ats", disable=not progress):
        model = apply_ats(copy.deepcopy(vit), blocks=blocks, budget=budget, sampler=sampler)
        preds, gmacs, kept = [], [], []
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size]
            result = trace(model, x, count_gmacs=start < gmacs_images)
            preds.append(result.logits.argmax(-1).cpu())
            gmacs.append(result.gmacs[: max(0, gmacs_images - start)])
            kept.append(result.kept_tokens[:, -1].double())
        mean_gmacs = float(torch.cat(gmacs).mean())
        rows.append({
            "sampler": sampler,
            "budget": "all" if budget is None else budget,
            "accuracy": float(torch.cat(preds).eq(labels).float().mean()),
            "gmacs": mean_gmacs,
            "gmacs_ratio": mean_gmacs / dense_gmacs,
            "kept_tokens_last_block": float(torch.cat(kept).mean()),
        })
    return {"blocks": list(blocks), "gmacs_images": min(gmacs_images, limit), "rows": rows}


def _plot_ats(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for sampler, marker in (("inverse_transform", "o"), ("topk", "s")):
        pts = sorted((r["gmacs"], 100 * r["accuracy"]) for r in rows if r["sampler"] == sampler)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=f"ATS ({sampler})")
    dense = next(r for r in rows if r["sampler"] == "dense")
    ax.scatter([dense["gmacs"]], [100 * dense["accuracy"]], marker="*", s=150, color="k", label="dense ViT", zorder=3)
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("ATS on the zoo ViT, no fine-tuning (Fashion-MNIST test)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path


def _grouping(models: dict[str, nn.Module], n_images: int, noise_std: float, out: Path) -> dict:
    result = {}
    for name, model in models.items():
        spec, images, _ = _test_images(model, n_images)
        batches = list(spec.normalize(images).to(next(model.parameters()).device).split(32))
        counts = grouping_spectra(model, batches)
        perturb = perturbation_profile(model, batches, noise_std=noise_std)
        result[name] = {
            "significant_eigenvalues": {k: float(v.float().mean()) for k, v in counts.items()},
            "relative_perturbation": {k: float(v.mean()) for k, v in perturb.items() if k != "input"},
        }
    depth = max(len(r["significant_eigenvalues"]) for r in result.values())
    labels = [str(i + 1) for i in range(depth)]
    for key, ylabel, fname in (
        ("significant_eigenvalues", "significant eigenvalues (mean)", "grouping_eigenvalues.png"),
        ("relative_perturbation", "‖f(x+δ) − f(x)‖ / ‖f(x)‖", "grouping_perturbation.png"),
    ):
        series = {}
        for name, r in result.items():
            values = list(r[key].values())
            series[name] = (values + [math.nan] * (depth - len(values)), None)
        plot_block_curves(out / fname, series, labels, ylabel, f"Token grouping per block ({key.replace('_', ' ')})")
    return result


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _markdown(summary: dict) -> str:
    rob = summary["robustness"]
    lines = ["## Robustness (FAN claim)", "",
             "| model | clean | mean corr. acc. (15) | (19) | retention (15) | mCE vs ViT (15) |",
             "|---|---|---|---|---|---|"]
    for name, r in rob.items():
        lines.append(
            f"| {name} | {100 * r['clean_accuracy']:.2f} | {100 * r['mean_corruption_accuracy_15']:.2f} | "
            f"{100 * r['mean_corruption_accuracy_19']:.2f} | {_percent(r['retention_15'])} | "
            f"{_percent(r['mce_vs_vit_15'])} |"
        )
    if any(r["mce_vs_vit_15"] is None for r in rob.values()):
        lines += ["", "n/a: mCE vs ViT divides by the ViT's error on each corruption, and the ViT made none on at "
                      "least one corruption of these images; use a larger --limit."]
    if any(r["retention_15"] is None for r in rob.values()):
        lines += ["", "n/a: retention divides by the clean accuracy, which is 0 here; use a larger --limit."]
    n_gmacs = summary["ats"]["gmacs_images"]
    lines += ["", "## Adaptive token sampling on the ViT (ATS claim)", "",
              f"| sampler | budget | accuracy | GMACs (first {n_gmacs} images) | GMACs / dense "
              "| tokens after last ATS block |",
              "|---|---|---|---|---|---|"]
    for r in summary["ats"]["rows"]:
        lines.append(
            f"| {r['sampler']} | {r['budget']} | {100 * r['accuracy']:.2f} | {r['gmacs']:.4f} | "
            f"{r['gmacs_ratio']:.2f} | {r['kept_tokens_last_block']:.1f} |"
        )
    lines += ["", "## Token grouping (FAN Sec. 3)", "",
              "| model | block | significant eigenvalues | rel. perturbation |", "|---|---|---|---|"]
    for name, r in summary["grouping"].items():
        for (block, eig), pert in zip(r["significant_eigenvalues"].items(), r["relative_perturbation"].values(),
                                      strict=False):
            lines.append(f"| {name} | {block} | {eig:.2f} | {pert:.3f} |")
    return "\n".join(lines) + "\n"


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidArgumentError(f"{name} must be positive (an integer >= 1), got {value!r}")


def _check_out(out: Path) -> None:
    """The study replaces its whole folder: refuse a file, a folder with anything but a study's outputs, or the
    current folder or one above it."""
    check_output_dir(out, "out")
    if Path.cwd().resolve().is_relative_to(out):
        raise InvalidArgumentError(f"out {out} is the current folder or one above it; name a folder for the study")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _OUTPUTS)
        if foreign:
            raise InvalidArgumentError(
                f"out {out} holds files a study does not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); the study replaces its whole folder, so name a new or "
                f"empty one")


def _check_budgets(vit: nn.Module, budgets: Sequence[Budget]) -> list[Budget]:
    """Each budget checked against the ViT (the rule of :func:`ravit.apply_ats`), normalised (3.0 -> 3), once each."""
    if isinstance(budgets, (str, bytes)) or not budgets:
        raise InvalidArgumentError(f"budgets must be a non-empty list of ATS budgets, got {budgets!r}")
    checked = {}
    for budget in budgets:
        value = apply_ats(copy.deepcopy(vit), blocks=range(1, len(vit.blocks)), budget=budget).ats_config.budgets[0]
        checked.setdefault((type(value), value), value)  # 1 token and the ratio 1.0 are different budgets
    return list(checked.values())


def _remove_leftovers(out: Path) -> None:
    """Delete the temporary folders of studies into ``out`` that were killed (their process is gone)."""
    prefix = f".{out.name}."
    for folder in out.parent.iterdir():
        if not folder.name.startswith(prefix):
            continue
        kind, _, rest = folder.name[len(prefix):].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("partial", "old") or not pid.isdigit() or not folder.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _publish(work: Path, out: Path) -> None:
    """Rename the finished ``work`` folder to ``out``; a previous study's folder there is deleted only afterwards."""
    old = None
    if out.exists():
        old = work.with_name(work.name.replace(".partial-", ".old-"))
        os.replace(out, old)
    try:
        os.replace(work, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old)


def run_study(
    out_dir: str | Path,
    vit: str = DEFAULT_VIT,
    fan: str = DEFAULT_FAN,
    limit: int = 1000,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    budgets: Sequence[Budget] = (None, 0.75, 0.5, 0.35),
    analysis_images: int = 64,
    noise_std: float = 0.5,
    batch_size: int = 100,
    gmacs_images: int = 200,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict:
    """Run the three parts on the first ``limit`` Fashion-MNIST test images and write everything to ``out_dir``.

    Every argument is checked before any image is read. ``out_dir`` is replaced as a whole when the study is done
    (it must be new, empty or a previous study's folder); until then the results grow in a hidden sibling folder,
    which a failure removes (and the next run, if the process was killed).
    """
    for name, value in (("limit", limit), ("analysis_images", analysis_images), ("gmacs_images", gmacs_images),
                        ("batch_size", batch_size)):
        _check_positive(name, value)
    severities = list(dict.fromkeys(severities))  # a repeated severity would count twice in the means
    if not severities or any(isinstance(s, bool) or s not in SEVERITIES for s in severities):
        raise InvalidArgumentError(f"severities must be a non-empty list of {list(SEVERITIES)}, got {severities}")
    if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real) or not 0 <= noise_std < math.inf:
        raise InvalidArgumentError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    if vit == fan:
        raise InvalidArgumentError(f"the ViT and the FAN must be two different models, got {vit!r} twice")
    out = Path(out_dir).resolve()
    _check_out(out)
    device = torch.device(device)
    models = {name: create_model(name, pretrained=True).eval() for name in (vit, fan)}
    budgets = _check_budgets(models[vit], budgets)
    for model in models.values():
        check_classes(list(CLASSES), model.num_classes)
        model.to(device)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes the folder private; give it the permissions mkdir would
    try:
        summary = {
            "models": {n: {"params": sum(p.numel() for p in m.parameters())} for n, m in models.items()},
            "settings": {"limit": limit, "severities": severities, "budgets": budgets,
                         "analysis_images": analysis_images, "noise_std": noise_std, "gmacs_images": gmacs_images},
        }
        summary["robustness"] = _robustness(models, limit, severities, work, progress, device)
        summary["ats"] = _ats(models[vit], limit, budgets, batch_size, gmacs_images, progress)
        rows = summary["ats"]["rows"]
        write_csv(work / "ats.csv", list(rows[0]), [list(r.values()) for r in rows])
        _plot_ats(rows, work / "ats_accuracy_vs_gmacs.png")
        summary["grouping"] = _grouping(models, analysis_images, noise_std, work)
        write_json(work / "summary.json", summary)
        write_text(work / "summary.md", _markdown(summary))
        _publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return json.loads(json.dumps(summary))
