"""FAN-Hybrid specifics: parity with the official code, the timm ConvNeXt stem, multi-scale features, errors."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXtStage

import ravit
from ravit.checkpoint import CheckpointError
from ravit.models.fan_hybrid import FANHybrid, UnbiasedLayerNorm2d

NAMES = ["fan_tiny_8_p4_hybrid", "fan_small_12_p4_hybrid", "fan_base_16_p4_hybrid", "fan_large_16_p4_hybrid",
         "fan_xlarge_16_p4_hybrid"]


def _images(batch: int, h: int, w: int | None = None) -> torch.Tensor:
    return torch.randn(batch, 3, h, w or h, generator=torch.Generator().manual_seed(0))


def _tiny(**kwargs) -> FANHybrid:
    torch.manual_seed(0)
    return timm.create_model("test_fan_hybrid", **{"num_classes": 10, **kwargs}).eval()


@pytest.fixture(scope="module")
def case(parity_dir, parity_manifest, tmp_path_factory):
    """The fan_hybrid fixture: its spec, tensors, and its weights as a plain (official-key) checkpoint file."""
    spec = parity_manifest["fan_hybrid"]
    tensors = load_file(parity_dir / "fan_hybrid.safetensors")
    prefix = spec["weights_prefix"]
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    path = tmp_path_factory.mktemp("fan_hybrid") / "official.safetensors"
    save_file(weights, path)
    return spec, tensors, path, weights


def _from_spec(spec: dict) -> FANHybrid:
    return timm.create_model(
        "fan_tiny_8_p4_hybrid", img_size=spec["img_size"], convnext_depths=tuple(spec["convnext_depths"]),
        convnext_dims=tuple(spec["convnext_dims"]), hybrid_patch_size=spec["hybrid_patch_size"],
        embed_dim=spec["embed_dim"], depth=spec["depth"], num_heads=spec["num_heads"],
        cls_attn_layers=spec["cls_attn_layers"], tokens_norm=spec["tokens_norm"],
        num_classes=spec["num_classes"]).eval()


def test_parity_with_official(case):
    spec, tensors, path, weights = case
    model = _from_spec(spec)
    assert sum(p.numel() for p in model.parameters()) == spec["official_param_count"]
    assert set(model.state_dict()) == set(weights)  # the official keys, stem included, with nothing to rename
    ravit.load_checkpoint(model, path)
    with torch.no_grad():  # the fused CPU inference path
        logits = model(tensors[spec["input"]])
        explicit = model.forward_explicit(tensors[spec["input"]])
    reference = model(tensors[spec["input"]]).detach()  # autograd on: the reference modules
    torch.testing.assert_close(reference, tensors[spec["logits"]], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, tensors[spec["logits"]], rtol=0, atol=1e-5)
    torch.testing.assert_close(explicit, tensors[spec["logits"]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("custom_load", [False, True])
def test_pretrained_cfg_overlay_file(case, tmp_path, custom_load):
    """An official-layout training checkpoint loads through timm's ``pretrained=True`` path too."""
    spec, tensors, _, weights = case
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": weights, "epoch": 300}, path)
    model = timm.create_model(
        "fan_tiny_8_p4_hybrid", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=spec["num_classes"], custom_load=custom_load),
        img_size=spec["img_size"], convnext_depths=tuple(spec["convnext_depths"]),
        convnext_dims=tuple(spec["convnext_dims"]), embed_dim=spec["embed_dim"], depth=spec["depth"],
        num_heads=spec["num_heads"], num_classes=spec["num_classes"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tensors[spec["input"]]), tensors[spec["logits"]], rtol=0, atol=1e-5)


def test_checkpoint_of_other_variant_is_rejected(case):
    _, _, path, _ = case
    with pytest.raises(CheckpointError, match="(?s)does not fit model 'test_fan_hybrid'.*mis-shaped"):
        ravit.load_checkpoint(_tiny(), path)
    deeper = timm.create_model("fan_tiny_8_p4_hybrid", convnext_depths=(1, 2), convnext_dims=(32, 64), embed_dim=64,
                               depth=2, num_heads=4, num_classes=10)
    with pytest.raises(CheckpointError, match="missing keys: patch_embed.backbone.stages.1.blocks.1"):
        ravit.load_checkpoint(deeper, path)


def test_stem_is_timm_convnext():
    model = _tiny()
    stem = model.patch_embed.backbone
    assert all(isinstance(stage, ConvNeXtStage) for stage in stem.stages)
    assert type(stem.stem[1]) is LayerNorm2d  # the stem's own norm is a plain LayerNorm
    assert all(isinstance(m, UnbiasedLayerNorm2d) for stage in stem.stages for m in stage.modules()
               if isinstance(m, LayerNorm2d))
    keys = [k for k in model.state_dict() if k.startswith("patch_embed.backbone.")]
    assert not [k for k in keys if "head" in k or "norm_pre" in k]  # the official stem has neither
    assert stem.stages[0].blocks[0].mlp.fc1.weight.ndim == 4  # 1×1-conv MLP, as the official checkpoints store it


def test_unbiased_layer_norm_2d():
    torch.manual_seed(0)
    norm = UnbiasedLayerNorm2d(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 3, 5)
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).sum(1, keepdim=True) / (8 - 1)
    ref = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight[:, None, None] + norm.bias[:, None, None]
    torch.testing.assert_close(norm(x), ref, rtol=0, atol=1e-5)
    assert (norm(x) - LayerNorm2d.forward(norm, x)).abs().max() > 1e-3  # not the biased LayerNorm


@pytest.mark.parametrize("name", NAMES)
def test_registered_architectures(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    stem_depths = [len(stage.blocks) for stage in model.patch_embed.backbone.stages]
    expected = {"fan_tiny_8_p4_hybrid": ([3, 3], 8, 192), "fan_small_12_p4_hybrid": ([3, 3], 10, 384),
                "fan_base_16_p4_hybrid": ([3, 3], 16, 448), "fan_large_16_p4_hybrid": ([3, 5], 22, 480),
                "fan_xlarge_16_p4_hybrid": ([3, 7], 23, 768)}[name]
    assert (stem_depths, len(model.blocks), model.num_features) == expected
    assert model.patch_size == 16
    assert [i["reduction"] for i in model.feature_info[:3]] == [4, 8, 16]


def test_xlarge_alias():
    with pytest.warns(UserWarning, match="deprecated"):
        model = timm.create_model("fan_Xlarge_16_p4_hybrid", convnext_depths=(1, 1), convnext_dims=(16, 32),
                                  embed_dim=32, depth=3, channel_dims=[32, 32, 48], num_heads=[2, 2, 4])
    assert model.pretrained_cfg["architecture"] == "fan_xlarge_16_p4_hybrid"


def test_features_only_multiscale():
    """Stem stages (strides 4, 8) and FAN blocks (16, then 32 after the width change) as one NCHW pyramid."""
    model = timm.create_model("fan_xlarge_16_p4_hybrid", features_only=True, out_indices=(0, 1, 2, 4),
                              convnext_depths=(1, 1), convnext_dims=(16, 32), embed_dim=32, depth=3,
                              channel_dims=[32, 48, 48], num_heads=[2, 4, 4]).eval()
    assert model.feature_info.channels() == [16, 32, 48, 48]
    assert model.feature_info.reduction() == [4, 8, 32, 32]
    with torch.no_grad():
        feats = model(_images(1, 64, 96))
    for f, c, r in zip(feats, model.feature_info.channels(), model.feature_info.reduction(), strict=True):
        assert f.shape == (1, c, 64 // r, 96 // r)
    default = timm.create_model("test_fan_hybrid", features_only=True)
    assert default.feature_info.reduction() == [4, 8, 16]


def test_forward_intermediates_stem_and_formats():
    model = _tiny()
    x = _images(2, 64)
    with torch.no_grad():
        final, inters = model.forward_intermediates(x)
        stem_only = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        tokens = model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=1e-6)
    assert [tuple(t.shape[1:]) for t in inters] == [(16, 16, 16), (32, 8, 8), (32, 4, 4), (32, 4, 4)]
    for a, b in zip(stem_only, inters[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [tuple(t.shape[1:]) for t in tokens] == [(64, 32), (16, 32)]
    torch.testing.assert_close(tokens[1], inters[3].flatten(2).transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("size", [(32, 32), (48, 80), (96, 96)])
def test_any_size_divisible_by_stride(size):
    model = _tiny()
    x = _images(2, *size)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model(x[1:]), out[1:], rtol=0, atol=1e-5)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_constructor_errors():
    with pytest.raises(ValueError, match="sets patch_size from its ConvNeXt stem"):
        timm.create_model("test_fan_hybrid", patch_size=8)
    with pytest.raises(ValueError, match="one ConvNeXt width per stage"):
        timm.create_model("test_fan_hybrid", convnext_depths=(1, 1, 1))
    with pytest.raises(ValueError, match="divisible by the stride 16"):
        timm.create_model("test_fan_hybrid", img_size=40)
