"""``ravit study [VIT] [FAN]``: the main job, every claim of both papers checked on Fashion-MNIST (:mod:`ravit.study`).

VIT and FAN are the two zoo models it compares (their shipped weights): a DeiT-style ViT, which ATS and ToMe are
applied to and whose errors normalise the mCE, and a FAN-ViT. ``--finetuned`` names the ViT fine-tuned with ATS in the
loop. Writes summary.json (the claims under "claims"), summary.md (printed), summary.png, CSV files and PNG figures to
``--output`` (default ``runs/study/<VIT>_vs_<FAN>``), a folder the study replaces as a whole. ``--quick`` runs a smaller
version (fewer images, severities and budgets); any setting given on its own overrides the preset.
"""

from __future__ import annotations

from ravit.cli._args import (
    add_count_argument,
    add_device_argument,
    add_list_argument,
    add_output_argument,
    add_value_argument,
    budget,
    corruption,
    noise_std,
    output_dir,
    resolve_device,
    severity,
)

__all__ = ["register", "run"]


def register(subparsers) -> None:
    from ravit.study import DEFAULT_FAN, DEFAULT_VIT, DEFAULT_VIT_ATS, DEFAULTS, QUICK

    def preset(key: str) -> str:
        def show(values):
            return " ".join("all" if v is None else str(v) for v in values) if isinstance(values, tuple) else values
        return f"(default {show(DEFAULTS[key])}; --quick {show(QUICK[key])})"

    p = subparsers.add_parser(
        "study",
        help="every claim of the FAN and ATS papers checked on Fashion-MNIST with the shipped zoo models",
        description=__doc__,
    )
    p.add_argument("vit", metavar="VIT", nargs="?", default=DEFAULT_VIT, help="zoo name of the DeiT-style ViT")
    p.add_argument("fan", metavar="FAN", nargs="?", default=DEFAULT_FAN, help="zoo name of the FAN-ViT")
    p.add_argument("--finetuned", metavar="NAME", default="auto",
                   help=f"zoo name of the ViT fine-tuned with ATS; 'auto' (default): the zoo's fine-tuned version of "
                        f"VIT if it has one ({DEFAULT_VIT_ATS} for {DEFAULT_VIT}); 'none' to leave it out")
    add_output_argument(p, "study", "<VIT>_vs_<FAN>")
    p.add_argument("--quick", action="store_true", help="a smaller run of every part (about 2 minutes)")
    add_count_argument(p, "--limit", None, f"token reduction on the first N Fashion-MNIST test images "
                       f"{preset('limit')}")
    add_count_argument(p, "--corruption-images", None, f"robustness on the first N test images, each under every "
                       f"corruption and severity {preset('corruption_images')}")
    add_list_argument(p, "--corruptions", corruption, "corruptions to run (default and --quick: the 15 of "
                      "ImageNet-C's mCE)", metavar="NAME")
    add_list_argument(p, "--severities", severity, f"corruption severities in 1..5 {preset('severities')}",
                      metavar="S")
    add_list_argument(p, "--budgets", budget, "budgets K per block of the multi-stage ATS settings: all, a ratio "
                      f"in (0, 1] such as 0.5, or a token count (an integer >= 1) {preset('budgets')}",
                      metavar="BUDGET")
    add_count_argument(p, "--gmacs-images", None, f"count GMACs per image on the first N images "
                       f"{preset('gmacs_images')}")
    add_count_argument(p, "--analysis-images", None, f"images for the token-grouping part "
                       f"{preset('analysis_images')}")
    add_value_argument(p, "--noise-std", noise_std, "Gaussian noise std of the perturbation part (normalised input "
                       "units)", default=0.5, metavar="STD")
    add_device_argument(p, default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ravit.study import run_study

    out = output_dir(args, "study", f"{args.vit}_vs_{args.fan}")
    finetuned = None if args.finetuned in (None, "none") else args.finetuned
    run_study(
        out, vit=args.vit, fan=args.fan, vit_ats=finetuned, quick=args.quick, limit=args.limit,
        corruption_images=args.corruption_images,
        corruptions=args.corruptions, severities=args.severities, budgets=args.budgets,
        analysis_images=args.analysis_images, gmacs_images=args.gmacs_images, noise_std=args.noise_std,
        progress=not args.no_progress, device=resolve_device(args.device),
    )
    print((out / "summary.md").read_text())
    print(f"results written to {out}/ (summary.json, summary.md, summary.png, CSV and PNG files)")
    return 0
