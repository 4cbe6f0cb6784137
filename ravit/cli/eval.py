"""``ravit eval``: clean top-1 / top-5 accuracy of a model on a dataset split, overall and per class.

The model is a zoo name (``ravit eval fmnist_deit_p4 --pretrained``), any ravit / timm name with ``--model-kwargs`` and
a ``--checkpoint``, or just ``--checkpoint runs/x/last.pth`` from ``ravit train`` (its config rebuilds the model and
names its data). Images are brought to the model as ``ravit.data.ModelInput`` says (for weights ``ravit train`` made:
its eval transform, with the dataset's statistics). Writes ``eval.json``, ``per_class.csv`` and ``per_class.png`` to
``--output`` (default ``runs/eval/<MODEL>``).

Every number is the named weights' own: a model without weights, a classifier that would be re-initialised or
resized, ``--use-ema`` on a file without EMA weights and a model whose class count differs from the dataset's are
errors, not a score.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from ravit.cli._args import (
    add_bf16_argument,
    add_count_argument,
    add_data_arguments,
    add_device_argument,
    add_model_arguments,
    add_output_argument,
    model_input,
    output_dir,
    resolve_device,
)
from ravit.errors import DataError, InvalidArgumentError

__all__ = ["register", "run"]


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="clean accuracy of a model on a dataset split", description=__doc__)
    add_model_arguments(parser, optional=True, model_help="ravit / timm / zoo model name (default: the model of a "
                                                          "ravit train --checkpoint)")
    parser.add_argument("--use-ema", action="store_true", help="load the EMA weights of a training checkpoint")
    add_data_arguments(parser, default=None, data_help="a dataset name (fashion-mnist) or an image folder: "
                       "<folder>/<class>/<image>, or <folder>/<split>/<class>/<image> (default: the training run's "
                       "data, else fashion-mnist)")
    add_count_argument(parser, "--img-size", None, "input size (default: the model's, else the dataset's)")
    add_count_argument(parser, "--limit", None, "evaluate the first N images only")
    add_count_argument(parser, "--batch-size", 256, "images per batch")
    add_count_argument(parser, "--workers", 0, "data loader workers", least=0)
    add_device_argument(parser)
    add_bf16_argument(parser)
    add_output_argument(parser, "eval")
    parser.set_defaults(func=run)


def _check_args(args) -> None:
    """Every flag that can be checked before loading anything."""
    if args.use_ema and not args.checkpoint:
        raise InvalidArgumentError("--use-ema picks the EMA weights of a --checkpoint; pass one (or drop --use-ema)")
    if args.model is not None and not (args.pretrained or args.checkpoint):
        raise InvalidArgumentError(f"{args.model!r} has no weights to evaluate: pass --pretrained (zoo models) or "
                                   "--checkpoint")
    if args.model is None and (args.checkpoint is None or Path(args.checkpoint).suffix == ".safetensors"):
        raise InvalidArgumentError("name a MODEL, or pass --checkpoint with a ravit train checkpoint (last.pth / "
                                   "best.pth)")


def _from_training_run(args):
    """(model, name, data, data_dir, the dataset it was trained on, the input size it was built for) from the config
    in a ``ravit train`` checkpoint; ``--data`` / ``--data-dir`` given on the command line win."""
    import ravit
    from ravit.data import dataset_info
    from ravit.train.checkpoint import load_training_checkpoint
    from ravit.train.config import TrainConfig
    from ravit.train.export import zoo_model_kwargs

    cfg = TrainConfig(**load_training_checkpoint(args.checkpoint)["config"])
    kwargs = {**zoo_model_kwargs(cfg), **args.model_kwargs}
    model = ravit.create_model(cfg.model, **kwargs)
    ravit.load_checkpoint(model, args.checkpoint, use_ema=args.use_ema, new_head=False)
    trained_data = cfg.data_dir if cfg.dataset == "imagefolder" else cfg.dataset.replace("_", "-")
    data_dir = args.data_dir or (None if cfg.dataset == "imagefolder" else cfg.data_dir)
    return model, cfg.model, args.data or trained_data, data_dir, dataset_info(cfg.dataset), kwargs["img_size"]


def _from_name(args):
    """The named MODEL with its --pretrained weights and --checkpoint; its classifier is never re-initialised."""
    import ravit

    model = ravit.create_model(args.model, pretrained=args.pretrained, **args.model_kwargs)
    trained_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    asked_classes = args.model_kwargs.get("num_classes", trained_classes)
    if args.pretrained and args.checkpoint is None and asked_classes != trained_classes:
        raise InvalidArgumentError(f"num_classes={args.model_kwargs['num_classes']} gives {args.model!r} a new, "
                                   f"untrained classifier (its weights have {trained_classes} classes): drop "
                                   "num_classes to evaluate them")
    if args.checkpoint is not None:
        ravit.load_checkpoint(model, args.checkpoint, use_ema=args.use_ema, new_head=False)
    return model


def _plot(per_class: list[dict], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ravit.outputs import write_bytes

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(per_class)), 4))
    ax.bar(range(len(per_class)), [row["top1"] for row in per_class])
    ax.set_xticks(range(len(per_class)), [row["class"] for row in per_class], rotation=45, ha="right")
    ax.set(title=title, xlabel="class", ylabel="top-1 accuracy (%)", ylim=(0, 100))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return write_bytes(path, buffer.getvalue())


def run(args) -> int:
    from tqdm import tqdm

    from ravit.data import ModelInput, data_name, open_data
    from ravit.outputs import write_json, write_text

    _check_args(args)
    device = resolve_device(args.device)
    if args.model is not None:
        out = output_dir(args, "eval", args.model)  # checked before anything is loaded
        model, name = _from_name(args), args.model
        data, data_dir = args.data or "fashion-mnist", args.data_dir
        spec = model_input(model, data, args.pretrained, args.img_size)
    else:
        model, name, data, data_dir, trained_on, built_size = _from_training_run(args)
        out = output_dir(args, "eval", name)
        spec = ModelInput.from_model(model, img_size=args.img_size or built_size, trained_on=trained_on)
    dataset = open_data(data, args.split, data_dir, spec.transform())
    where = data_name(data) or data
    classes = list(dataset.classes)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != len(classes):
        raise DataError(f"{name} predicts {num_classes} classes but {where!r} {args.split!r} has {len(classes)}: "
                        "evaluate it on a dataset with its classes (or a checkpoint trained on this one)")
    count = min(args.limit, len(dataset)) if args.limit else len(dataset)
    if count == 0:
        raise DataError(f"{where!r} {args.split!r} holds no images")
    loader = DataLoader(Subset(dataset, range(count)), batch_size=args.batch_size, num_workers=args.workers)

    model.eval().to(device)
    correct = torch.zeros(len(classes), dtype=torch.long)
    seen = torch.zeros(len(classes), dtype=torch.long)
    top5 = 0
    with torch.no_grad():
        for images, targets in tqdm(loader, desc=f"eval {name}", leave=False):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(images.to(device)).float().cpu()  # (B, num_classes)
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
        "data": data,
        "split": args.split,
        "count": count,
        "top1": 100 * float(correct.sum()) / count,
        "top5": 100 * top5 / count,
        "checkpoint": args.checkpoint,
        "pretrained": args.pretrained,
        "use_ema": args.use_ema,
        "precision": "bf16" if args.bf16 else "fp32",
        "per_class": per_class,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "per_class"}))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["class", "count", "top1"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(per_class)
    paths = [
        write_json(out / "eval.json", result),
        write_text(out / "per_class.csv", table.getvalue()),
        _plot(per_class, f"{name} on {data} {args.split} (top-1 {result['top1']:.2f}%)", out / "per_class.png"),
    ]
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
