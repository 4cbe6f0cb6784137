"""``ravit study``: the main job (both papers in miniature on Fashion-MNIST); see :mod:`ravit.study`."""

from __future__ import annotations

import argparse


def _budgets(items: list[str]) -> list:
    """``all``/``none``, an int token count or a ratio, each (their range is checked against the ViT by the study)."""
    from ravit.ats import parse_budget
    from ravit.cli import CLIError

    try:
        return [parse_budget(item) for item in items]
    except ValueError as err:
        raise CLIError(f"--budgets: {err}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "study",
        help="FAN robustness, ATS savings and token grouping on Fashion-MNIST with the shipped zoo models",
        description="Reproduces both papers' claims in miniature on Fashion-MNIST with the shipped zoo models and "
        "writes summary.json, summary.md, CSV files and PNG figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--vit", default=None, help="zoo name of the DeiT-style ViT (default: the shipped one)")
    p.add_argument("--fan", default=None, help="zoo name of the FAN-ViT (default: the shipped one)")
    p.add_argument("--limit", type=int, default=1000, help="first N Fashion-MNIST test images")
    p.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5], choices=[1, 2, 3, 4, 5])
    p.add_argument("--budgets", nargs="+", default=["all", "0.75", "0.5", "0.35"],
                   help="ATS budgets: 'all', a ratio in (0, 1] such as 0.5, or a token count (an integer >= 1)")
    p.add_argument("--gmacs-images", type=int, default=200, help="count ATS GMACs per image on the first N images")
    p.add_argument("--analysis-images", type=int, default=64)
    p.add_argument("--noise-std", type=float, default=0.5, help="Gaussian noise std (normalised input units)")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ravit.cli._args import resolve_device
    from ravit.study import DEFAULT_FAN, DEFAULT_VIT, run_study

    run_study(
        args.out, vit=args.vit or DEFAULT_VIT, fan=args.fan or DEFAULT_FAN, limit=args.limit,
        severities=args.severities, budgets=_budgets(args.budgets), analysis_images=args.analysis_images,
        noise_std=args.noise_std, gmacs_images=args.gmacs_images, progress=not args.no_progress,
        device=resolve_device(args.device),
    )
    with open(f"{args.out}/summary.md") as f:
        print(f.read())
    print(f"results written to {args.out}/ (summary.json, summary.md, CSV and PNG files)")
    return 0
