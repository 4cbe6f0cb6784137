"""``ravit ats``: end to end on Fashion-MNIST and on an image folder, and its clean errors."""

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
    argv = ["ats", TINY[0], "fashion-mnist", *TINY[1:], "img_size=28", "in_chans=1", "--blocks", "1-3",
            "--budget", "0.8", "--limit", "12", "--batch-size", "5", "--num-images", "3", "--output", str(out)]
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


def test_image_folder(tmp_path):
    root = tmp_path / "images"
    gen = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            pixels = torch.randint(0, 256, (40, 40, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    out = tmp_path / "out"
    argv = ["ats", TINY[0], str(root), *TINY[1:], "img_size=28", "--blocks", "2", "3", "--budget", "none", "5",
            "--sampler", "topk", "--output", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "ats.json").read_text())
    assert record["num_images"] == 6 and record["ats"]["budgets"] == [None, 5] and record["ats"]["sampler"] == "topk"
    assert record["kept_tokens"][1]["max"] == 1 + 5


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--blocks", "9"], "out of range"),
        (["--budget", "0"], "out of range"),
        (["--budget", "lots"], "--budget expects"),
        (["--blocks", "x-y"], "--blocks expects"),
        (["--model-kwargs", "class_token=False", "global_pool=avg"], "ATS supports timm VisionTransformer"),
    ],
)
def test_bad_input_is_one_clean_line(tmp_path, capsys, extra, message):
    argv = ["ats", TINY[0], str(tmp_path), *TINY[1:], "img_size=28", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ravit ats: error:") and message in err and "\n" not in err


def test_missing_data_folder(tmp_path, capsys):
    assert main(["ats", TINY[0], str(tmp_path / "nowhere"), *TINY[1:], "img_size=28", "--blocks", "1-3"]) == 2
    assert "not a directory" in capsys.readouterr().err
