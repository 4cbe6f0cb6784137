"""The main job (``ravit study``) on a tiny slice: every output is written and the numbers hang together."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ravit.data import find_fashion_mnist

try:
    find_fashion_mnist()
except FileNotFoundError as err:  # pragma: no cover - depends on the machine
    pytest.skip(f"Fashion-MNIST is not installed: {err}", allow_module_level=True)

from ravit.cli import main  # noqa: E402
from ravit.robustness.registry import BENCHMARK_CORRUPTIONS  # noqa: E402
from ravit.study import DEFAULT_FAN, DEFAULT_VIT, DEFAULT_VIT_ATS  # noqa: E402
from ravit.study.reduction import FAN_METHODS, METHODS  # noqa: E402

SMALL = ["--limit", "24", "--corruption-images", "48", "--severities", "2", "--gmacs-images", "4",
         "--analysis-images", "4", "--no-progress"]
VIT, FAN = DEFAULT_VIT, DEFAULT_FAN


def test_study_writes_every_result(tmp_path, capsys):
    out = tmp_path / "study"
    code = main(["study", "--output", str(out), "--quick", *SMALL])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for name in (VIT, FAN):
        rob = summary["robustness"][name]
        assert 0 <= rob["mean_corruption_accuracy_15"] <= 1
        assert rob["retention_15"] == pytest.approx(rob["mean_corruption_accuracy_15"] / rob["clean_accuracy"])
        assert set(rob["per_corruption"]) == set(BENCHMARK_CORRUPTIONS) and list(rob["per_severity"]) == ["2"]
        assert (out / "robustness" / name / "robustness.csv").stat().st_size > 0
    assert summary["robustness"][VIT]["mce_vs_vit_15"] == pytest.approx(1.0)  # its own baseline
    rows = summary["token_reduction"]["rows"]
    assert {r["method"] for r in rows} == set(METHODS)  # the zoo's ATS-fine-tuned ViT-12 comes with the default ViT
    dense = next(r for r in rows if r["method"] == "dense")
    assert dense["gmacs_ratio"] == 1.0
    assert all(r["gmacs"] < dense["gmacs"] for r in rows if r["method"] != "dense")
    assert {(r["method"], r["setting"]) for r in rows if r["method"] == "ats"} == {("ats", "all"), ("ats", "0.7")}
    fan_rows = summary["token_reduction_fan"]["rows"]
    assert {r["method"] for r in fan_rows} == set(FAN_METHODS)
    assert fan_rows[0]["method"] == "dense" and all(r["gmacs"] < fan_rows[0]["gmacs"] for r in fan_rows[1:])
    assert summary["token_reduction_fan"]["depth"] == summary["models"][FAN]["depth"]
    claims = summary["claims"]
    assert [c["id"] for c in claims] == ["fan-robustness", "fan-grouping", "fan-perturbation", "ats-off-the-shelf",
                                         "ats-vs-topk", "ats-multi-stage", "ats-scoring", "ats-finetune",
                                         "ats-vs-tome", "ats-on-fan"]
    for c in claims:
        assert set(c) == {"id", "claim", "paper", "measured", "holds"} and isinstance(c["holds"], bool)
        assert all(isinstance(c[k], str) and c[k] for k in ("id", "claim", "paper", "measured"))
    md = (out / "summary.md").read_text()
    assert md.index("## Claims") < md.index("## Robustness") and md.count("| **yes** |") + md.count("| **no** |") == 10
    assert "## Claims" in capsys.readouterr().out
    for fname in ("summary.png", "robustness.png", "token_reduction.png", "grouping.png", "token_reduction.csv",
                  "token_reduction_fan.csv", "claims.csv"):
        assert (out / fname).stat().st_size > 0, fname
    assert len(summary["grouping"][VIT]["significant_eigenvalues"]) == summary["models"][VIT]["depth"]
    assert summary["settings"]["quick"] and summary["settings"]["limit"] == 24
    assert summary["settings"]["corruption_images"] == 48 and summary["token_reduction"]["images"] == 24


def test_study_rejects_bad_settings(tmp_path, capsys):
    assert main(["study", "--output", str(tmp_path), "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err


def test_small_run_has_no_division_by_zero_and_replaces_an_old_run(tmp_path, capsys):
    """The issue's command (10 images < the batch, one severity; budget 0.7, as 0.5 halves the 49 tokens to none
    over 9 ATS blocks, refused with that reason below): the ViT makes no error on some corruption, so the
    mCE against it is undefined: reported as n/a, not a ZeroDivisionError. A previous study's folder is replaced
    whole: a file it left (another model's robustness folder) does not survive the rerun."""
    out = tmp_path / "study"
    stale = out / "robustness" / "old_model" / "robustness.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("stale")
    (out / "summary.json").write_text("{}")
    code = main(["study", "--output", str(out), "--limit", "10", "--corruption-images", "10", "--severities", "1",
                 "--budgets", "0.7",
                 "--gmacs-images", "4", "--analysis-images", "4", "--no-progress", "--quick"])
    assert code == 0
    assert not stale.parent.exists()
    assert sorted(p.name for p in (out / "robustness").iterdir()) == sorted([VIT, FAN])
    assert [p.name for p in tmp_path.iterdir()] == ["study"]  # no temporary sibling left
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["limit"] == 10 and summary["settings"]["corruption_images"] == 10
    assert summary["settings"]["severities"] == [1]
    vit = summary["robustness"][VIT]
    vit_perfect = [c for c in BENCHMARK_CORRUPTIONS if vit["per_corruption"][c] == 1.0]
    assert vit_perfect, "the regression needs a corruption on which the ViT makes no error"
    assert all(r["mce_vs_vit_15"] is None for r in summary["robustness"].values())
    assert "n/a" in (out / "summary.md").read_text() and "n/a" in capsys.readouterr().out
    assert {r["setting"] for r in summary["token_reduction"]["rows"] if r["method"] == "ats"} == {"0.7"}
    assert len(summary["claims"]) == 10


def test_crash_leaves_the_previous_results_and_no_partial_folder(tmp_path, monkeypatch):
    """A study that fails half-way (here in its ATS part, after the robustness files were written) changes nothing
    in the output folder and leaves no temporary folder behind; the one a killed study left is removed."""
    import ravit.study

    out = tmp_path / "study"
    out.mkdir()
    (out / "summary.json").write_text('{"previous": true}')
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f".study.partial-{dead.pid}-abc123"  # what a SIGKILLed study leaves
    killed.mkdir()
    (killed / "summary.md").write_text("half")
    alive = tmp_path / f".study.partial-{os.getpid()}-def456"  # a study still running: not touched
    alive.mkdir()

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(ravit.study, "measure_reduction", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ravit.study.run_study(out, limit=2, corruption_images=2, severities=[1], budgets=[0.7], gmacs_images=1,
                              analysis_images=1, progress=False, quick=True)
    assert [p.name for p in out.iterdir()] == ["summary.json"]
    assert json.loads((out / "summary.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "study"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--budgets", "2.5"], "never rounded"),
        (["--budgets", "1.5"], "never rounded"),
        (["--budgets", "0"], "out of range"),
        (["--budgets", "-0.5"], "out of range"),
        (["--budgets", "0.001"], "leaves no patch token"),
        (["--budgets", "0.5"], "at ATS block 9 leaves no patch token"),  # 9 blocks halving 49 tokens
        (["--budgets", "lots"], "--budgets: a budget is"),
        (["--gmacs-images", "0"], "--gmacs-images must be >= 1"),
        (["--analysis-images", "-1"], "--analysis-images must be >= 1"),
        (["--noise-std", "nan"], "--noise-std: must be finite"),
        (["--device", "banana"], "--device 'banana' is not a device"),
        (["fmnist_deit_p4", "fmnist_deit_p4"], "must be different models"),
        (["--finetuned", DEFAULT_FAN], "must be different models"),
        (["--corruptions", "fog,smoke"], "--corruptions"),
        (["--severities", "6"], "--severities"),
        (["--budgets", "1.0001"], "never rounded"),
        (["--limit", "2.5"], "--limit"),
        (["--corruption-images", "0"], "--corruption-images must be >= 1"),
        (["fmnist_fan_p4", "fmnist_deit_p4"], "the ViT must be a timm VisionTransformer"),
        (["fmnist_deit_p4", "fmnist_deit12_p4"], "the FAN must be a FAN-ViT or FAN-Hybrid"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, capsys, monkeypatch, extra, message):
    """One line, exit code 2, no image read and no folder made."""
    import ravit.study

    monkeypatch.setattr(ravit.study, "measure_robustness", lambda *a, **k: pytest.fail("the study started"))
    out = tmp_path / "study"
    assert main(["study", "--output", str(out), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ravit study: error:") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_output_folder_that_cannot_be_replaced(tmp_path, capsys, monkeypatch):
    """A file, a path under a file, or a folder holding files a study does not write: refused, nothing touched."""
    import ravit.study

    monkeypatch.setattr(ravit.study, "measure_robustness", lambda *a, **k: pytest.fail("the study started"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for out, message in ((blocker, "is a file"), (blocker / "sub", "which is a file"), (mine, "notes.txt")):
        assert main(["study", "--output", str(out), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me" and blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]


@pytest.mark.parametrize("vit,expected", [(DEFAULT_VIT, DEFAULT_VIT_ATS), ("fmnist_deit_p4", None)])
def test_auto_finetuned_vit_is_the_study_vits_own(tmp_path, monkeypatch, vit, expected):
    """--finetuned auto takes the zoo's ATS-fine-tuned version of the study's ViT, and none for a ViT without one."""
    import ravit.study

    created, original = [], ravit.study.create_model

    def create(name, pretrained):
        created.append(name)
        return original(name, pretrained=pretrained)

    class Stop(Exception):
        pass

    monkeypatch.setattr(ravit.study, "create_model", create)
    monkeypatch.setattr(ravit.study, "measure_robustness", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        ravit.study.run_study(tmp_path / "s", vit=vit, progress=False)
    assert created == [vit, DEFAULT_FAN] + ([expected] if expected else [])
