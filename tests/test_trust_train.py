"""Issue 12 for checkpoints, training, the zoo and eval: a clear error or the right result, never a silent wrong one."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import test_train
import timm
import torch
from PIL import Image
from timm.models import register_model
from torch import nn

import ravit
from ravit.checkpoint import CheckpointError, load_state_dict, save_checkpoint
from ravit.cli import main
from ravit.errors import DataError, InvalidArgumentError
from ravit.models import zoo
from ravit.train import load_config, load_training_checkpoint, train
from ravit.train import loop as loop_module
from ravit.train.config import TrainConfig

# test_train.py's tiny run, on half the images (these tests only need a run to exist, not to learn).
TINY = {**test_train.TINY, "train_subset": 128, "val_subset": 64, "eval_batch_size": 64}
TINY_FLAGS = [{"256": "128", "128": "64"}.get(flag, flag) for flag in test_train.TINY_FLAGS]


def _cfg(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    return load_config(None, {**TINY, "output": str(tmp_path / name), **overrides})


def tiny(num_classes: int = 10, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_fan_vit", num_classes=num_classes, **kwargs).eval()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One finished 1-epoch run without EMA (its last.pth is a ravit train checkpoint)."""
    out = tmp_path_factory.mktemp("trained")
    train(_cfg(out, epochs=1))
    return out / "run"


# --- 1. best.pth commits with its epoch -----------------------------------------------------------------------------
SCORES = {0: 50.0, 1: 60.0, 2: 55.0}  # epoch index -> validation top-1: epoch 2 is the best, epoch 3 is not


def _scripted_scores(monkeypatch) -> None:
    """Validation scores by epoch (so the best epoch is known), whatever the tiny model learns."""
    real_epoch, current = loop_module.train_one_epoch, []

    def remember_epoch(*args, **kwargs):
        current.append(args[-1])
        return real_epoch(*args, **kwargs)

    def scripted(model, loader, device, *args, **kwargs):
        return {"loss": 1.0, "top1": SCORES[current[-1]], "top5": 100.0, "count": 64}

    monkeypatch.setattr(loop_module, "train_one_epoch", remember_epoch)
    monkeypatch.setattr(loop_module, "evaluate", scripted)


@pytest.mark.parametrize("kill", ["instead_of_best", "instead_of_last", "best_never_written"])
def test_best_checkpoint_matches_summary_after_a_kill(tmp_path, monkeypatch, kill):
    """A kill between the epoch's last.pth and best.pth writes, or a stale best.pth on disk, is repaired on resume."""
    _scripted_scores(monkeypatch)
    straight = train(_cfg(tmp_path, "straight", epochs=3))
    assert straight["best"]["epoch"] == 2

    real_save = loop_module.atomic_save

    def dies_in_epoch_2(obj, path):
        if obj["epoch"] == 2 and Path(path).name == ("last.pth" if kill == "instead_of_last" else "best.pth"):
            if kill == "best_never_written":
                return  # what a kill right after last.pth left behind, whatever the write order
            raise KeyboardInterrupt
        if obj["epoch"] == 3 and kill == "best_never_written":
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(loop_module, "atomic_save", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, "killed", epochs=3))
    monkeypatch.setattr(loop_module, "atomic_save", real_save)
    summary = train(_cfg(tmp_path, "killed", epochs=3, resume=True))

    best = load_training_checkpoint(tmp_path / "killed" / "best.pth")
    assert summary["best"]["epoch"] == best["epoch"] == best["best"]["epoch"] == 2
    assert _same(best["state_dict"], load_training_checkpoint(tmp_path / "straight" / "best.pth")["state_dict"])
    assert json.loads((tmp_path / "killed" / "summary.json").read_text())["best"]["epoch"] == 2


# --- 2. a new classifier or resized weights must be asked for ------------------------------------------------------
def test_classifier_from_another_checkpoint_is_refused_unless_asked(tmp_path, caplog):
    path = save_checkpoint(tiny(num_classes=10, seed=1), tmp_path / "ten.safetensors")
    with pytest.raises(CheckpointError) as err:  # 1000 classes: the architecture's own, nothing asks for a new head
        ravit.load_checkpoint(tiny(num_classes=1000), path)
    msg = str(err.value)
    assert "head.weight: checkpoint (10, 32) vs model (1000, 32)" in msg and "new_head=True" in msg
    with caplog.at_level(logging.WARNING, logger="ravit.checkpoint"):
        ravit.load_checkpoint(tiny(num_classes=1000), path, new_head=True)
    assert "new classifier" in caplog.text and "(10, 32)" in caplog.text
    with pytest.raises(CheckpointError, match="classifier differs"):
        ravit.load_checkpoint(tiny(num_classes=4), path, new_head=False)


def test_headless_checkpoint_does_not_leave_a_random_head(tmp_path, caplog):
    path = save_checkpoint(tiny(num_classes=0, seed=1), tmp_path / "features.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: head.weight, head.bias[\s\S]*classifier differs"):
        ravit.load_checkpoint(tiny(num_classes=1000), path)
    with caplog.at_level(logging.WARNING, logger="ravit.checkpoint"):
        ravit.load_checkpoint(tiny(num_classes=1000), path, new_head=True)
        ravit.load_checkpoint(tiny(num_classes=1000), path, strict=False)
    assert "head.weight: checkpoint none vs model (1000, 32)" in caplog.text
    assert "strict=False" in caplog.text and "missing keys (head.weight, head.bias)" in caplog.text


def test_create_model_num_classes_asks_for_a_new_head(tmp_path, caplog):
    src = tiny(num_classes=10, seed=1)
    path = save_checkpoint(src, tmp_path / "ten.safetensors")
    with caplog.at_level(logging.WARNING, logger="ravit.checkpoint"):
        model = ravit.create_model("test_fan_vit", num_classes=1000, checkpoint_path=path)
    assert "new classifier" in caplog.text
    assert torch.equal(model.blocks[0].attn.q.weight, src.blocks[0].attn.q.weight)
    with pytest.raises(CheckpointError, match="classifier differs"):
        ravit.create_model("test_fan_vit", checkpoint_path=path)


def test_pos_embed_is_not_resized_silently(tmp_path, caplog):
    torch.manual_seed(0)
    path = save_checkpoint(timm.create_model("test_vit", img_size=64), tmp_path / "vit64.safetensors")
    with pytest.raises(CheckpointError) as err:
        ravit.load_checkpoint(timm.create_model("test_vit", img_size=32), path)
    assert "pos_embed: checkpoint (1, 17, 64) vs model (1, 5, 64)" in str(err.value)
    assert "resize=True" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="ravit.checkpoint"):
        model = ravit.load_checkpoint(timm.create_model("test_vit", img_size=32), path, resize=True)
    assert model.pos_embed.shape == (1, 5, 64)
    assert "resized" in caplog.text and "pos_embed (1, 17, 64) -> (1, 5, 64)" in caplog.text


def test_eval_refuses_a_checkpoint_with_another_head(tmp_path, capsys):
    five = ravit.create_model("fmnist_fan_p4", pretrained=True, num_classes=5)
    path = save_checkpoint(five, tmp_path / "five.safetensors")
    assert main(["eval", "fmnist_fan_p4", "--checkpoint", str(path), "--limit", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ravit eval: error:") and "head.weight: checkpoint (5, " in err
    assert main(["eval", "fmnist_fan_p4", "--pretrained", "--model-kwargs", "num_classes=5", "--limit", "8"]) == 2
    assert "new, untrained classifier" in capsys.readouterr().err


def test_eval_refuses_a_model_without_weights_or_with_other_classes(tmp_path, capsys):
    assert main(["eval", "fmnist_fan_p4", "--limit", "8"]) == 2
    assert "has no weights to evaluate" in capsys.readouterr().err
    path = save_checkpoint(tiny(num_classes=4), tmp_path / "four.safetensors")
    args = ["eval", "test_fan_vit", "--checkpoint", str(path), "--model-kwargs", "num_classes=4", "--limit", "8"]
    assert main(args) == 2
    assert "predicts 4 classes but 'fashion_mnist' 'test' has 10" in capsys.readouterr().err


# --- 3. --use-ema without EMA weights ------------------------------------------------------------------------------
def test_use_ema_without_ema_weights_is_an_error(tmp_path, run_dir, capsys):
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": tiny().state_dict(), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="has no EMA weights"):
        ravit.load_checkpoint(tiny(), path, use_ema=True)
    with pytest.raises(CheckpointError, match="has no EMA weights"):
        load_state_dict(save_checkpoint(tiny(), tmp_path / "m.safetensors"), use_ema=True)
    assert main(["eval", "--checkpoint", str(run_dir / "last.pth"), "--use-ema", "--limit", "8"]) == 2
    assert "has no EMA weights" in capsys.readouterr().err
    assert main(["eval", "fmnist_fan_p4", "--pretrained", "--use-ema", "--limit", "8"]) == 2
    assert "--use-ema picks the EMA weights of a --checkpoint" in capsys.readouterr().err


# --- 4. the zoo's sha256 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_zoo_weights_are_checked_against_the_manifest(tmp_path, damage):
    entry = zoo.load_manifest()["models"]["fmnist_fan_p4"]
    data = bytearray((zoo.ZOO_DIR / entry["weights"]).read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF  # a weight changes, the file still parses
    else:
        data = data[: len(data) // 2]
    (tmp_path / entry["weights"]).write_bytes(bytes(data))
    name = f"test_tampered_zoo_{damage}"
    zoo.register_zoo_model(name, entry, tmp_path)
    with pytest.raises(DataError, match="do not match the manifest"):
        ravit.create_model(name, pretrained=True)
    shutil.copy(zoo.ZOO_DIR / entry["weights"], tmp_path / entry["weights"])
    assert ravit.create_model(name, pretrained=True).num_classes == 10  # the pristine file loads


@pytest.mark.parametrize("name", ["fmnist_deit_p4", "fmnist_fan_p4"])
def test_zoo_new_head_is_logged(caplog, name):
    """timm's num_classes convention gives a zoo model a new head; through either loader, it is said."""
    with caplog.at_level(logging.WARNING):
        model = ravit.create_model(name, pretrained=True, num_classes=5)
    assert model.num_classes == 5
    assert "freshly initialised" in caplog.text and "10" in caplog.text


# --- 5. budgets and counts -----------------------------------------------------------------------------------------
def test_ats_budget_is_a_count_or_a_ratio(tmp_path, capsys):
    for bad in ("1.5", "0", "-2", "0.0", "4.0"):
        with pytest.raises(InvalidArgumentError, match="ats_budget"):
            load_config(None, {"ats_blocks": "[1]", "ats_budget": bad})
    assert load_config(None, {"ats_blocks": "[1]", "ats_budget": "2"}).ats_budget == 2
    assert isinstance(load_config(None, {"ats_blocks": "[1]", "ats_budget": "1"}).ats_budget, int)
    assert load_config(None, {"ats_blocks": "[1]", "ats_budget": "0.5"}).ats_budget == 0.5
    assert main(["train", *TINY_FLAGS, "--ats-blocks", "1", "--ats-budget", "1.5", "--output",
                 str(tmp_path / "run")]) == 2
    assert "ats_budget 1.5" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", [["--limit", "-5"], ["--limit", "0"], ["--batch-size", "0"], ["--img-size", "-1"]])
def test_eval_counts_must_be_positive(capsys, flag):
    assert main(["eval", "fmnist_fan_p4", "--pretrained", *flag]) == 2
    assert f"{flag[0]} must be >= 1" in capsys.readouterr().err


# --- 6. train and val classes --------------------------------------------------------------------------------------
def test_train_and_val_with_other_classes_is_an_error(tmp_path):
    for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "fox"))):
        for cls in classes:
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 200, 30)).save(tmp_path / "imgs" / split / cls / "a.png")
    cfg = _cfg(tmp_path, dataset="imagefolder", data_dir=str(tmp_path / "imgs"), val_split="val", img_size=28,
               train_subset=None, val_subset=None, batch_size=2)
    with pytest.raises(DataError, match=r"different classes.*'dog'.*'fox'"):
        train(cfg)
    assert not (tmp_path / "run" / "last.pth").exists()


# --- 7. no traceback for a user's mistake; malicious pickles still refused ------------------------------------------
@pytest.mark.parametrize("content", ["truncated", "empty", "random"])
def test_damaged_files_are_data_errors_that_do_not_advise_trust(tmp_path, content, capsys):
    good = save_checkpoint(tiny(), tmp_path / "good.safetensors").read_bytes()
    torch.save(tiny().state_dict(), tmp_path / "good.pth")
    pth = (tmp_path / "good.pth").read_bytes()
    damaged = {"truncated": (good[: len(good) // 2], pth[: len(pth) // 2]), "empty": (b"", b""),
               "random": (os.urandom(4096), os.urandom(4096))}[content]
    for suffix, data in zip((".safetensors", ".pth"), damaged, strict=True):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match="damaged or not a") as err:
            ravit.load_checkpoint(tiny(), path)
        assert "trust_checkpoint" not in str(err.value)
        assert main(["eval", "test_fan_vit", "--checkpoint", str(path), "--limit", "8"]) == 2
        assert "damaged or not a" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="damaged or not a PyTorch checkpoint"):
        load_training_checkpoint(tmp_path / "bad.pth")


class _Payload:
    """A pickle that creates a marker file when unpickled (what a malicious checkpoint would do instead)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickles_refused_on_every_load_path(tmp_path, run_dir, capsys):
    marker = tmp_path / "pwned"
    ckpt = load_training_checkpoint(run_dir / "last.pth")
    evil = tmp_path / "evil.pth"
    torch.save({**ckpt, "extra": _Payload(marker)}, evil)
    for load in (lambda: ravit.load_checkpoint(ravit.create_model("deit_tiny_patch16_224", **_kwargs(ckpt)), evil),
                 lambda: load_state_dict(evil),
                 lambda: load_training_checkpoint(evil),
                 lambda: ravit.create_model("deit_tiny_patch16_224", checkpoint_path=evil, **_kwargs(ckpt))):
        with pytest.raises(CheckpointError, match=r"refuses to build \(.+\).*trust_checkpoint=True"):
            load()
    assert main(["eval", "--checkpoint", str(evil), "--limit", "8"]) == 2
    assert "refuses to build" in capsys.readouterr().err
    resumed = tmp_path / "resume"
    resumed.mkdir()
    shutil.copy(evil, resumed / "last.pth")
    with pytest.raises(CheckpointError, match="refuses to build"):
        train(TrainConfig(**{**ckpt["config"], "output": str(resumed), "resume": True}))
    assert not marker.exists()


def _kwargs(ckpt: dict) -> dict:
    return {**ckpt["config"]["model_kwargs"], "img_size": 28, "in_chans": 1, "num_classes": 10}


def test_bad_yaml_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: [3\nlr: 0.1\n")
    assert main(["train", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ravit train: error:") and "is not valid YAML" in err and "line 1" in err
    assert main(["train", "--lr", "[0.1"]) == 2
    assert "config key 'lr' expects float" in capsys.readouterr().err


# A model registered by this test module whose entry point has a bug: for width=3 it passes _Buggy a kwarg it lacks.
class _Buggy(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(x)


@register_model
def buggy_trust_model(pretrained: bool = False, num_classes: int = 10, width: int = 4, **kwargs) -> nn.Module:
    if width == 3:
        return _Buggy(num_classes=num_classes, width=width, depth=1)
    return _Buggy(num_classes=num_classes, width=width)


def test_unknown_model_kwargs_named_but_bugs_keep_their_traceback(tmp_path, capsys):
    with pytest.raises(InvalidArgumentError, match=r"takes no argument 'embed_dimm' \(did you mean 'embed_dim'\?\)"):
        ravit.create_model("test_fan_vit", embed_dimm=8)
    with pytest.raises(InvalidArgumentError, match="takes no argument 'foo'"):
        ravit.create_model("fmnist_deit_p4", foo=1)
    assert ravit.create_model("buggy_trust_model", width=5).head.in_features == 5
    with pytest.raises(InvalidArgumentError, match="did you mean 'width'"):
        ravit.create_model("buggy_trust_model", widht=5)
    with pytest.raises(TypeError) as err:  # the model's own bug is not turned into a user error
        ravit.create_model("buggy_trust_model", width=3)
    assert not isinstance(err.value, InvalidArgumentError)
    flags = [*TINY_FLAGS, "--epochs", "1", "--output", str(tmp_path / "run")]
    assert main(["train", *flags[:7], "foo=1", *flags[7:]]) == 2
    assert "takes no argument 'foo'" in capsys.readouterr().err


def test_train_resnet_drops_the_dataset_size_it_does_not_take(tmp_path):
    model = loop_module.build_model(_cfg(tmp_path, model="resnet18", model_kwargs={}), 28, 1, 10)
    assert model.num_classes == 10 and model.conv1.in_channels == 1


@pytest.mark.parametrize("cmd", ["train", "eval"])
def test_bad_device_and_output_under_a_file(tmp_path, capsys, cmd):
    regular = tmp_path / "file"
    regular.write_text("not a folder")
    base = [*TINY_FLAGS, "--epochs", "1"] if cmd == "train" else ["fmnist_fan_p4", "--pretrained", "--limit", "8"]
    assert main([cmd, *base, "--device", "banana", "--output", str(tmp_path / "out")]) == 2
    assert "--device 'banana' is not a device" in capsys.readouterr().err
    assert main([cmd, *base, "--output", str(regular / "sub")]) == 2
    assert f"{regular} is a file" in capsys.readouterr().err
    assert main([cmd, *base, "--output", str(regular)]) == 2
    assert f"output folder {regular} is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --- 8. file modes -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = save_checkpoint(tiny(), tmp_path / "m.safetensors")
        torch.save({}, tmp_path / "plain.pth")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask == (tmp_path / "plain.pth").stat().st_mode & 0o777
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "plain.pth"]


# --- 9. the mismatch error stays informative -----------------------------------------------------------------------
def test_mismatch_error_names_missing_unexpected_and_misshaped(tmp_path):
    path = save_checkpoint(tiny(), tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError) as err:
        ravit.load_checkpoint(tiny(embed_dim=48, depth=3, num_heads=2), path)
    msg = str(err.value)
    assert "does not fit model 'test_fan_vit' (it was saved from 'test_fan_vit')" in msg
    assert "missing keys: blocks.2." in msg and "cls_token: checkpoint (1, 1, 32) vs model (1, 1, 48)" in msg
    with pytest.raises(CheckpointError, match="unexpected keys: blocks.1."):
        ravit.load_checkpoint(tiny(depth=1), path)


def test_pickle_helper_is_really_malicious(tmp_path):
    """The payload above does create its marker when unpickled unsafely: the refusal tests are not vacuous."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
