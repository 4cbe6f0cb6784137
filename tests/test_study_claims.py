"""The study's verdicts (``ravit.study.claims``) on summaries built by hand, and the sweep's building blocks
(``ravit.study.reduction``): equal-GMACs comparison, block thirds, each claim's criterion both ways, the batched GMACs
count, the random baseline and the settings per depth."""

from __future__ import annotations

import copy

import pytest
import torch
from ats_helpers import peaky_vit

from ravit.ats import apply_ats, trace
from ravit.study.claims import CRITERIA, claims, compare_at_equal_gmacs, thirds
from ravit.study.reduction import METHODS, first_ats_block, mean_gmacs, random_sampler, settings

pytestmark = pytest.mark.usefixtures("one_thread")


def curve(method: str, points: list[tuple[float, float]]) -> list[dict]:
    return [{"method": method, "setting": f"{g:g}", "accuracy": a, "gmacs": g, "gmacs_ratio": g} for g, a in points]


def test_equal_gmacs_interpolates_over_the_common_range():
    rows = curve("a", [(0.4, 0.80), (0.6, 0.90)]) + curve("b", [(0.5, 0.80), (0.7, 0.82)])
    cmp = compare_at_equal_gmacs(rows, "a", "b")
    assert (cmp["lo"], cmp["hi"]) == (0.5, 0.6) and len(cmp["levels"]) == CRITERIA["levels"]
    # a rises 0.85 -> 0.90 over [0.5, 0.6], b 0.80 -> 0.81: a - b from 0.05 to 0.09, 0.07 on average
    assert cmp["mean"] == pytest.approx(0.07)
    assert compare_at_equal_gmacs(rows, "b", "a")["mean"] == pytest.approx(-0.07)


def test_equal_gmacs_without_overlap_or_points():
    rows = curve("a", [(0.2, 0.8), (0.3, 0.85)]) + curve("b", [(0.5, 0.8), (0.7, 0.82)])
    assert compare_at_equal_gmacs(rows, "a", "b") is None
    assert compare_at_equal_gmacs(rows, "a", "missing") is None
    touching = curve("a", [(0.2, 0.8), (0.5, 0.85)]) + curve("b", [(0.5, 0.8), (0.7, 0.82)])
    assert compare_at_equal_gmacs(touching, "a", "b")["levels"] == [0.5]


@pytest.mark.parametrize("values,expected", [
    (list(range(12)), (1.5, 5.5, 9.5)),
    ([4.0, 1.0, 2.0, 8.0], (4.0, 1.5, 8.0)),
    ([3.0], (3.0, 3.0, 3.0)),
    ([1.0, 2.0], (1.0, 2.0, 2.0)),
])
def test_thirds(values, expected):
    assert thirds(values) == pytest.approx(expected)


def summary(good: bool) -> dict:
    """A hand-made study summary where every claim holds (``good``) or none does."""
    up, down = (0.9, 0.7) if good else (0.7, 0.9)
    blocks = {f"blocks.{i}": v for i, v in enumerate([30, 29, 28, 20, 19, 18, 15, 14])}
    flat = {f"blocks.{i}": 40.0 for i in range(8)}
    rows = [{"method": "dense", "setting": "all", "accuracy": 0.90, "gmacs": 1.0, "gmacs_ratio": 1.0}]
    rows += curve("ats", [(0.4, 0.80), (0.65, 0.895 if good else 0.80)])
    rows += curve("ats_single", [(0.4, 0.78), (0.7, 0.85)])
    rows += curve("topk_single", [(0.4, 0.70 if good else 0.85), (0.7, 0.80 if good else 0.90)])
    rows += curve("ats_attention", [(0.4, 0.75), (0.65, 0.80 if good else 0.95)])
    rows += curve("random", [(0.4, 0.70), (0.65, 0.85 if good else 0.95)])
    rows += curve("tome", [(0.5, 0.80 if good else 0.95), (0.9, 0.89)])
    rows += curve("ats_fused_linear", [(0.5, 0.82 if good else 0.70), (0.8, 0.89 if good else 0.70)])
    rows += curve("ats_flat_fused", [(0.45, 0.79 if good else 0.70), (0.6, 0.86 if good else 0.72)])
    rows += curve("ats_redundant_fused", [(0.55, 0.83 if good else 0.71), (0.75, 0.88 if good else 0.73)])
    rows += curve("ats_finetuned", [(0.65, 0.899 if good else 0.81)])
    for r in rows:
        if r["method"] in ("ats", "ats_finetuned") and r["gmacs_ratio"] == 0.65:
            r["setting"] = "all"
    fan_rows = [{"method": "dense", "setting": "all", "accuracy": 0.91, "gmacs": 1.0, "gmacs_ratio": 1.0}]
    fan_rows += curve("ats", [(0.5, 0.80 if good else 0.60), (0.8, 0.90 if good else 0.70)])
    fan_rows += curve("ats_fused_linear", [(0.5, 0.70), (0.8, 0.80)])
    fan_rows += curve("ats_flat_fused", [(0.45, 0.65), (0.7, 0.78)])
    fan_rows += curve("ats_redundant_fused", [(0.55, 0.66), (0.75, 0.80)])
    fan_rows += curve("tome", [(0.5, 0.75), (0.8, 0.85)])
    return {
        "roles": {"vit": "v", "fan": "f", "vit_ats": "t"},
        "labels": {"v": "ViT-8", "f": "FAN-8", "t": "ViT+ATS-FT-8"},
        "robustness": {
            "v": {"clean_accuracy": 0.9, "mean_corruption_accuracy_15": down, "mce_vs_vit_15": 1.0},
            "f": {"clean_accuracy": 0.9, "mean_corruption_accuracy_15": up, "mce_vs_vit_15": 0.8 if good else 1.2},
        },
        "grouping": {
            "v": {"significant_eigenvalues": flat if not good else {k: v + 5 for k, v in blocks.items()},
                  "relative_perturbation": {k: v / 10 + 1 for k, v in blocks.items()}},
            "f": {"significant_eigenvalues": blocks if good else flat,
                  "relative_perturbation": {k: v / 10 for k, v in (blocks if good else flat).items()}},
        },
        "token_reduction": {"first_ats_block": 2, "depth": 8, "rows": rows},
        "token_reduction_fan": {"first_ats_block": 2, "depth": 8, "rows": fan_rows},
    }


def test_every_claim_holds_on_a_summary_built_to_hold():
    result = claims(summary(good=True))
    assert len(result) == 10
    assert {c["id"]: c["holds"] for c in result} == {c["id"]: True for c in result}
    off = next(c for c in result if c["id"] == "ats-off-the-shelf")
    assert "−35.0%" in off["measured"] and "(-0.5 pt)" in off["measured"]


def test_no_claim_holds_on_a_summary_built_to_fail():
    result = {c["id"]: c for c in claims(summary(good=False))}
    assert not any(c["holds"] for c in result.values()), {k: c["measured"] for k, c in result.items()}
    assert "10% of the gap closed" in result["ats-finetune"]["measured"]


def test_claims_say_why_when_nothing_can_be_compared():
    s = summary(good=True)
    s["token_reduction"]["rows"] = [r for r in s["token_reduction"]["rows"] if r["method"] != "ats_finetuned"]
    s["token_reduction"]["rows"] = [r for r in s["token_reduction"]["rows"]
                                    if not (r["method"] == "topk_single" and r["gmacs_ratio"] > 0.3)]
    s["token_reduction"]["rows"] += curve("topk_single", [(0.1, 0.5), (0.2, 0.6)])
    s["robustness"]["v"]["mce_vs_vit_15"] = s["robustness"]["f"]["mce_vs_vit_15"] = None
    result = {c["id"]: c for c in claims(s)}
    assert not result["ats-finetune"]["holds"] and "no fine-tuned ViT" in result["ats-finetune"]["measured"]
    assert not result["ats-vs-topk"]["holds"] and "share no GMACs range" in result["ats-vs-topk"]["measured"]
    assert not result["fan-robustness"]["holds"] and "n/a" in result["fan-robustness"]["measured"]
    s["token_reduction_fan"]["rows"] = s["token_reduction_fan"]["rows"][:1]
    result = {c["id"]: c for c in claims(s)}
    assert not result["ats-on-fan"]["holds"] and "no ATS setting" in result["ats-on-fan"]["measured"]


def test_ats_on_fan_holds_when_either_ats_mode_reaches_tome():
    s = summary(good=False)
    fan = s["token_reduction_fan"]
    fan["rows"] = [r for r in fan["rows"] if r["method"] != "ats_fused_linear"]
    fan["rows"] += curve("ats_fused_linear", [(0.5, 0.76), (0.8, 0.86)])
    result = {c["id"]: c for c in claims(s)}
    assert result["ats-on-fan"]["holds"] and "+1.0 pt vs ToMe on FAN" in result["ats-on-fan"]["measured"]
    assert "default budget" not in result["ats-on-fan"]["measured"]  # no 'all' point on this FAN curve


@pytest.mark.parametrize("method,vit_points,fan_points,winner,loser", [
    ("ats_flat_fused", [(0.5, 0.97), (0.6, 0.97)], [(0.5, 0.76), (0.7, 0.82)],
     ("ATS on score^0.5 fused + linear +", "ATS on FAN score^0.5 fused + linear +"), "ATS Top-K fused + linear −"),
    ("ats_redundant_fused", [(0.55, 0.97), (0.75, 0.97)], [(0.55, 0.80), (0.75, 0.84)],
     ("ATS Top-K redundancy 6 fused + linear +", "ATS on FAN Top-K redundancy 6 fused + linear +"),
     "ATS on score^0.5 fused + linear −"),
])
def test_ats_vs_tome_holds_when_only_one_of_ravits_modes_reaches_tome(method, vit_points, fan_points, winner, loser):
    s = summary(good=False)
    assert not {c["id"]: c for c in claims(s)}["ats-vs-tome"]["holds"]
    for key, points in (("token_reduction", vit_points), ("token_reduction_fan", fan_points)):
        s[key]["rows"] = [r for r in s[key]["rows"] if r["method"] != method]
        s[key]["rows"] += curve(method, points)
    result = {c["id"]: c for c in claims(s)}
    assert result["ats-vs-tome"]["holds"] and result["ats-on-fan"]["holds"]
    assert winner[0] in result["ats-vs-tome"]["measured"] and loser in result["ats-vs-tome"]["measured"]
    assert winner[1] in result["ats-on-fan"]["measured"]


@pytest.mark.parametrize("kwargs", [dict(budget=None), dict(budget=0.6, sampler="topk"), dict(budget=[20, 9, 4])])
def test_batched_gmacs_count_equals_the_mean_of_images_counted_alone(kwargs):
    """The ragged path computes each image on its own tokens, so one counted batch gives the per-image mean."""
    model = apply_ats(peaky_vit(), blocks=[1, 2, 3], **kwargs)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    alone = trace(model, images).gmacs
    assert len(set(alone.tolist())) > 1 or "sampler" in kwargs
    assert mean_gmacs(model, images) == pytest.approx(float(alone.mean()), rel=1e-12)


def test_padded_gmacs_are_counted_per_image():
    model = apply_ats(peaky_vit(), blocks=[1, 2, 3], budget=0.2, schedule="linear", fuse="nearest")
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert mean_gmacs(model, images) == pytest.approx(float(trace(model, images).gmacs.mean()), rel=1e-12)


def test_random_sampler_keeps_the_budget_and_is_reproducible():
    scores = torch.rand(4, 20)
    valid = torch.ones(4, 20, dtype=torch.bool)
    valid[1, 12:] = False
    n = torch.tensor([5, 15, 20, 1])
    keep = random_sampler()(scores, valid, n)
    assert keep.sum(1).tolist() == [5, 12, 20, 1] and not keep[1, 12:].any()
    assert torch.equal(keep, random_sampler()(scores.flip(1), valid, n))  # the scores play no part
    assert not torch.equal(keep, random_sampler(seed=1)(scores, valid, n))
    model = apply_ats(peaky_vit(), blocks=[1, 2], budget=0.5, sampler=random_sampler())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), copy.deepcopy(model)(images), atol=0, rtol=0)


@pytest.mark.parametrize("depth,first", [(12, 3), (4, 1), (6, 2), (2, 1)])
def test_settings_follow_the_depth(depth, first):
    assert first_ats_block(depth) == first
    plan = settings(depth, 49, [None, 0.7], finetuned=True, quick=False)
    assert {s.method for s in plan} == set(METHODS)
    multi = next(s for s in plan if s.method == "ats")
    assert multi.ats["blocks"] == list(range(first, depth))
    assert all(s.ats["blocks"] == [first] for s in plan if s.method.endswith("_single"))
    assert [s.label for s in plan if s.method == "ats_finetuned"] == ["all", "0.7"]
    assert all(s.model == ("vit_ats" if s.method == "ats_finetuned" else "vit") for s in plan)
    assert len(settings(depth, 49, [None], finetuned=False, quick=True)) < len(plan)
