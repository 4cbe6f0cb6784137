"""``ravit corrupt --data DATA --output OUT``: write an ImageNet-C style copy of a dataset,
``OUT/<corruption>/<severity>/<class>/<image>`` (Hendrycks & Dietterich, ICLR 2019; FAN Sec. 5 evaluates on it).

Interrupted runs resume where they stopped; no half-written files are left. OUT/ravit-corrupt.json records the source,
recipe and seed (a rerun with other ones is refused) and each class folder's class name, which ``ravit robustness``
uses to match folders to the model's classes. Each image's corruption depends only on the image, its index and
--seed (not on --batch-size). Every argument is checked (corruptions, severities, sizes, device, output folder) before
any image is read.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from ravit.cli._args import (
    add_count_argument,
    add_data_arguments,
    add_device_argument,
    add_list_argument,
    add_output_argument,
    corruption,
    output_dir,
    resolve_device,
    severity,
)

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser("corrupt", help="write corrupted copies of a dataset in the ImageNet-C layout",
                              description=__doc__)
    add_data_arguments(p)
    add_output_argument(p, "corrupt", "<DATA>")
    add_list_argument(p, "--corruptions", corruption, "names or groups: all, benchmark (15), extra (4), noise, blur, "
                      "weather, digital", default=["all"], metavar="NAME")
    add_list_argument(p, "--severities", severity, "severities in 1..5", default=[1, 2, 3, 4, 5], metavar="S")
    p.add_argument("--recipe", choices=("keep", "imagenet-c"), default="keep",
                   help="'imagenet-c': resize 256, centre crop 224, corrupt, JPEG q85 (the original recipe); "
                   "'keep': original size, PNG")
    add_count_argument(p, "--limit", None, "only the first N images")
    add_count_argument(p, "--batch-size", 32, "images per batch")
    p.add_argument("--seed", type=int, default=0, help="seeds every image's corruption")
    add_device_argument(p, default="cpu")
    p.set_defaults(func=run)


def _source(data: str, split: str) -> tuple[str, str]:
    """(what ``source_images`` reads, the name of the default output folder): a dataset name as it is, an image
    folder's ``<split>`` subfolder when there is one."""
    from ravit.data import data_name

    if data_name(data) is not None:
        return data, data
    folder = Path(data)
    return str(folder / split if (folder / split).is_dir() else folder), folder.resolve().name


def run(args) -> int:
    from ravit.robustness import resolve_corruptions
    from ravit.robustness.writer import source_images, write_c_dataset

    names = resolve_corruptions(args.corruptions)
    device = resolve_device(args.device)
    data, label = _source(args.data, args.split)
    out = output_dir(args, "corrupt", label)
    source = source_images(data, args.split, args.data_dir, args.recipe).head(args.limit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = write_c_dataset(source, out, names, args.severities, recipe=args.recipe, batch_size=args.batch_size,
                                seed=args.seed, device=device)
    for w in caught:
        print(f"ravit corrupt: warning: {w.message}", file=sys.stderr)
    print(f"wrote {stats['written']} images, skipped {stats['skipped']} already present, under {out}")
    if stats["unreadable"]:
        print(f"skipped {stats['unreadable']} unreadable source images (named in the warnings above)")
    return 0
