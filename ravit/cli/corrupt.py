"""``ravit corrupt DATA OUT``: write an ImageNet-C style copy (``OUT/<corruption>/<severity>/<class>/<image>``)."""

from __future__ import annotations

import argparse

from ravit.cli import CLIError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "corrupt",
        help="write corrupted copies of a dataset in the ImageNet-C layout",
        description="Write OUT/<corruption>/<severity>/<class>/<image> for an ImageFolder or Fashion-MNIST. "
        "Interrupted runs resume where they stopped; no half-written files are left.",
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
    p.add_argument("--device", default="cpu")
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


def run(args) -> int:
    from ravit.robustness import resolve_corruptions
    from ravit.robustness.writer import source_images, write_c_dataset

    names = resolve_corruptions(args.corruptions)
    sevs = parse_severities(args.severities)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise CLIError("--batch-size and --limit must be positive")
    source = source_images(args.data, args.split, args.data_dir, args.recipe).head(args.limit)
    stats = write_c_dataset(source, args.out, names, sevs, recipe=args.recipe, batch_size=args.batch_size,
                            seed=args.seed, device=args.device)
    print(f"wrote {stats['written']} images, skipped {stats['skipped']} already present, under {args.out}")
    return 0
