"""The main job (``ravit study``) on a tiny slice: every output is written and the numbers hang together."""

from __future__ import annotations

import json

import pytest

from ravit.data import find_fashion_mnist

try:
    find_fashion_mnist()
except FileNotFoundError as err:  # pragma: no cover - depends on the machine
    pytest.skip(f"Fashion-MNIST is not installed: {err}", allow_module_level=True)

from ravit.cli import main  # noqa: E402


def test_study_writes_every_result(tmp_path):
    out = tmp_path / "study"
    code = main(["study", "--out", str(out), "--limit", "24", "--severities", "2", "--budgets", "all", "0.5",
                 "--gmacs-images", "8", "--analysis-images", "4", "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for name in ("fmnist_deit_p4", "fmnist_fan_p4"):
        rob = summary["robustness"][name]
        assert 0 <= rob["mean_corruption_accuracy_15"] <= 1 and 0 <= rob["mean_corruption_accuracy_19"] <= 1
        assert rob["retention_15"] == pytest.approx(rob["mean_corruption_accuracy_15"] / rob["clean_accuracy"])
        assert (out / "robustness" / name / "robustness.csv").stat().st_size > 0
    assert summary["robustness"]["fmnist_deit_p4"]["mce_vs_vit_15"] == pytest.approx(1.0)  # its own baseline
    rows = {(r["sampler"], r["budget"]): r for r in summary["ats"]["rows"]}
    assert set(rows) == {("dense", "all"), ("inverse_transform", "all"), ("inverse_transform", 0.5), ("topk", 0.5)}
    assert rows[("inverse_transform", 0.5)]["gmacs"] < rows[("dense", "all")]["gmacs"]
    assert rows[("topk", 0.5)]["kept_tokens_last_block"] < rows[("dense", "all")]["kept_tokens_last_block"]
    for fname in ("summary.md", "ats.csv", "ats_accuracy_vs_gmacs.png", "grouping_eigenvalues.png",
                  "grouping_perturbation.png"):
        assert (out / fname).stat().st_size > 0, fname
    assert len(summary["grouping"]["fmnist_fan_p4"]["significant_eigenvalues"]) >= 1


def test_study_rejects_bad_settings(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path), "--limit", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
