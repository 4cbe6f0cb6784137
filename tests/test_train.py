"""ravit.train and ``ravit train`` / ``ravit eval``: config, learning, exact resume, DDP, bad input."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ravit.cli import main
from ravit.data import find_fashion_mnist
from ravit.train import atomic_save, load_config, load_training_checkpoint, train
from ravit.train import checkpoint as ckpt_module
from ravit.train import loop as loop_module

TINY = dict(
    model="deit_tiny_patch16_224",
    model_kwargs={"patch_size": 7, "embed_dim": 32, "depth": 2, "num_heads": 2},
    train_subset=256,
    val_subset=128,
    batch_size=32,
    eval_batch_size=128,
    warmup_epochs=0.0,
    lr=2e-3,
    progress=False,
    threads=1,
)
TINY_FLAGS = ["--model", "deit_tiny_patch16_224", "--model-kwargs", "patch_size=7", "embed_dim=32", "depth=2",
              "num_heads=2", "--train-subset", "256", "--val-subset", "128", "--batch-size", "32",
              "--warmup-epochs", "0", "--no-progress", "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def fmnist():
    try:
        return find_fashion_mnist()
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")


def _cfg(tmp_path: Path, name: str = "run", **overrides):
    return load_config(None, {**TINY, "output": str(tmp_path / name), **overrides})


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# --- config --------------------------------------------------------------------------------------------------------
def test_config_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet18\nlr: 1.0e-2\nscale: [0.5, 1]\nmodel_kwargs: {drop_rate: 0.1}\n")
    cfg = load_config(path, {"lr": "3e-4", "ema": True})
    assert (cfg.model, cfg.lr, cfg.scale, cfg.ema) == ("resnet18", 3e-4, [0.5, 1.0], True)
    assert cfg.model_kwargs == {"drop_rate": 0.1}


def test_config_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: resnet18\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        load_config(path)
    with pytest.raises(ValueError, match=r"'epoch'.*did you mean 'epochs'"):
        load_config(None, {"epoch": 3})
    with pytest.raises(ValueError, match="'epochs' expects int"):
        load_config(None, {"epochs": "three"})


def test_cli_config_typo_exits_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("epocs: 3\n")
    assert main(["train", "-c", str(path)]) == 2
    assert "unknown config key 'epocs'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse names the unknown flag
        main(["train", "--epocs", "3"])


# --- learning, resume ----------------------------------------------------------------------------------------------
def test_a_few_epochs_lower_the_loss(tmp_path):
    summary = train(_cfg(tmp_path, epochs=3, lr=4e-3, smoothing=0.0, scale=[1.0, 1.0], hflip=0.0))
    history = _history(tmp_path / "run")
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.2
    assert all(h["samples"] == 256 and h["val_count"] == 128 for h in history)
    assert summary["final"] == history[-1]
    for name in ("last.pth", "best.pth", "config.yaml", "summary.json", "curves.png"):
        assert (tmp_path / "run" / name).is_file()
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    extras = dict(epochs=3, ema=True, ema_decay=0.9, mixup=0.4, cutmix=1.0, clip_grad=1.0, drop_path_rate=0.1)
    train(_cfg(tmp_path, "straight", **extras))

    real_epoch = loop_module.train_one_epoch
    calls = []

    def killed_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies mid-epoch: only epoch 1's checkpoint exists
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, "resumed", **extras))
    assert load_training_checkpoint(tmp_path / "resumed" / "last.pth")["epoch"] == 1
    monkeypatch.setattr(loop_module, "train_one_epoch", real_epoch)
    torch.manual_seed(1234)  # the restarted process starts from other RNG states
    train(_cfg(tmp_path, "resumed", resume=True, **extras))

    drop = ("seconds",)
    straight, resumed = _history(tmp_path / "straight"), _history(tmp_path / "resumed")
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed] == [
        {k: v for k, v in h.items() if k not in drop} for h in straight
    ]
    a = load_training_checkpoint(tmp_path / "straight" / "last.pth")
    b = load_training_checkpoint(tmp_path / "resumed" / "last.pth")
    for key in ("state_dict", "state_dict_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs"


def test_resume_refuses_another_config_or_model(tmp_path):
    train(_cfg(tmp_path, epochs=1))
    with pytest.raises(ValueError, match="already holds a run"):
        train(_cfg(tmp_path, epochs=1))
    with pytest.raises(ValueError, match=r"different config \(model: 'deit_tiny_patch16_224' -> 'resnet18'"):
        train(_cfg(tmp_path, epochs=1, resume=True, model="resnet18"))
    ckpt = load_training_checkpoint(tmp_path / "run" / "last.pth")  # same config, weights of another model
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("head")}
    torch.save(ckpt, tmp_path / "run" / "last.pth")
    with pytest.raises(ValueError, match="does not fit model 'deit_tiny_patch16_224'"):
        train(_cfg(tmp_path, epochs=1, resume=True))


# --- bad input ------------------------------------------------------------------------------------------------------
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.pth"
    atomic_save({"epoch": 1}, target)
    before = target.read_bytes()

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left on device; the previous file is intact"):
        atomic_save({"epoch": 2}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_cli_full_disk_is_a_clean_error(tmp_path, monkeypatch, capsys):
    def disk_full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module.torch, "save", disk_full)
    assert main(["train", *TINY_FLAGS, "--epochs", "1", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left" in err
    assert not (tmp_path / "run" / "last.pth").exists()


def test_cli_missing_or_empty_dataset(tmp_path, capsys):
    assert main(["train", *TINY_FLAGS, "--data-dir", str(tmp_path), "--output", str(tmp_path / "a")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    flags = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--img-size", "28"]
    assert main(["train", *TINY_FLAGS, *flags, "--output", str(tmp_path / "b")]) == 2
    assert "is empty" in capsys.readouterr().err


# --- eval, AMP, ATS -------------------------------------------------------------------------------------------------
def test_eval_cli_on_a_training_checkpoint(tmp_path, capsys):
    assert main(["train", *TINY_FLAGS, "--epochs", "1", "--amp", "--output", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    logged = _history(tmp_path / "run")[-1]
    args = ["eval", "--checkpoint", str(tmp_path / "run" / "last.pth"), "--limit", "128", "--output", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["count"] == 128 and len(result["per_class"]) == 10
    # ravit train validated on the same 128 images, in bf16 autocast: the float32 accuracy is close
    assert abs(result["top1"] - logged["top1"]) <= 3.0
    assert (tmp_path / "per_class.png").is_file() and (tmp_path / "per_class.csv").is_file()


def test_ats_in_the_loop(tmp_path, monkeypatch):
    real_apply, patched = loop_module.ravit.apply_ats, []

    def spy(model, **kwargs):
        patched.append(kwargs)
        return real_apply(model, **kwargs)

    monkeypatch.setattr(loop_module.ravit, "apply_ats", spy)
    summary = train(_cfg(tmp_path, epochs=1, ats_blocks=[1], ats_budget=0.5))
    assert patched == [{"blocks": [1], "budget": 0.5, "sampler": "inverse_transform"}]
    assert summary["final"]["samples"] == 256 and summary["final"]["train_loss"] > 0


# --- DDP ------------------------------------------------------------------------------------------------------------
def test_ddp_two_processes_gloo(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "ravit",
        "train",
        *TINY_FLAGS,
        "--train-subset",
        "192",
        "--val-subset",
        "100",
        "--epochs",
        "2",
        "--output",
        str(tmp_path / "ddp"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = _history(tmp_path / "ddp")
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["samples"] == 192 and h["val_count"] == 100 for h in history)  # each image once per epoch
    assert "module." not in "".join(load_training_checkpoint(tmp_path / "ddp" / "last.pth")["state_dict"])
