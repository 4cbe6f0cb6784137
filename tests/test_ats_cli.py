"""``ravit ats``: end to end on Fashion-MNIST and on an image folder (its default output folder), and its clean
errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from ravit.cli import main
from ravit.data import find_fashion_mnist

TINY = ["vit_tiny_patch16_224", "--model-kwargs", "patch_size=7", "embed_dim=32", "num_heads=2", "depth=4",
        "num_classes=10"]


def _fashion_mnist_or_skip():
    try:
        find_fashion_mnist()
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")


def test_fashion_mnist_end_to_end(tmp_path, capsys):
    _fashion_mnist_or_skip()
    out = tmp_path / "out"
    argv = ["ats", TINY[0], "--data", "fashion-mnist", *TINY[1:], "img_size=28", "in_chans=1", "--blocks", "1-3",
            "--budget", "0.8", "--limit", "12", "--batch-size", "5", "--mask-images", "3", "--output", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "ats.json").read_text())
    assert record["num_images"] == 12 and record["ats"]["blocks"] == [1, 2, 3]
    assert 0 <= record["accuracy"]["dense"] <= 1 and 0 <= record["accuracy"]["ats"] <= 1
    assert 0 < record["gmacs"]["ats"]["mean"] < record["gmacs"]["dense"]
    assert record["gmacs"]["ats"]["p5"] <= record["gmacs"]["ats"]["p95"]
    for counts in record["kept_token_histogram"]["counts"].values():
        assert sum(counts) == 12
    with open(out / "ats_images.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(int(r["blocks.3"]) <= int(r["blocks.2"]) <= int(r["blocks.1"]) for r in rows)
    for name in ("ats_tokens.png", "ats_gmacs.png", "ats_masks.png", "ats_blocks.csv"):
        assert (out / name).stat().st_size > 0
    assert "accuracy: dense" in capsys.readouterr().out


def test_zoo_fan_end_to_end(tmp_path):
    """ATS on the zoo FAN (ravit.ats.fan) through the same command: kept tokens fall block after block, fewer GMACs."""
    _fashion_mnist_or_skip()
    out = tmp_path / "fan"
    argv = ["ats", "fmnist_fan_p4", "--pretrained", "--data", "fashion-mnist", "--blocks", "1-3", "--budget", "0.8",
            "--sampler", "topk", "--limit", "8", "--mask-images", "2", "--output", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "ats.json").read_text())
    assert 0 < record["gmacs"]["ats"]["mean"] < record["gmacs"]["dense"]
    with open(out / "ats_images.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["blocks.1"], r["blocks.2"], r["blocks.3"]) for r in rows] == [("39", "31", "25")] * 8  # 0.8 of 49, ...


def test_image_folder_into_the_default_output_folder(tmp_path, monkeypatch):
    root = tmp_path / "images"
    gen = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 256, (40, 40, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    argv = ["ats", TINY[0], "--data", str(root), *TINY[1:], "img_size=28", "--blocks", "2", "3", "--budget", "none,5",
            "--sampler", "topk", "--redundancy", "6"]
    assert main(argv) == 0
    out = tmp_path / "runs" / "ats" / TINY[0]  # runs/<command>/<MODEL>
    record = json.loads((out / "ats.json").read_text())
    assert record["num_images"] == 6 and record["ats"]["budgets"] == [None, 5] and record["ats"]["sampler"] == "topk"
    assert record["ats"]["redundancy"] == 6
    assert record["kept_tokens"][1]["max"] == 1 + 5


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--blocks", "9"], "out of range"),
        (["--budget", "0"], "out of range"),
        (["--budget", "lots"], "--budget: a budget is"),
        (["--blocks", "x-y"], "--blocks: expected block indices"),
        (["--score-power", "0"], "--score-power: must be finite and > 0"),
        (["--score-power", "0.5", "--sampler", "topk", "--blocks", "1-3"], "does nothing with sampler='topk'"),
        (["--redundancy", "-1"], "--redundancy: must be finite and >= 0"),
        (["--redundancy", "nan"], "--redundancy: must be finite and >= 0"),
        (["--model-kwargs", "class_token=False", "global_pool=avg"], "ATS supports timm VisionTransformer"),
    ],
)
def test_bad_input_is_one_clean_line(tmp_path, capsys, extra, message):
    argv = ["ats", TINY[0], "--data", str(tmp_path), *TINY[1:], "img_size=28", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ravit ats: error:") and message in err and "\n" not in err


def test_missing_data_folder(tmp_path, capsys):
    assert main(["ats", TINY[0], "--data", str(tmp_path / "nowhere"), *TINY[1:], "img_size=28"]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert main(["ats", TINY[0], "--data", "mnist", *TINY[1:], "img_size=28"]) == 2
    assert "unknown data 'mnist'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--mask-images", "0"], "--mask-images must be >= 1"),
        (["--limit", "-2"], "--limit must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--workers", "-1"], "--workers must be >= 0"),
        (["--device", "banana"], "--device 'banana' is not a device"),
        (["--budget", "nan"], "--budget: a budget is"),
        (["--budget", ","], "--budget: no value given"),
    ],
)
def test_bad_counts_and_device_fail_before_any_work(tmp_path, capsys, monkeypatch, extra, message):
    """Checked before a model is built or an image read (the model factory must not even be called)."""
    import ravit

    def no_work(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(ravit, "create_model", no_work)
    assert main(["ats", TINY[0], "--data", "fashion-mnist", *TINY[1:], "img_size=28", "in_chans=1", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ravit ats: error:") and message in err and "\n" not in err


def test_output_under_a_file_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import ravit

    monkeypatch.setattr(ravit, "create_model", lambda *a, **k: pytest.fail("the model was built"))
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    argv = ["ats", TINY[0], "--data", "fashion-mnist", *TINY[1:], "--output", str(blocker / "ats")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "is under" in err and "which is a file" in err and "\n" not in err
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("budget,message", [("2.5", "never rounded"), ("1.5", "never rounded"),
                                             ("0.001", "leaves no patch token")])
def test_budget_is_never_truncated(tmp_path, capsys, budget, message):
    """--budget 2.5 used to run as 2 tokens elsewhere; a fraction above 1 is an error, and so is a ratio that keeps
    nothing, before any image is read (the data folder here holds none)."""
    argv = ["ats", TINY[0], "--data", str(tmp_path), *TINY[1:], "img_size=28", "--blocks", "1-3",
            "--budget", budget]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_whole_float_budget_counts_tokens(tmp_path):
    """--budget 5.0 is 5 tokens, the same rule as ravit.apply_ats(budget=5.0)."""
    _fashion_mnist_or_skip()
    out = tmp_path / "out"
    argv = ["ats", TINY[0], "--data", "fashion_mnist", *TINY[1:], "img_size=28", "in_chans=1", "--blocks", "2",
            "--budget", "5.0", "--limit", "3", "--mask-images", "1", "--device", "cpu", "--output", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "ats.json").read_text())
    assert record["ats"]["budgets"] == [5] and record["kept_tokens"][0]["max"] <= 1 + 5
