"""Turn a finished ``ravit train`` run into a zoo model: packaged safetensors weights plus a manifest entry.

The weights are stored in float16 (half the bytes); the manifest records the test accuracy measured both with the
float32 training weights and through the real loading path (``ravit.create_model(name, pretrained=True)``), so any
loss from the cast is visible.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ravit.data import create_dataset, create_transform, dataset_info
from ravit.outputs import write_json
from ravit.train.checkpoint import load_training_checkpoint
from ravit.train.config import TrainConfig
from ravit.train.loop import evaluate

__all__ = ["ZOO_SLICE", "ats_settings", "export_zoo_model", "eval_loader", "zoo_model_kwargs"]

_NOTES = (
    "Each entry: exported by ravit.train.export.export_zoo_model(run_dir, name, description, train_command) from "
    "the run's last.pth (the final epoch, not a test-selected one); weights stored as float16. test_top1_fp32: full "
    "test split with the float32 training weights; test_top1 and slice.top1: through ravit.create_model(name, "
    "pretrained=True), full split and its first slice.first images. training_time: from the run's log.jsonl, the "
    "sum of the epochs' wall seconds over every stage (pauses and shared cores included) and the median epoch. "
    "previous_stages: the configs of earlier runs the model continued from (train_command runs them in order). ats: "
    "the ATS settings the model was fine-tuned with (ravit.apply_ats arguments); its test accuracies are measured "
    "with them applied, test_top1_dense without."
)

# The fixed slice of the test split that tests/test_zoo.py checks against the manifest: the first 1000 images.
ZOO_SLICE = 1000


def ats_settings(cfg: TrainConfig) -> dict | None:
    """The ATS the run trained with (``ravit.apply_ats`` keyword arguments), or None for a dense run."""
    if cfg.ats_blocks is None:
        return None
    return {"blocks": list(cfg.ats_blocks), "budget": cfg.ats_budget, "sampler": cfg.ats_sampler}


def zoo_model_kwargs(cfg: TrainConfig) -> dict:
    """Constructor kwargs that rebuild the trained architecture for inference (no training-only kwargs)."""
    info = dataset_info(cfg.dataset)
    kwargs = dict(cfg.model_kwargs)
    kwargs.update(
        img_size=cfg.img_size or info.img_size,
        in_chans=cfg.in_chans or info.in_chans,
        num_classes=cfg.num_classes or len(info.classes),
    )
    return kwargs


def eval_loader(
    dataset: str,
    in_chans: int,
    img_size: int,
    limit: int | None = None,
    data_dir=None,
    split: str = "test",
    batch_size: int = 250,
) -> DataLoader:
    """The eval pipeline of ``ravit train`` over ``split`` (its first ``limit`` images when given)."""
    info = dataset_info(dataset)
    tf = create_transform(img_size, in_chans, info.mean, info.std, is_training=False, crop_pct=info.crop_pct)
    ds = create_dataset(dataset, split, data_dir, tf)
    indices = list(range(min(limit, len(ds)) if limit else len(ds)))
    return DataLoader(ds, batch_size=batch_size, sampler=indices)


def _with_ats(model, ats: dict | None):
    """``model`` with the manifest's ATS settings applied (a copy), or ``model`` itself when there are none."""
    if ats is None:
        return model
    from ravit.ats import apply_ats

    return apply_ats(copy.deepcopy(model), **ats)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wall_time(run_dirs: list[Path]) -> dict:
    """Training wall time from the runs' ``log.jsonl``: the sum of all epochs' seconds and their median.

    The sum includes any time the process was paused or shared its cores; the median epoch is the quiet figure.
    """
    seconds = [json.loads(line)["seconds"] for run in run_dirs
               for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    if not seconds:
        return {}
    ordered = sorted(seconds)
    return {"wall_seconds": round(sum(seconds), 1), "median_epoch_seconds": ordered[len(ordered) // 2]}


def export_zoo_model(
    run_dir: str | os.PathLike,
    name: str,
    description: str,
    train_command: str,
    data_dir=None,
    zoo_dir: str | os.PathLike | None = None,
    previous_runs: tuple[str | os.PathLike, ...] = (),
) -> dict:
    """Export ``<run_dir>/last.pth`` as zoo model ``name`` and add (or replace) its manifest entry; returns it.

    ``previous_runs`` are the earlier stages of a model trained in several runs (each starting from the last one's
    weights, ``init_checkpoint``): their configs and epochs are recorded and their time added. A run that trained
    with ATS in the loop records its ATS settings under ``ats``, and its accuracies are measured with them applied
    (``test_top1_dense``: without).
    """
    import timm

    import ravit
    from ravit.checkpoint import save_checkpoint
    from ravit.models import zoo

    zoo_dir = Path(zoo_dir) if zoo_dir is not None else zoo.ZOO_DIR
    ckpt = load_training_checkpoint(Path(run_dir) / "last.pth")
    cfg = TrainConfig(**ckpt["config"])
    kwargs = zoo_model_kwargs(cfg)
    model = timm.create_model(cfg.model, **kwargs)
    model.load_state_dict(ckpt["state_dict"])
    info = dataset_info(cfg.dataset)
    full = eval_loader(cfg.dataset, kwargs["in_chans"], kwargs["img_size"], data_dir=data_dir)
    ats = ats_settings(cfg)
    fp32 = evaluate(_with_ats(model, ats), full, torch.device("cpu"))
    earlier = [load_training_checkpoint(Path(run) / "last.pth")["config"] for run in previous_runs]

    weights = zoo_dir / f"{name}.safetensors"
    save_checkpoint(copy.deepcopy(model).to(torch.float16), weights, metadata={"model": name, "dtype": "float16"})
    weights.chmod(0o644)  # package data: readable by every user of an installed copy
    entry = {
        "architecture": cfg.model,
        "model_kwargs": kwargs,
        "description": description,
        "dataset": cfg.dataset,
        "input_size": [kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"]],
        "mean": list(info.mean),
        "std": list(info.std),
        "crop_pct": info.crop_pct,
        "label_names": list(info.classes) if info.classes else None,
        "weights": weights.name,
        "dtype": "float16",
        "sha256": _sha256(weights),
        "params": sum(p.numel() for p in model.parameters()),
        "train_command": train_command,
        "seed": cfg.seed,
        "epochs": cfg.epochs + sum(c["epochs"] for c in earlier),
        "train_config": ckpt["config"],
        "test_top1_fp32": round(fp32["top1"], 2),
        "training_time": _wall_time([*(Path(run) for run in previous_runs), Path(run_dir)]),
    }
    if earlier:
        entry["previous_stages"] = earlier
    if ats is not None:
        entry["ats"] = ats
    zoo.register_zoo_model(name, entry, zoo_dir)
    shipped = ravit.create_model(name, pretrained=True)
    if ats is not None:
        entry["test_top1_dense"] = round(evaluate(shipped, full, torch.device("cpu"))["top1"], 2)
    shipped = _with_ats(shipped, ats)
    entry["test_top1"] = round(evaluate(shipped, full, torch.device("cpu"))["top1"], 2)
    sliced = eval_loader(cfg.dataset, kwargs["in_chans"], kwargs["img_size"], limit=ZOO_SLICE, data_dir=data_dir)
    entry["slice"] = {
        "split": "test",
        "first": ZOO_SLICE,
        "top1": round(evaluate(shipped, sliced, torch.device("cpu"))["top1"], 2),
    }

    manifest_path = zoo_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"models": {}}
    manifest["notes"] = _NOTES
    manifest["models"][name] = entry
    write_json(manifest_path, manifest)
    return entry
