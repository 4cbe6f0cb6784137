"""Generic timm-API tests for every registered FAN model (all families), on tiny CPU configurations.

Full-size models are only built on the meta device, to check parameter counts against the official code.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import timm
import torch
from conftest import PARITY_DIR, TINY_KWARGS, missing_parity_fixtures

import ravit  # noqa: F401  (registers the families)
from ravit.models.fan import FAN

MODELS = sorted(set(timm.list_models("fan*")) | set(timm.list_models("test_fan*")))
IMG = 64


def _module(name: str) -> str:
    return timm.models.model_entrypoint(name).__module__


def build(name: str, **kwargs) -> torch.nn.Module:
    """A small instance of ``name``: the family's tiny overrides (none for the ``test_*`` configs), 10 classes."""
    tiny = {} if name.startswith("test_") else TINY_KWARGS.get(_module(name), {})
    torch.manual_seed(0)
    return timm.create_model(name, **{"num_classes": 10, **tiny, **kwargs})


def images(batch: int = 2, size: int = IMG) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _official_counts() -> dict:
    path = PARITY_DIR / "official_param_counts.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@pytest.mark.parametrize("name", sorted(_official_counts()) or [None])
def test_param_count_equals_official(name):
    if name is None:
        missing_parity_fixtures()
    assert name in timm.list_models() or name.lower() in timm.list_models(), f"{name} is not registered"
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == _official_counts()[name]


def test_vit_names_registered():
    for name in ("fan_tiny_12_p16_224", "fan_small_12_p16_224", "fan_base_18_p16_224", "fan_large_24_p16_224",
                 "fan_small_12_p16_224_se_attn"):
        assert name in MODELS


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name):
    model = build(name).train()
    out = model(images())
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_same_output(name):
    model = build(name).eval()
    x = images()
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    if name.startswith("test_"):  # backward through the recomputation, once per family (the tiny test configs)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_and_features_only(name):
    model = build(name).eval()
    x = images()
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inters = model.forward_intermediates(x)
        only = model.forward_intermediates(x, indices=1, intermediates_only=True)
    torch.testing.assert_close(final, feats, rtol=0, atol=1e-6)
    assert len(inters) == len(model.feature_info)
    for y, info in zip(inters, model.feature_info, strict=True):
        assert y.shape[:2] == (2, info["num_chs"]), (y.shape, info)
        assert y.shape[-1] == -(-IMG // info["reduction"]), (y.shape, info)
    assert len(only) == 1
    torch.testing.assert_close(only[0], inters[-1], rtol=0, atol=1e-6)
    backbone = build(name, features_only=True, out_indices=(0, -1)).eval()
    with torch.no_grad():
        maps = backbone(images())
    assert [f.shape[1] for f in maps] == backbone.feature_info.channels()
    assert all(f.ndim == 4 and torch.isfinite(f).all() for f in maps)


@pytest.mark.parametrize("name", MODELS)
def test_head_and_metadata(name):
    model = build(name).eval()
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state
    assert cfg["classifier"] + ".weight" in state
    params = dict(model.named_parameters())
    assert all(n in params for n in model.no_weight_decay())
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(params)
    x = images()
    with torch.no_grad():
        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == (2, model.head_hidden_size)
        model.reset_classifier(0, "")
        assert model(x).ndim >= 3
        model.reset_classifier(7)
    assert model.get_classifier().out_features == 7


@pytest.mark.parametrize("name", MODELS)
def test_attention_maps(name):
    model = build(name).eval()
    with torch.no_grad():
        maps = model.get_attention_maps(images())
    assert maps
    for key, attn in maps.items():
        assert attn.ndim == 4 and attn.shape[0] == 2, key
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)), rtol=0, atol=1e-5)
    if isinstance(model, FAN):  # FAN-ViT, SE and Hybrid: the explicit path gives the fused path's logits
        with torch.no_grad():
            torch.testing.assert_close(model.forward_explicit(images()), model(images()), rtol=0, atol=1e-5)
        n = next(info["reduction"] for info in model.feature_info if info["module"] == "blocks.0")
        assert maps["blocks.0"].shape[-1] == (IMG // n) ** 2
        assert set(maps) == {f"blocks.{i}" for i in range(len(model.blocks))} | {
            f"cls_attn_blocks.{j}" for j in range(len(model.cls_attn_blocks))}


@pytest.mark.parametrize("name", MODELS)
def test_bad_input(name):
    model = build(name).eval()
    with pytest.raises(ValueError, match="(?i)channel"):
        model(torch.randn(1, 4, IMG, IMG))
    with pytest.raises(ValueError, match="(?i)divisib"):
        model(torch.randn(1, 3, IMG + 3, IMG))
    with pytest.raises(ValueError, match="(?i)empty|batch"):
        model(torch.randn(0, 3, IMG, IMG))


@pytest.mark.parametrize("name", MODELS)
def test_integer_images_are_refused(name):
    """uint8 pixels (0..255) must not run unnormalised nor fail deep in the stem: one clear error, every entry point."""
    from ravit.errors import InvalidArgumentError

    model = build(name).eval()
    pixels = torch.randint(0, 256, (1, 3, IMG, IMG), dtype=torch.uint8)
    for dtype in (torch.uint8, torch.int64, torch.bool):
        with pytest.raises(InvalidArgumentError, match="(?i)float images"):
            model(pixels.to(dtype))
    with pytest.raises(InvalidArgumentError, match="(?i)float images"):
        model.forward_intermediates(pixels)
    assert model(pixels.float() / 255).shape == (1, 10)


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_round_trip(name, tmp_path):
    """save -> load gives equal outputs, through ravit.load_checkpoint and timm's pretrained_cfg_overlay; a timm
    training checkpoint (argparse.Namespace, numpy metric) loads weights_only with the head re-initialised."""
    model = build(name).eval()
    x = images()
    path = ravit.save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = ravit.load_checkpoint(build(name, num_classes=10).eval(), path)
    overlay = build(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(overlay(x), ref, rtol=0, atol=0)
    train_ckpt = tmp_path / "last.pth.tar"
    torch.save({"epoch": 1, "state_dict": model.state_dict(), "args": argparse.Namespace(model=name),
                "metric": np.float64(0.5)}, train_ckpt)
    other_head = build(name, num_classes=3, pretrained=True, pretrained_cfg_overlay=dict(file=str(train_ckpt)))
    assert other_head.get_classifier().out_features == 3


# --- FAN-specific behaviour -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test_fan_vit", "test_fan_vit_downsample"])
@pytest.mark.parametrize("size", [32, 96, (48, 80)])
def test_any_size_divisible_by_stride(name, size):
    model = build(name).eval()
    h, w = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_eval_batch_independent():
    """Eval-mode outputs of one image do not depend on the rest of the batch (BN folding must use running stats)."""
    model = build("test_fan_vit_downsample").eval()
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:1], model(x[:1]), rtol=0, atol=1e-5)


def test_downsample_changes_width_and_grid():
    model = build("test_fan_vit_downsample").eval()
    with torch.no_grad():
        inters = model.forward_intermediates(images(), intermediates_only=True)
    assert [tuple(t.shape[1:]) for t in inters] == [(32, 4, 4), (48, 2, 2), (48, 2, 2)]
    assert model.num_features == 48


def test_se_variant_has_se_mlp():
    model = build("fan_small_12_p16_224_se_attn")
    assert any(k.endswith("mlp.se.conv_reduce.weight") for k in model.state_dict())
    assert not any(k.endswith("mlp.temperature") for k in model.state_dict())


def test_forward_intermediates_rejects_prefix_tokens():
    model = build("test_fan_vit")
    with pytest.raises(ValueError, match="prefix"):
        model.forward_intermediates(images(), return_prefix_tokens=True)


def test_create_model_and_list_models():
    assert "fan_tiny_12_p16_224" in ravit.list_models("fan_*")
    assert "resnet18" not in ravit.list_models()
    model = ravit.create_model("fan_tiny_12_p16_224", num_classes=3, embed_dim=32, depth=1, num_heads=2)
    assert model.num_classes == 3
    with pytest.raises(ValueError, match="unknown model"):
        ravit.create_model("fan_nonexistent")


def test_drop_path_branch_matches_fused_branch():
    """With stochastic depth the block takes its unfused branch; in eval both branches compute the same function."""
    plain = build("test_fan_vit_downsample").eval()
    with_dp = build("test_fan_vit_downsample", drop_path_rate=0.1).eval()
    with_dp.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(with_dp(images()), plain(images()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dwconv_residual", [True, False])
def test_channel_processing_matches_reference_math(dwconv_residual):
    """ChannelProcessing (eval, BatchNorm with moved statistics) against FAN Eq. 7 written out step by step."""
    from ravit.layers import ChannelProcessing

    torch.manual_seed(0)
    cp = ChannelProcessing(32, num_heads=4, qkv_bias=True, dwconv_residual=dwconv_residual).eval()
    bn = cp.mlp_v.dwconv.bn
    with torch.no_grad():
        for p in cp.parameters():
            p.add_(0.1 * torch.randn_like(p))
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    x, (H, W) = torch.randn(3, 20, 32), (4, 5)
    with torch.no_grad():
        out = cp(x, (H, W))
        B, N, C = x.shape
        q = cp.q(x).reshape(B, N, 4, 8).permute(0, 2, 1, 3).softmax(-2).transpose(-1, -2)  # (B, h, d, N)
        k = x.reshape(B, N, 4, 8).permute(0, 2, 1, 3).softmax(-2).mean(-1, keepdim=True)  # (B, h, N, 1)
        gate = (q @ k).sigmoid() * cp.temperature  # (B, h, d, 1)
        mlp = cp.mlp_v
        hid = mlp.fc1(x)
        m = hid.transpose(1, 2).reshape(B, -1, H, W)
        dw = mlp.dwconv
        m = dw.conv2(dw.bn(torch.nn.functional.gelu(dw.conv1(m)))).flatten(2).transpose(1, 2) * mlp.gamma
        v = cp.norm_v(mlp.fc2(m + hid if dwconv_residual else m))
        ref = (gate.transpose(-1, -2) * v.reshape(B, N, 4, 8).permute(0, 2, 1, 3)).permute(0, 2, 1, 3).reshape(B, N, C)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
