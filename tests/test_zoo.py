"""The shipped zoo: every manifest entry loads offline through timm / ravit and reaches its recorded accuracy."""

from __future__ import annotations

import hashlib

import pytest
import timm
import torch
from safetensors.torch import load_file

import ravit
from ravit.data import find_fashion_mnist
from ravit.models.zoo import ZOO_DIR, load_manifest
from ravit.train.export import ZOO_SLICE, eval_loader
from ravit.train.loop import evaluate

MODELS = load_manifest()["models"]
NAMES = sorted(MODELS)


def shipped(name: str) -> torch.nn.Module:
    """The zoo model as its manifest measured it: with the ATS it was fine-tuned with, if any."""
    model = ravit.create_model(name, pretrained=True)
    return ravit.apply_ats(model, **MODELS[name]["ats"]) if "ats" in MODELS[name] else model


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_manifest_has_a_deit_and_a_fan_within_10_mb():
    archs = {entry["architecture"].split("_")[0] for entry in MODELS.values()}
    assert {"deit", "fan"} <= archs, f"zoo architectures: {sorted(archs)}"
    total = sum((ZOO_DIR / entry["weights"]).stat().st_size for entry in MODELS.values())
    assert total <= 10 * 2**20, f"zoo weights take {total / 2**20:.1f} MiB"


@pytest.mark.parametrize("name", NAMES)
def test_weights_match_manifest(name):
    entry = MODELS[name]
    path = ZOO_DIR / entry["weights"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    model = ravit.create_model(name, pretrained=True)
    assert model.pretrained_cfg["architecture"] == name
    stored = load_file(path)
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == entry["params"]
    for key, value in stored.items():
        torch.testing.assert_close(state[key], value.to(state[key].dtype), rtol=0, atol=0)
    assert name in ravit.list_models("fmnist_*")


@pytest.mark.parametrize("name", NAMES)
def test_new_head_keeps_the_backbone(name):
    model = timm.create_model(name, pretrained=True, num_classes=5).eval()
    entry = MODELS[name]
    stored = load_file(ZOO_DIR / entry["weights"])
    state = model.state_dict()
    blocks = [k for k in stored if k.startswith("blocks.0.")]
    assert blocks and all(torch.equal(state[k], stored[k].to(state[k].dtype)) for k in blocks)
    assert model(torch.zeros(2, *entry["input_size"])).shape == (2, 5)


def shipped_top1(name: str, limit: int | None) -> dict:
    """``evaluate`` of the shipped model on the first ``limit`` test images (all with None); skips without data."""
    try:
        find_fashion_mnist()
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")
    entry = MODELS[name]
    loader = eval_loader(entry["dataset"], entry["input_size"][0], entry["input_size"][-1], limit=limit)
    return evaluate(shipped(name), loader, torch.device("cpu"))


@pytest.mark.parametrize("name", NAMES)
def test_reaches_manifest_accuracy_on_the_fixed_slice(name):
    entry = MODELS[name]
    assert entry["slice"]["first"] == ZOO_SLICE
    assert abs(shipped_top1(name, ZOO_SLICE)["top1"] - entry["slice"]["top1"]) <= 0.5


@pytest.mark.parametrize("name", NAMES)
def test_reaches_manifest_accuracy_on_the_full_test_split(name):
    """The whole test split (10,000 images) through the shipped weights gives the accuracy the manifest records."""
    result = shipped_top1(name, None)
    assert result["count"] == 10_000
    assert abs(result["top1"] - MODELS[name]["test_top1"]) <= 0.02
