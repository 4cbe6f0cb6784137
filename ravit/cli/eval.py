"""``ravit eval``: clean top-1 / top-5 accuracy of a model on a dataset split, overall and per class.

The model is a zoo name (``ravit eval fmnist_deit_p4 --pretrained``), any ravit / timm name with kwargs and a
``--checkpoint``, or just ``--checkpoint runs/x/last.pth`` from ``ravit train`` (its config rebuilds the model).
Images go through the eval transform of ``ravit train`` (dataset statistics, the model's channels).
Writes ``<output>/eval.json``, ``per_class.csv`` and ``per_class.png`` when ``--output`` is given.

Every number is the named weights' own: a model without weights, a classifier that would be re-initialised or
resized, ``--use-ema`` on a file without EMA weights and a model whose class count differs from the dataset's are
errors, not a score.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ravit.cli import CLIError
from ravit.cli._args import parse_model_kwargs, resolve_device
from ravit.errors import DataError, MissingFileError

__all__ = ["register", "run"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="clean accuracy of a model on a dataset split",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", help="ravit / timm / zoo model name (default: from a training checkpoint)")
    parser.add_argument("--pretrained", action="store_true", help="load the shipped weights (zoo models)")
    parser.add_argument("--checkpoint", help="weights to load: .safetensors, .pth, or a ravit train checkpoint")
    parser.add_argument("--use-ema", action="store_true", help="load the EMA weights of a training checkpoint")
    parser.add_argument(
        "--model-kwargs",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="model arguments, e.g. img_size=28 in_chans=1 num_classes=10 embed_dim=64",
    )
    parser.add_argument(
        "--dataset", help="registered dataset: fashion_mnist (default, or the training run's) / imagefolder"
    )
    parser.add_argument("--data-dir", help="dataset folder (Fashion-MNIST: default the Debian package's)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--img-size", type=int, help="input size (default: the model's, else the dataset's)")
    parser.add_argument("--limit", type=int, help="evaluate the first N images only")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda', 'cuda:N' ('auto': cuda when available)")
    parser.add_argument("--output", help="folder for eval.json, per_class.csv and per_class.png")
    parser.set_defaults(func=run)


def _check_args(args) -> None:
    """Every flag that can be checked before loading anything."""
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--img-size", args.img_size)):
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be >= 1, got {value}")
    if args.use_ema and not args.checkpoint:
        raise CLIError("--use-ema picks the EMA weights of a --checkpoint; pass one (or drop --use-ema)")
    if args.model is not None and not (args.pretrained or args.checkpoint):
        raise CLIError(f"{args.model!r} has no weights to evaluate: pass --pretrained (zoo models) or --checkpoint")


def _build(args):
    """(model, name, the training run's dataset or None, the input size it was built for or None)."""
    import ravit
    from ravit.train.checkpoint import load_training_checkpoint
    from ravit.train.config import TrainConfig
    from ravit.train.export import zoo_model_kwargs

    kwargs = parse_model_kwargs(args.model_kwargs)
    ckpt_path = Path(args.checkpoint) if args.checkpoint else None
    if ckpt_path is not None and not ckpt_path.is_file():
        raise MissingFileError(f"checkpoint not found: {ckpt_path}")
    if args.model is None:
        if ckpt_path is None or ckpt_path.suffix == ".safetensors":
            raise CLIError("name a MODEL, or pass --checkpoint with a ravit train checkpoint (last.pth / best.pth)")
        cfg = TrainConfig(**load_training_checkpoint(ckpt_path)["config"])
        model = ravit.create_model(cfg.model, **{**zoo_model_kwargs(cfg), **kwargs})
        ravit.load_checkpoint(model, ckpt_path, use_ema=args.use_ema, new_head=False)
        return model, cfg.model, cfg.dataset, {**zoo_model_kwargs(cfg), **kwargs}["img_size"]
    model = ravit.create_model(args.model, pretrained=args.pretrained, **kwargs)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    trained_classes = cfg.get("num_classes")
    if args.pretrained and ckpt_path is None and kwargs.get("num_classes", trained_classes) != trained_classes:
        raise CLIError(f"num_classes={kwargs['num_classes']} gives {args.model!r} a new, untrained classifier (its "
                       f"weights have {trained_classes} classes): drop num_classes to evaluate them")
    if ckpt_path is not None:
        ravit.load_checkpoint(model, ckpt_path, use_ema=args.use_ema, new_head=False)
    img_size = kwargs.get("img_size") or (cfg["input_size"][-1] if cfg.get("fixed_input_size") else None)
    return model, args.model, None, img_size


def _in_chans(model, default: int) -> int:
    """Input channels of the model's first conv (named by its pretrained config, timm's convention)."""
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    try:
        return model.get_submodule(first_conv).in_channels
    except (AttributeError, TypeError):
        return default


def _plot(per_class: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(per_class)), 4))
    ax.bar(range(len(per_class)), [row["top1"] for row in per_class])
    ax.set_xticks(range(len(per_class)), [row["class"] for row in per_class], rotation=45, ha="right")
    ax.set(title=title, xlabel="class", ylabel="top-1 accuracy (%)", ylim=(0, 100))
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def run(args) -> int:
    from tqdm import tqdm

    from ravit.data import create_dataset, create_transform, dataset_info
    from ravit.outputs import check_output_dir

    _check_args(args)
    device = resolve_device(args.device)
    if args.output:
        check_output_dir(args.output, "output folder")
    model, name, trained_on, built_size = _build(args)
    dataset = args.dataset or trained_on or "fashion_mnist"
    info = dataset_info(dataset)
    in_chans = _in_chans(model, info.in_chans)
    img_size = args.img_size or built_size or info.img_size
    if img_size is None:
        raise CLIError(f"dataset {dataset!r} has no native size: pass --img-size")
    tf = create_transform(img_size, in_chans, info.mean, info.std, is_training=False, crop_pct=info.crop_pct)
    ds = create_dataset(dataset, args.split, args.data_dir, tf)
    classes = list(ds.classes)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != len(classes):
        raise DataError(f"{name} predicts {num_classes} classes but {dataset!r} {args.split!r} has {len(classes)}: "
                        "evaluate it on a dataset with its classes (or a checkpoint trained on this one)")
    count = min(args.limit, len(ds)) if args.limit else len(ds)
    if count == 0:
        raise DataError(f"{dataset!r} {args.split!r} holds no images")
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=list(range(count)))

    model.eval().to(device)
    correct = torch.zeros(len(classes), dtype=torch.long)
    seen = torch.zeros(len(classes), dtype=torch.long)
    top5 = 0
    with torch.no_grad():
        for images, targets in tqdm(loader, desc=f"eval {name}", leave=False):
            logits = model(images.to(device)).cpu()  # (B, num_classes)
            hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.eq(targets[:, None])  # (B, 5)
            correct += torch.bincount(targets[hits[:, 0]], minlength=len(classes))
            seen += torch.bincount(targets, minlength=len(classes))
            top5 += int(hits.any(dim=-1).sum())
    per_class = [
        {"class": c, "count": int(n), "top1": 100 * float(k) / max(int(n), 1)}
        for c, k, n in zip(classes, correct, seen, strict=True)
    ]
    result = {
        "model": name,
        "dataset": dataset,
        "split": args.split,
        "count": count,
        "top1": 100 * float(correct.sum()) / count,
        "top5": 100 * top5 / count,
        "checkpoint": args.checkpoint,
        "pretrained": args.pretrained,
        "use_ema": args.use_ema,
        "per_class": per_class,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "per_class"}))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "eval.json.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out / "eval.json")
        with open(out / "per_class.csv.tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["class", "count", "top1"])
            writer.writeheader()
            writer.writerows(per_class)
        os.replace(out / "per_class.csv.tmp", out / "per_class.csv")
        _plot(per_class, f"{name} on {dataset} {args.split} (top-1 {result['top1']:.2f}%)", out / "per_class.png")
    return 0
