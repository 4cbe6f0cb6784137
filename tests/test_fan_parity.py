"""Parity with the official FAN code: fixture weights under the official key names, loaded through ravit's loader,
give the official logits within 1e-5 (fixtures from NVlabs/FAN ee1b7df; see ../shared/fixtures/parity/README.md)."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file

import ravit
from ravit.models.fan import FAN

VIT_CASES = ["fan_vit_p16", "fan_vit_p8", "fan_vit_p4", "fan_vit_downsample"]


def _case(parity_dir, manifest, case):
    spec = manifest[case]
    assert spec["kind"] == "fan" and spec["family"] == "fan_vit"
    tensors = load_file(parity_dir / f"{case}.safetensors")
    prefix = spec["weights_prefix"]
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return spec, weights, tensors[spec["input"]], tensors[spec["logits"]]


def _model_kwargs(spec):
    return dict(img_size=spec["img_size"], patch_size=spec["patch_size"], embed_dim=spec["embed_dim"],
                depth=spec["depth"], num_heads=spec["num_heads"], channel_dims=spec.get("channel_dims"),
                num_classes=spec["num_classes"], cls_attn_layers=spec["cls_attn_layers"],
                tokens_norm=spec["tokens_norm"])


@pytest.mark.parametrize("case", VIT_CASES)
def test_parity_load_checkpoint(parity_dir, parity_manifest, case, tmp_path):
    spec, weights, images, logits = _case(parity_dir, parity_manifest, case)
    path = tmp_path / "official.pth.tar"
    torch.save({"model": weights}, path)  # the official release format: a state dict under 'model'
    model = FAN(**_model_kwargs(spec))
    assert sum(p.numel() for p in model.parameters()) == spec["official_param_count"]
    ravit.load_checkpoint(model, path)
    model.eval()
    with torch.no_grad():  # the fused CPU inference path
        torch.testing.assert_close(model(images), logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.forward_explicit(images), logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(images).detach(), logits, rtol=0, atol=1e-5)  # autograd on: reference modules


@pytest.mark.parametrize("case", VIT_CASES)
def test_parity_timm_pretrained_overlay(parity_dir, parity_manifest, case, tmp_path):
    spec, weights, images, logits = _case(parity_dir, parity_manifest, case)
    path = tmp_path / "official.pth"
    torch.save(weights, path)  # a plain state dict
    kwargs = {k: v for k, v in _model_kwargs(spec).items() if v is not None}
    model = timm.create_model("fan_tiny_12_p16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), logits, rtol=0, atol=1e-5)
