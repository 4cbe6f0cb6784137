"""``ravit study [VIT] [FAN]``: the main job, both papers in miniature on Fashion-MNIST; see :mod:`ravit.study`.

VIT and FAN are the two zoo models it compares (their shipped weights): a DeiT-style ViT, which ATS is applied to and
whose errors normalise the mCE, and a FAN-ViT. Writes summary.json, summary.md, CSV files and PNG figures to
``--output`` (default ``runs/study/<VIT>_vs_<FAN>``), a folder the study replaces as a whole.
"""

from __future__ import annotations

from ravit.cli._args import (
    add_count_argument,
    add_device_argument,
    add_list_argument,
    add_output_argument,
    add_value_argument,
    budget,
    noise_std,
    output_dir,
    resolve_device,
    severity,
)

__all__ = ["register", "run"]


def register(subparsers) -> None:
    from ravit.study import DEFAULT_FAN, DEFAULT_VIT

    p = subparsers.add_parser(
        "study",
        help="FAN robustness, ATS savings and token grouping on Fashion-MNIST with the shipped zoo models",
        description=__doc__,
    )
    p.add_argument("vit", metavar="VIT", nargs="?", default=DEFAULT_VIT, help="zoo name of the DeiT-style ViT")
    p.add_argument("fan", metavar="FAN", nargs="?", default=DEFAULT_FAN, help="zoo name of the FAN-ViT")
    add_output_argument(p, "study", "<VIT>_vs_<FAN>")
    add_count_argument(p, "--limit", 1000, "the first N Fashion-MNIST test images")
    add_list_argument(p, "--severities", severity, "corruption severities in 1..5", default=[1, 2, 3, 4, 5],
                      metavar="S")
    add_list_argument(p, "--budgets", budget, "ATS budgets to compare: all, a ratio in (0, 1] such as 0.5, or a token "
                      "count (an integer >= 1) (default: all 0.75 0.5 0.35)", default=[None, 0.75, 0.5, 0.35],
                      metavar="BUDGET")
    add_count_argument(p, "--gmacs-images", 200, "count ATS GMACs per image on the first N images")
    add_count_argument(p, "--analysis-images", 64, "images for the token-grouping part")
    add_value_argument(p, "--noise-std", noise_std, "Gaussian noise std of the perturbation part (normalised input "
                       "units)", default=0.5, metavar="STD")
    add_device_argument(p, default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ravit.study import run_study

    out = output_dir(args, "study", f"{args.vit}_vs_{args.fan}")
    run_study(
        out, vit=args.vit, fan=args.fan, limit=args.limit, severities=args.severities, budgets=args.budgets,
        analysis_images=args.analysis_images, noise_std=args.noise_std, gmacs_images=args.gmacs_images,
        progress=not args.no_progress, device=resolve_device(args.device),
    )
    print((out / "summary.md").read_text())
    print(f"results written to {out}/ (summary.json, summary.md, CSV and PNG files)")
    return 0
