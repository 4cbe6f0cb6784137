"""FAN-Swin specifics: parity with the official code, windows/shifts/masks for any size, features, errors."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import Mlp
from timm.models.swin_transformer import get_relative_position_index

import ravit
from ravit.checkpoint import CheckpointError
from ravit.layers import ChannelProcessing
from ravit.models import fan_swin
from ravit.models.fan_swin import FANSwinBlock, relative_position_index, window_attention_mask, window_geometry

NAMES = [f"fan_swin_{size}_patch4_window7_224" for size in ("tiny", "small", "base", "large")]


def _images(batch: int, h: int, w: int | None = None) -> torch.Tensor:
    return torch.randn(batch, 3, h, w or h, generator=torch.Generator().manual_seed(0))


def _tiny(**kwargs) -> fan_swin.FANSwin:
    torch.manual_seed(0)
    return timm.create_model("test_fan_swin", num_classes=10, **kwargs).eval()


@pytest.fixture(scope="module")
def case(parity_dir, parity_manifest, tmp_path_factory):
    """The fan_swin fixture: its spec, tensors, and its weights as a plain (official-key) checkpoint file."""
    spec = parity_manifest["fan_swin"]
    tensors = load_file(parity_dir / "fan_swin.safetensors")
    prefix = spec["weights_prefix"]
    path = tmp_path_factory.mktemp("fan_swin") / "official.safetensors"
    save_file({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, path)
    return spec, tensors, path


def _from_spec(spec: dict) -> fan_swin.FANSwin:
    return timm.create_model(
        "fan_swin_tiny_patch4_window7_224", img_size=spec["img_size"], patch_size=spec["patch_size"],
        embed_dim=spec["embed_dim"], depths=tuple(spec["depths"]), num_heads=tuple(spec["num_heads"]),
        window_size=spec["window_size"], channel_processing=tuple(t == "FAN" for t in spec["mlp_type"]),
        num_classes=spec["num_classes"]).eval()


def test_parity_with_official(case):
    """Official logits within 1e-5 after loading the official state dict through ravit's loader.

    ravit derives the SW-MSA mask instead of loading it; the fixture holds the official code's ``attn_mask`` as that
    code builds it, which must equal ravit's derived mask exactly.
    """
    spec, tensors, path = case
    model = ravit.load_checkpoint(_from_spec(spec), path)
    assert sum(p.numel() for p in model.parameters()) == spec["official_param_count"]
    official_mask = tensors[spec["weights_prefix"] + "layers.0.blocks.1.attn_mask"]  # (nW, N, N)
    grid = spec["img_size"] // spec["patch_size"]
    window, shift, pad = window_geometry((grid, grid), (spec["window_size"],) * 2, shifted=True)
    derived = window_attention_mask((grid, grid), window, shift, pad)
    assert derived is not None
    torch.testing.assert_close(derived, official_mask, rtol=0, atol=0)
    with torch.no_grad():  # the fused CPU inference path
        logits = model(tensors[spec["input"]])
        explicit = model.forward_explicit(tensors[spec["input"]])
    reference = model(tensors[spec["input"]]).detach()  # autograd on: the reference modules
    torch.testing.assert_close(reference, tensors[spec["logits"]], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, tensors[spec["logits"]], rtol=0, atol=1e-5)
    torch.testing.assert_close(explicit, tensors[spec["logits"]], rtol=0, atol=1e-5)


def test_checkpoint_of_other_variant_is_rejected(case):
    spec, _, path = case
    model = timm.create_model("fan_swin_tiny_patch4_window7_224", embed_dim=32, depths=(2, 2), num_heads=(4, 4),
                              channel_processing=(True, False), num_classes=10)
    with pytest.raises(CheckpointError, match="relative_position_bias_table"):
        ravit.load_checkpoint(model, path)
    with pytest.raises(CheckpointError, match="does not fit model 'test_fan_swin'"):
        ravit.load_checkpoint(_tiny(), path)


def test_ravit_checkpoint_round_trip(tmp_path):
    model = _tiny()
    path = ravit.save_checkpoint(model, tmp_path / "m.safetensors")
    other = ravit.load_checkpoint(timm.create_model("test_fan_swin", num_classes=10).eval(), path)
    x = _images(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_channel_processing_in_stages_1_to_3(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert model.pretrained_cfg["architecture"] == name
    for i, stage in enumerate(model.layers):
        for block in stage.blocks:
            if i < 3:
                assert isinstance(block.mlp, ChannelProcessing)
                assert not block.mlp.mlp_v.dwconv_residual  # FAN-Swin's MLP: no residual around the DWConv
            else:
                assert isinstance(block.mlp, Mlp)
    assert [b.shifted for b in model.layers[2].blocks][:4] == [False, True, False, True]


def test_relative_position_index():
    torch.testing.assert_close(relative_position_index((7, 7), (7, 7)), get_relative_position_index(7, 7))
    sub = relative_position_index((3, 2), (7, 7))  # a 3×2 window reads the central offsets of a 7×7 table
    assert sub.shape == (6, 6)
    assert sub[0, 0] == get_relative_position_index(7, 7)[0, 0]  # offset (0, 0)
    assert sub[0, 5] == 6 * 13 + 6 - 2 * 13 - 1  # query (0, 0), key (2, 1): offset (-2, -1)


def test_window_geometry():
    assert window_geometry((56, 56), (7, 7), shifted=True) == ((7, 7), (3, 3), (0, 0))
    assert window_geometry((7, 7), (7, 7), shifted=True) == ((7, 7), (0, 0), (0, 0))  # one window: no shift
    assert window_geometry((4, 16), (7, 7), shifted=True) == ((4, 7), (0, 3), (0, 5))
    assert window_geometry((16, 16), (7, 7), shifted=False) == ((7, 7), (0, 0), (5, 5))


def test_small_map_equals_padded_masked_window():
    """A map smaller than the window (one clamped window, bias from the table's centre) gives the same block output
    as padding it to the full window and masking the padded keys."""
    torch.manual_seed(0)
    block = FANSwinBlock(16, num_heads=2, window_size=7, channel_processing=False).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, 5, 5, 16)  # (B, H, W, C)
    mask = window_attention_mask((5, 5), (7, 7), (0, 0), (2, 2))  # (1, 49, 49): padded keys masked
    padded = torch.nn.functional.pad(block.norm1(x), (0, 0, 0, 2, 0, 2)).reshape(2, 49, 16)
    with torch.no_grad():
        ref = block.attn(padded, (7, 7), mask).view(2, 7, 7, 16)[:, :5, :5]
        out, _ = block._window_attention(block.norm1(x), return_attention=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(64, 64), (96, 32), (32, 128)])
def test_any_size_divisible_by_stride(size):
    """Padded windows (stage sizes not multiples of the window) and clamped ones: SDPA and explicit paths agree, and
    an image's output does not depend on the rest of the batch."""
    model = timm.create_model("fan_swin_tiny_patch4_window7_224", num_classes=10, embed_dim=16, depths=(2, 2, 1, 1),
                              num_heads=(1, 1, 2, 2)).eval()
    x = _images(2, *size)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model.forward_explicit(x), out, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x[1:]), out[1:], rtol=0, atol=1e-5)
        maps = model.get_attention_maps(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    for attn in maps.values():
        torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)), rtol=0, atol=1e-5)


def test_features_only_multiscale():
    model = timm.create_model("fan_swin_tiny_patch4_window7_224", features_only=True, embed_dim=16,
                              depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)).eval()
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(_images(1, 96, 160))
    for f, c, r in zip(feats, model.feature_info.channels(), model.feature_info.reduction(), strict=True):
        assert f.shape == (1, c, 96 // r, 160 // r)  # NCHW, ready for a detection / segmentation neck


@pytest.mark.parametrize(("shape", "match"), [
    ((1, 1, 64, 64), "3 input channels, got 1"),
    ((1, 3, 64, 60), "divisible by its stride 8"),
    ((0, 3, 64, 64), "empty batch"),
    ((3, 64, 64), r"expects images \(B, 3, H, W\)"),
])
def test_bad_input(shape, match):
    model = _tiny()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(shape))
    with pytest.raises(ValueError, match=match):
        model.forward_intermediates(torch.randn(shape))


def test_constructor_rejects_mismatched_stages():
    with pytest.raises(ValueError, match="one entry per stage"):
        timm.create_model("test_fan_swin", num_heads=(1, 2, 4))
    with pytest.raises(NotImplementedError, match="any size"):
        _tiny().set_input_size((128, 128))
