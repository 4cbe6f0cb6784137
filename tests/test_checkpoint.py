"""ravit.checkpoint: file formats, wrappers, weights_only allowlist, head re-initialisation, clear mismatch errors."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import timm
import torch

import ravit
from ravit.checkpoint import CheckpointError, load_state_dict, save_checkpoint
from ravit.models.fan import checkpoint_filter_fn


def tiny(num_classes: int = 10, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_fan_vit", num_classes=num_classes, **kwargs).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


def test_safetensors_round_trip(tmp_path, x):
    src = tiny(seed=1)
    path = save_checkpoint(src, tmp_path / "m.safetensors")
    dst = ravit.load_checkpoint(tiny(seed=2), path)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    via_timm = timm.create_model("test_fan_vit", num_classes=10, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path))).eval()
    via_create = ravit.create_model("test_fan_vit", num_classes=10, checkpoint_path=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(via_timm(x), src(x), rtol=0, atol=0)
        torch.testing.assert_close(via_create(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".pth", ".pth.tar", ".bin"])
@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_torch_files_and_wrappers(tmp_path, suffix, wrapper):
    src = tiny(seed=1)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}  # DDP prefix, stripped on load
    path = tmp_path / f"m{suffix}"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 3}, path)
    assert _same_weights(ravit.load_checkpoint(tiny(seed=2), path), src)


def test_ema_and_timm_training_checkpoint(tmp_path):
    """A timm train.py checkpoint (argparse.Namespace args, numpy metric) loads with weights_only; use_ema picks EMA."""
    plain, ema = tiny(seed=1), tiny(seed=3)
    path = tmp_path / "last.pth.tar"
    torch.save({"epoch": 7, "arch": "test_fan_vit", "state_dict": plain.state_dict(),
                "state_dict_ema": ema.state_dict(), "args": argparse.Namespace(lr=1e-3, model="test_fan_vit"),
                "metric": np.float64(81.5), "version": 2}, path)
    assert _same_weights(ravit.load_checkpoint(tiny(seed=2), path), plain)
    assert _same_weights(ravit.load_checkpoint(tiny(seed=2), path, use_ema=True), ema)
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="EMA"):
        ravit.load_checkpoint(tiny(), tmp_path / "plain.pth", use_ema=True)


class _Untrusted:
    pass


def test_untrusted_pickle_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny().state_dict(), "extra": _Untrusted()}, path)
    with pytest.raises(CheckpointError, match="trust_checkpoint"):
        ravit.load_checkpoint(tiny(), path)


def test_head_reinitialised_when_num_classes_differs(tmp_path, x):
    src = tiny(num_classes=10, seed=1)
    path = save_checkpoint(src, tmp_path / "m.safetensors")
    for model in (ravit.load_checkpoint(tiny(num_classes=4, seed=2), path),
                  timm.create_model("test_fan_vit", num_classes=4, pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(path)))):
        assert model.head.weight.shape == (4, 32)
        assert _same_weights(model, src, skip=("head.",))
    headless = ravit.load_checkpoint(tiny(num_classes=0), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(headless(x), src.forward_head(src.forward_features(x), pre_logits=True))


def test_wrong_architecture_names_keys(tmp_path):
    path = save_checkpoint(tiny(), tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError) as err:
        ravit.load_checkpoint(timm.create_model("test_fan_vit", embed_dim=48, depth=3, num_heads=2), path)
    msg = str(err.value)
    assert "test_fan_vit" in msg
    assert "missing keys: blocks.2." in msg
    assert "mis-shaped keys" in msg and "cls_token: checkpoint (1, 1, 32) vs model (1, 1, 48)" in msg
    with pytest.raises(CheckpointError, match="unexpected keys: blocks.1."):
        ravit.load_checkpoint(timm.create_model("test_fan_vit", depth=1), path)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        timm.create_model("test_fan_vit", embed_dim=48, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_strict_false_loads_what_fits(tmp_path):
    src = tiny(seed=1)
    path = save_checkpoint(src, tmp_path / "m.safetensors")
    deeper = timm.create_model("test_fan_vit", num_classes=10, depth=3)
    ravit.load_checkpoint(deeper, path, strict=False)
    assert torch.equal(deeper.blocks[1].attn.q.weight, src.blocks[1].attn.q.weight)


def test_official_key_names_mapped(x):
    """Old official files: 'pos_embeder.*' and a fused class-attention qkv are mapped onto ravit's keys."""
    src = tiny(seed=1)
    state = dict(src.state_dict())
    for key in [k for k in state if k.startswith("pos_embed.")]:
        state[key.replace("pos_embed.", "pos_embeder.")] = state.pop(key)
    for i in range(len(src.cls_attn_blocks)):
        for kind in ("weight", "bias"):
            parts = [state.pop(f"cls_attn_blocks.{i}.attn.{n}.{kind}") for n in "qkv"]
            state[f"cls_attn_blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    dst = tiny(seed=2)
    dst.load_state_dict(checkpoint_filter_fn(state, dst))
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError):
        ravit.load_checkpoint(tiny(), tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="safetensors"):
        save_checkpoint(tiny(), tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="not a tensor"):
        torch.save({"weights": [1, 2]}, tmp_path / "list.pth")
        load_state_dict(tmp_path / "list.pth")


def test_saved_metadata_names_model(tmp_path):
    from safetensors import safe_open

    path = save_checkpoint(tiny(), tmp_path / "m.safetensors")
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["model"] == "test_fan_vit"
    assert not list(tmp_path.glob("*.tmp"))


def test_first_conv_adapted_for_other_in_chans(tmp_path, x):
    """A model built for another in_chans than its config gets the checkpoint's first convolution adapted as timm does
    (summed over the input channels for one), through ravit.load_checkpoint and the pretrained_cfg_overlay file path;
    the rest loads unchanged."""
    src = tiny(seed=1)
    path = save_checkpoint(src, tmp_path / "rgb.safetensors")
    conv = "patch_embed.proj.0.0.weight"
    for model in (ravit.load_checkpoint(tiny(seed=2, in_chans=1), path),
                  timm.create_model("test_fan_vit", num_classes=10, in_chans=1, pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(path)))):
        torch.testing.assert_close(model.state_dict()[conv], src.state_dict()[conv].sum(dim=1, keepdim=True))
        assert _same_weights(model, src, skip=("patch_embed.proj.0.0.",))
        with torch.no_grad():
            assert model.eval()(x.mean(dim=1, keepdim=True)).shape == (2, 10)


def test_first_conv_of_other_in_chans_refused_when_not_asked(tmp_path):
    """A model built with its config's in_chans does not adapt a checkpoint saved for another one."""
    path = save_checkpoint(tiny(seed=1, in_chans=1), tmp_path / "gray.safetensors")
    with pytest.raises(CheckpointError, match=r"patch_embed.proj.0.0.weight: checkpoint \(4, 1, 3, 3\)"):
        ravit.load_checkpoint(tiny(seed=2), path)
