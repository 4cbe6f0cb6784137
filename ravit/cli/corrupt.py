"""``ravit corrupt DATA OUT``: write an ImageNet-C style copy (``OUT/<corruption>/<severity>/<class>/<image>``).

Every argument is checked (corruptions, severities, sizes, device, output folder) before any image is read."""

from __future__ import annotations

import argparse
import sys
import warnings

from ravit.cli import CLIError
from ravit.outputs import check_output_dir


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "corrupt",
        help="write corrupted copies of a dataset in the ImageNet-C layout",
        description="Write OUT/<corruption>/<severity>/<class>/<image> for an ImageFolder or Fashion-MNIST. "
        "Interrupted runs resume where they stopped; no half-written files are left. OUT/ravit-corrupt.json records "
        "the source, recipe and seed (a rerun with other ones is refused) and each class folder's class name, which "
        "'ravit robustness' uses to match folders to the model's classes. Each image's corruption depends only on "
        "the image, its index and --seed (not on --batch-size).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data", help="ImageFolder path, or 'fashion-mnist'")
    p.add_argument("out", help="output root")
    p.add_argument("--corruptions", default="all",
                   help="comma-separated names or groups: all, benchmark (15), extra (4), noise, blur, weather, "
                   "digital")
    p.add_argument("--severities", default="1,2,3,4,5", help="comma-separated severities in 1..5")
    p.add_argument("--recipe", choices=("keep", "imagenet-c"), default="keep",
                   help="'imagenet-c': resize 256, centre crop 224, corrupt, JPEG q85 (the original recipe); "
                   "'keep': original size, PNG")
    p.add_argument("--split", default="test", help="Fashion-MNIST split (train or test)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto'")
    p.set_defaults(func=run)


def parse_severities(text: str) -> list[int]:
    try:
        sevs = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise CLIError(f"severities must be integers in 1..5, got {text!r}") from err
    bad = [s for s in sevs if s not in range(1, 6)]
    if bad or not sevs:
        raise CLIError(f"unknown severity {bad[0] if bad else text!r}; valid severities: 1, 2, 3, 4, 5")
    return sevs


def check_positive(**flags: int | None) -> None:
    """``--name`` values that must be >= 1 when given (keyword: the flag with '_' for '-')."""
    for name, value in flags.items():
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def run(args) -> int:
    from ravit.cli._args import resolve_device
    from ravit.robustness import resolve_corruptions
    from ravit.robustness.writer import source_images, write_c_dataset

    names = resolve_corruptions(args.corruptions)
    sevs = parse_severities(args.severities)
    check_positive(batch_size=args.batch_size, limit=args.limit)
    device = resolve_device(args.device)
    check_output_dir(args.out, "OUT")
    source = source_images(args.data, args.split, args.data_dir, args.recipe).head(args.limit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = write_c_dataset(source, args.out, names, sevs, recipe=args.recipe, batch_size=args.batch_size,
                                seed=args.seed, device=device)
    for w in caught:
        print(f"ravit corrupt: warning: {w.message}", file=sys.stderr)
    print(f"wrote {stats['written']} images, skipped {stats['skipped']} already present, under {args.out}")
    if stats["unreadable"]:
        print(f"skipped {stats['unreadable']} unreadable source images (named in the warnings above)")
    return 0
