"""The study's verdicts: each claim of the two papers, the paper's numbers, what this run measured, and whether the
claim holds here. Pure functions of the study's summary; every criterion is fixed below, before any result is seen.

"At equal GMACs" compares two accuracy-vs-GMACs curves on five evenly spaced GMACs levels over the range both
cover (piecewise-linear interpolation between measured points); a method "beats" another when its accuracy is
higher on average over those levels. Curves that share no GMACs range cannot be compared: the claim then does not
hold (it was not shown), and the row says why.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CRITERIA", "claims", "compare_at_equal_gmacs", "thirds"]

# The thresholds, stated once. "About a third" (ATS Sec. 4.1: DeiT-S 4.6 -> 2.9 GMACs, -37%) is read as a cut of at
# least 25%; "a small loss" as at most 1 point (the paper's off-the-shelf multi-stage loss is 0.6); "most of the
# gap" as at least half.
CRITERIA = {"gmacs_cut_at_least": 0.25, "loss_at_most_pt": 1.0, "gap_closed_at_least": 0.5, "levels": 5}


def thirds(values: list[float]) -> tuple[float, float, float]:
    """Means over the first, middle and last third of the blocks (with fewer than 3 blocks, the middle one is the
    first block's neighbour or the first block)."""
    n = len(values)
    cut = max(1, n // 3)
    parts = values[:cut], values[cut : n - cut] or values[min(cut, n - 1) : min(cut, n - 1) + 1], values[n - cut :]
    return tuple(float(np.mean(p)) for p in parts)


def _curve(rows: list[dict], method: str) -> tuple[np.ndarray, np.ndarray]:
    """(GMACs ratios ascending, accuracies) of one method's points; equal GMACs averaged."""
    points = {}
    for r in rows:
        if r["method"] == method:
            points.setdefault(r["gmacs_ratio"], []).append(r["accuracy"])
    g = np.array(sorted(points))
    return g, np.array([np.mean(points[x]) for x in g])


def compare_at_equal_gmacs(rows: list[dict], a: str, b: str) -> dict | None:
    """Accuracy of method ``a`` minus method ``b`` at ``CRITERIA['levels']`` GMACs levels over the common range;
    None when the two share no range. Returns lo, hi, levels, a, b (accuracies at the levels) and mean (a - b)."""
    ga, aa = _curve(rows, a)
    gb, ab = _curve(rows, b)
    if not len(ga) or not len(gb):
        return None
    lo, hi = max(ga[0], gb[0]), min(ga[-1], gb[-1])
    if lo > hi:
        return None
    levels = np.linspace(lo, hi, CRITERIA["levels"]) if hi > lo else np.array([lo])
    va, vb = np.interp(levels, ga, aa), np.interp(levels, gb, ab)
    return {"lo": float(lo), "hi": float(hi), "levels": levels.tolist(), "a": va.tolist(), "b": vb.tolist(),
            "mean": float(np.mean(va - vb))}


def _pt(x: float) -> str:
    return f"{100 * x:.1f}"


def _versus(cmp: dict | None, a: str, b: str) -> tuple[str, bool]:
    if cmp is None:
        return f"{a} and {b} share no GMACs range: not compared", False
    per = ", ".join(f"{g:.2f}x: {_pt(x)} vs {_pt(y)}" for g, x, y in zip(cmp["levels"], cmp["a"], cmp["b"],
                                                                             strict=True))
    return (f"{a} {'+' if cmp['mean'] >= 0 else '−'}{abs(100 * cmp['mean']):.1f} pt vs {b} on average over "
            f"GMACs {cmp['lo']:.2f}–{cmp['hi']:.2f}x of dense ({per})"), cmp["mean"] > 0


def _row(rows: list[dict], method: str, setting: str) -> dict | None:
    return next((r for r in rows if r["method"] == method and r["setting"] == setting), None)


def _robust(summary: dict) -> dict:
    vit, fan = summary["roles"]["vit"], summary["roles"]["fan"]
    rv, rf = summary["robustness"][vit], summary["robustness"][fan]
    label = summary["labels"]
    if rv["mean_corruption_accuracy_15"] is None:
        measured, holds = "no ImageNet-C benchmark corruption was run", False
    else:
        mce = rf["mce_vs_vit_15"]
        measured = (f"mean accuracy over the 15 corruptions: {label[fan]} {_pt(rf['mean_corruption_accuracy_15'])}% "
                    f"vs {label[vit]} {_pt(rv['mean_corruption_accuracy_15'])}% (clean {_pt(rf['clean_accuracy'])} "
                    f"vs {_pt(rv['clean_accuracy'])}); mCE of {label[fan]} with {label[vit]} = 100%: "
                    f"{'n/a (the ViT made no error on a corruption)' if mce is None else f'{100 * mce:.1f}%'}")
        holds = rf["mean_corruption_accuracy_15"] > rv["mean_corruption_accuracy_15"] and mce is not None and mce < 1
    return {
        "id": "fan-robustness",
        "claim": "FAN is more robust to corruptions than a ViT of similar size: higher mean accuracy over the 15 "
                 "ImageNet-C corruptions, and an mCE below 100% with the ViT as the baseline",
        "paper": "FAN §5, Table 8 (ImageNet-C): DeiT-S 79.9 clean / 58.1 mean corruption accuracy (72.7% kept) vs "
                 "FAN-S-ViT 82.5 / 64.5 (78%)",
        "measured": measured,
        "holds": bool(holds),
    }


def _block_trend(summary: dict, key: str) -> tuple[str, bool]:
    vit, fan = summary["roles"]["vit"], summary["roles"]["fan"]
    label = summary["labels"]
    parts, drops = [], []
    for name in (vit, fan):
        values = list(summary["grouping"][name][key].values())
        first, middle, last = thirds(values)
        drops.append(middle < first)
        parts.append(f"{label[name]}: {first:.3g} → {middle:.3g} → {last:.3g} (first/middle/last third of the "
                     f"{len(values)} blocks)")
    mean_vit = float(np.mean(list(summary["grouping"][vit][key].values())))
    mean_fan = float(np.mean(list(summary["grouping"][fan][key].values())))
    measured = "; ".join(parts) + f"; mean over blocks {label[fan]} {mean_fan:.3g} vs {label[vit]} {mean_vit:.3g}"
    return measured, all(drops) and mean_fan < mean_vit


def _grouping(summary: dict) -> dict:
    measured, holds = _block_trend(summary, "significant_eigenvalues")
    return {
        "id": "fan-grouping",
        "claim": "Tokens group with depth: the number of significant eigenvalues of the token affinity is lower in "
                 "the middle blocks than in the first ones, for both models, and lower for FAN than for the ViT "
                 "(ravit's definition of the count: Gaussian affinity of the L2-normalised tokens, eigenvalues of "
                 "the normalised affinity >= 0.5 x the largest; the paper's was not published)",
        "paper": "FAN §3, Fig. 3: the significant eigenvalues of ViT token features fall with depth; FAN's channel "
                 "attention promotes grouping",
        "measured": measured,
        "holds": bool(holds),
    }


def _perturbation(summary: dict) -> dict:
    measured, holds = _block_trend(summary, "relative_perturbation")
    return {
        "id": "fan-perturbation",
        "claim": "The relative change of block outputs under Gaussian input noise decays in the middle blocks "
                 "(lower than in the first ones), for both models, and is smaller for FAN than for the ViT",
        "paper": "FAN §3, Fig. 3: the noise perturbation of ViT block outputs decays quickly with depth; FAN "
                 "reduces it further",
        "measured": measured,
        "holds": bool(holds),
    }


def _off_the_shelf(summary: dict) -> dict:
    rows = summary["token_reduction"]["rows"]
    dense, ats = _row(rows, "dense", "all"), _row(rows, "ats", "all")
    claim = {
        "id": "ats-off-the-shelf",
        "claim": f"ATS plugged into the trained ViT without fine-tuning (blocks "
                 f"{summary['token_reduction']['first_ats_block']}–{summary['token_reduction']['depth'] - 1}, the "
                 f"released default budget) cuts GMACs by about a third (at least "
                 f"{100 * CRITERIA['gmacs_cut_at_least']:.0f}%) at a small accuracy loss (at most "
                 f"{CRITERIA['loss_at_most_pt']:g} pt)",
        "paper": "ATS §4.1: DeiT-S 4.6 → 2.9 GMACs (−37%); multi-stage without fine-tuning 79.2% vs 79.8% dense",
    }
    if ats is None:
        return {**claim, "measured": "the default budget ('all') was not in --budgets", "holds": False}
    cut, loss = 1 - ats["gmacs_ratio"], 100 * (dense["accuracy"] - ats["accuracy"])
    return {**claim, "measured": f"GMACs −{100 * cut:.1f}% ({ats['gmacs']:.4f} vs {dense['gmacs']:.4f}), accuracy "
                                 f"{_pt(ats['accuracy'])}% vs {_pt(dense['accuracy'])}% ({-loss:+.1f} pt)",
            "holds": bool(cut >= CRITERIA["gmacs_cut_at_least"] and loss <= CRITERIA["loss_at_most_pt"])}


def _pairwise(summary: dict, cid: str, claim: str, paper: str, a: str, b: str, name_a: str, name_b: str) -> dict:
    measured, holds = _versus(compare_at_equal_gmacs(summary["token_reduction"]["rows"], a, b), name_a, name_b)
    return {"id": cid, "claim": claim, "paper": paper, "measured": measured, "holds": bool(holds)}


def _comparisons(summary: dict, *pairs: tuple[str, str, str, str], key: str = "token_reduction"):
    """Equal-GMACs comparisons ``(method a, method b, name a, name b)`` in the sweep ``summary[key]``: the joined
    text and each verdict."""
    rows = summary[key]["rows"]
    results = [_versus(compare_at_equal_gmacs(rows, *pair[:2]), *pair[2:]) for pair in pairs]
    return "; ".join(m for m, _ in results), *(h for _, h in results)


def _scoring(summary: dict) -> dict:
    measured, h1, h2 = _comparisons(summary, ("ats", "ats_attention", "attention x ‖V‖", "attention alone"),
                                    ("ats", "random", "attention x ‖V‖", "random"))
    return {
        "id": "ats-scoring",
        "claim": "Scoring tokens by class attention x value norm beats class attention alone and random selection "
                 "at equal GMACs (multi-stage, no fine-tuning)",
        "paper": "ATS §4.3 (the ‖V‖ and random ablations; their numbers are not on the poster we could read)",
        "measured": measured,
        "holds": bool(h1 and h2),
    }


def _finetune(summary: dict) -> dict:
    rows = summary["token_reduction"]["rows"]
    claim = {
        "id": "ats-finetune",
        "claim": f"Fine-tuning with ATS in the loop closes most of the gap (at least "
                 f"{100 * CRITERIA['gap_closed_at_least']:.0f}%) between the dense ViT and ATS without fine-tuning, "
                 f"at the budget it was fine-tuned with (the released default)",
        "paper": "ATS §4.2 b / Table 1: DeiT-S 79.8 dense, 79.2 with ATS off the shelf, 79.7 fine-tuned (2.9 GMACs)",
    }
    dense, off, tuned = _row(rows, "dense", "all"), _row(rows, "ats", "all"), _row(rows, "ats_finetuned", "all")
    if tuned is None or off is None:
        return {**claim, "measured": "no fine-tuned ViT in this run (or no 'all' budget)", "holds": False}
    gap = dense["accuracy"] - off["accuracy"]
    closed = (tuned["accuracy"] - off["accuracy"]) / gap if gap > 0 else None
    measured = (f"dense {_pt(dense['accuracy'])}%, ATS off the shelf {_pt(off['accuracy'])}% at "
                f"{off['gmacs_ratio']:.2f}x GMACs, fine-tuned with ATS {_pt(tuned['accuracy'])}% at "
                f"{tuned['gmacs_ratio']:.2f}x: " + ("no gap to close" if closed is None else
                                                    f"{100 * closed:.0f}% of the gap closed"))
    holds = tuned["accuracy"] >= off["accuracy"] if closed is None else closed >= CRITERIA["gap_closed_at_least"]
    return {**claim, "measured": measured, "holds": bool(holds)}


def _tome(summary: dict) -> dict:
    measured, *holds = _comparisons(summary, ("ats", "tome", "ATS (paper form)", "ToMe"),
                                    ("ats_fused_linear", "tome", "ATS Top-K fused + linear", "ToMe"),
                                    ("ats_flat_fused", "tome", "ATS on score^0.5 fused + linear", "ToMe"),
                                    ("ats_redundant_fused", "tome", "ATS Top-K redundancy 6 fused + linear", "ToMe"))
    return {
        "id": "ats-vs-tome",
        "claim": "ATS, in the paper's form or with ravit's options (Top-K, Top-K with redundancy discount or inverse "
                 "transform on score^0.5, fused, linear schedule), is at least as accurate as ToMe (token merging, "
                 "the method practitioners pick) at equal GMACs, both without fine-tuning",
        "paper": "neither paper: ToMe (Bolya et al., ICLR 2023) came after ATS; the comparison is ravit's",
        "measured": measured,
        "holds": any(holds),
    }


def _on_fan(summary: dict) -> dict:
    red = summary["token_reduction_fan"]
    claim = {
        "id": "ats-on-fan",
        "claim": f"ATS also runs on the FAN (ravit's extension: FAN blocks have no class token, so tokens are scored "
                 f"by the attention they receive x ‖V‖; blocks {red['first_ats_block']}–{red['depth'] - 1}), and at "
                 f"equal GMACs it is at least as accurate as ToMe on the same FAN, both without fine-tuning",
        "paper": "neither paper: FAN has no token reduction and ATS no FAN host; the comparison is ravit's",
    }
    if "ats" not in {r["method"] for r in red["rows"]}:
        return {**claim, "measured": "no ATS setting was run on the FAN", "holds": False}
    dense, ats = _row(red["rows"], "dense", "all"), _row(red["rows"], "ats", "all")
    default = "" if ats is None else (f"default budget: {_pt(ats['accuracy'])}% at {ats['gmacs_ratio']:.2f}x "
                                      f"GMACs (dense {_pt(dense['accuracy'])}%); ")
    measured, *holds = _comparisons(summary, ("ats", "tome", "ATS on FAN (paper form)", "ToMe on FAN"),
                                    ("ats_fused_linear", "tome", "ATS on FAN Top-K fused + linear", "ToMe on FAN"),
                                    ("ats_flat_fused", "tome", "ATS on FAN score^0.5 fused + linear", "ToMe on FAN"),
                                    ("ats_redundant_fused", "tome", "ATS on FAN Top-K redundancy 6 fused + linear",
                                     "ToMe on FAN"),
                                    key="token_reduction_fan")
    return {**claim, "measured": default + measured, "holds": any(holds)}


def claims(summary: dict) -> list[dict]:
    """The ten claims (the issue's nine, the ninth in two rows: ATS vs ToMe on the ViT, ATS on FAN), each
    ``{"id", "claim", "paper", "measured", "holds"}``, from a study's summary."""
    return [
        _robust(summary),
        _grouping(summary),
        _perturbation(summary),
        _off_the_shelf(summary),
        _pairwise(summary, "ats-vs-topk",
                  "Inverse-transform sampling beats Top-K at equal GMACs (single-stage, no fine-tuning)",
                  "ATS §4.2 a: single stage at block 3, 72.7 / 76.9 / 78.5% vs Top-K 69.6 / 75.6 / 77.9% at "
                  "2.0 / 2.5 / 3.0 GMACs", "ats_single", "topk_single", "inverse transform", "Top-K"),
        _pairwise(summary, "ats-multi-stage",
                  "Multi-stage ATS (every block from the first ATS block on) beats single-stage ATS (the first ATS "
                  "block only) at equal GMACs (no fine-tuning)",
                  "ATS §4.2 c: multi-stage 72.7 / 77.6 / 79.2% vs single-stage 72.7 / 76.9 / 78.5% at "
                  "2.0 / 2.5 / 3.0 GMACs", "ats", "ats_single", "multi-stage", "single-stage"),
        _scoring(summary),
        _finetune(summary),
        _tome(summary),
        _on_fan(summary),
    ]
