"""The study's Markdown report (``summary.md``, also printed): the claims table first, then every table behind it."""

from __future__ import annotations

from ravit.study.reduction import FAN_METHODS, METHODS

__all__ = ["markdown"]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _claims(summary: dict) -> list[str]:
    held = sum(c["holds"] for c in summary["claims"])
    lines = [f"## Claims: {held} of {len(summary['claims'])} hold here", "",
             "| # | claim | paper | measured here | holds |", "|---|---|---|---|---|"]
    for i, c in enumerate(summary["claims"], start=1):
        lines.append(f"| {i} | {_cell(c['claim'])} | {_cell(c['paper'])} | {_cell(c['measured'])} | "
                     f"{'**yes**' if c['holds'] else '**no**'} |")
    return lines


def _models(summary: dict) -> list[str]:
    lines = ["## Models", "", "| role | zoo name | blocks | parameters |", "|---|---|---|---|"]
    for role, name in summary["roles"].items():
        if name is not None:
            m = summary["models"][name]
            lines.append(f"| {summary['labels'][name]} ({role}) | {name} | {m['depth']} | {m['params']:,} |")
    return lines


def _robustness(summary: dict) -> list[str]:
    rob = summary["robustness"]
    lines = ["## Robustness (FAN §5)", "",
             "| model | clean | mean corr. acc. (15) | mean corr. acc. (all run) | retention (15) | mCE vs ViT (15) |",
             "|---|---|---|---|---|---|"]
    for name, r in rob.items():
        lines.append(
            f"| {summary['labels'][name]} | {_percent(r['clean_accuracy'])} | "
            f"{_percent(r['mean_corruption_accuracy_15'])} | {_percent(r['mean_corruption_accuracy'])} | "
            f"{_percent(r['retention_15'])} | {_percent(r['mce_vs_vit_15'])} |")
    if any(r["mce_vs_vit_15"] is None for r in rob.values()):
        lines += ["", "n/a: mCE vs ViT divides by the ViT's error on each of the 15 corruptions, and the ViT made "
                      "none on at least one of them on these images (or they were not run); use a larger --limit."]
    if any(r["retention_15"] is None for r in rob.values()):
        lines += ["", "n/a: retention divides by the clean accuracy, which is 0 here, or the 15 were not run."]
    return lines


def _reduction(summary: dict) -> list[str]:
    red = summary["token_reduction"]
    lines = ["## Token reduction on the ViT (ATS §4)", "",
             f"ATS blocks {red['first_ats_block']}–{red['depth'] - 1} (0-based; single-stage: block "
             f"{red['first_ats_block']} only). Accuracy on {red['images']} images, GMACs per image counted on the "
             f"first {red['gmacs_images']}.", "",
             "| method | budget | accuracy | GMACs | GMACs / dense |", "|---|---|---|---|---|"]
    for r in red["rows"]:
        lines.append(f"| {METHODS[r['method']]} | {r['setting']} | {_percent(r['accuracy'])} | {r['gmacs']:.4f} | "
                     f"{r['gmacs_ratio']:.3f} |")
    fan = summary["token_reduction_fan"]
    lines += ["", "## Token reduction on the FAN (ravit's ATS and ToMe on FAN; neither paper)", "",
              f"ATS blocks {fan['first_ats_block']}–{fan['depth'] - 1}, tokens scored by the attention they receive "
              f"x ‖V‖ (FAN blocks have no class token); same images.", "",
              "| method | budget | accuracy | GMACs | GMACs / dense |", "|---|---|---|---|---|"]
    for r in fan["rows"]:
        lines.append(f"| {FAN_METHODS[r['method']]} | {r['setting']} | {_percent(r['accuracy'])} | "
                     f"{r['gmacs']:.4f} | {r['gmacs_ratio']:.3f} |")
    return lines


def _grouping(summary: dict) -> list[str]:
    names = list(summary["grouping"])
    labels = [summary["labels"][n] for n in names]
    lines = ["## Token grouping per block (FAN §3)", "",
             "Significant eigenvalues (ravit's definition; lower = more grouping) and relative output change under "
             "Gaussian input noise (lower = more stable), blocks numbered from 1.", "",
             "| block | " + " | ".join(f"{lab} eigenvalues | {lab} perturbation" for lab in labels) + " |",
             "|---|" + "---|---|" * len(names)]
    depth = max(len(summary["grouping"][n]["significant_eigenvalues"]) for n in names)
    for b in range(depth):
        cells = []
        for n in names:
            eig = list(summary["grouping"][n]["significant_eigenvalues"].values())
            pert = list(summary["grouping"][n]["relative_perturbation"].values())
            cells += [f"{eig[b]:.2f}" if b < len(eig) else "", f"{pert[b]:.3f}" if b < len(pert) else ""]
        lines.append(f"| {b + 1} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict) -> str:
    s = summary["settings"]
    head = [f"# ravit study — {' vs '.join(summary['labels'][summary['roles'][r]] for r in ('vit', 'fan'))} on "
            f"Fashion-MNIST", "",
            f"Fashion-MNIST test split: token reduction on the first {s['limit']} images, "
            f"{len(s['corruptions'])} corruptions at severities {', '.join(map(str, s['severities']))} on the first "
            f"{s['corruption_images']}; grouping on {s['analysis_images']} images; "
            f"{'quick mode; ' if s['quick'] else ''}{summary['seconds']:.0f} s.", ""]
    parts = [head, _claims(summary), _models(summary), _robustness(summary), _reduction(summary), _grouping(summary)]
    return "\n".join(line for part in parts for line in [*part, ""]).rstrip() + "\n"
