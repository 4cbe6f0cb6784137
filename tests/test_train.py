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

import ravit
from ravit.cli import main
from ravit.data import find_fashion_mnist
from ravit.errors import InvalidArgumentError, MissingFileError
from ravit.train import atomic_save, load_config, load_training_checkpoint, train
from ravit.train import checkpoint as ckpt_module
from ravit.train import loop as loop_module
from ravit.train.config import CONFIG_DIR, TrainConfig
from ravit.train.export import eval_loader
from ravit.train.loop import evaluate

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
TINY_MIN_LR = TrainConfig.min_lr
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
    try:  # the parser names the unknown flag
        code = main(["train", "--epocs", "3"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2 and "--epocs" in capsys.readouterr().err


def test_config_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ravit/configs/ below the working folder
    by_path = load_config(CONFIG_DIR / "fmnist_fan_p4.yaml")
    assert by_path.model == "fan_tiny_12_p16_224"
    for name in ("fmnist_fan_p4", "fmnist_fan_p4.yaml", "ravit/configs/fmnist_fan_p4.yaml"):
        assert load_config(name) == by_path, name
    with pytest.raises(MissingFileError, match=r"config 'fmnist_fan' not found.*fmnist_deit_p4, .*fmnist_fan_p4"):
        load_config("fmnist_fan")
    assert main(["train", "-c", "no_such_config"]) == 2
    err = capsys.readouterr().err
    assert "'no_such_config' not found" in err and "fmnist_fan_p4" in err


def test_cli_vocabulary(tmp_path, monkeypatch, capsys):
    """MODEL overrides the config's, --data takes either spelling, the output defaults to runs/train/<MODEL>."""
    monkeypatch.chdir(tmp_path)
    flags = ["--train-subset", "32", "--batch-size", "32", "--val-subset", "32", "--max-steps", "1", "--no-progress"]
    assert main(["train", "deit_tiny_patch16_224", "-c", "fmnist_fan_p4", "--data", "fashion-mnist", *flags]) == 0
    run = tmp_path / "runs" / "train" / "deit_tiny_patch16_224"
    saved = load_training_checkpoint(run / "last.pth")
    assert (saved["model"], saved["config"]["dataset"], saved["num_updates"]) == ("deit_tiny_patch16_224",
                                                                                  "fashion_mnist", 1)
    assert load_config(None, {"dataset": "fashion-mnist"}) == load_config(None, {"dataset": "fashion_mnist"})
    assert main(["train", "resnet18", "--model", "deit_tiny_patch16_224"]) == 2
    assert "disagree" in capsys.readouterr().err
    assert main(["train", "--data", "no_such_data", *flags]) == 2
    assert "unknown dataset 'no_such_data'" in capsys.readouterr().err


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


# 96 images in batches of 32: three updates per epoch.
STEPS = dict(train_subset=96, val_subset=64, eval_batch_size=64)


def _same_run(a: Path, b: Path) -> None:
    """Runs ``a`` and ``b`` logged the same epochs and ended with the same weights (also the EMA's when kept)."""
    drop = ("seconds",)
    assert [{k: v for k, v in h.items() if k not in drop} for h in _history(a)] == [
        {k: v for k, v in h.items() if k not in drop} for h in _history(b)
    ]
    ckpt_a, ckpt_b = load_training_checkpoint(a / "last.pth"), load_training_checkpoint(b / "last.pth")
    assert ckpt_a["num_updates"] == ckpt_b["num_updates"]
    for key in ("state_dict", "state_dict_ema"):
        for name, tensor in ckpt_a.get(key, {}).items():
            assert torch.equal(tensor, ckpt_b[key][name]), f"{key}.{name} differs"


@pytest.mark.parametrize("workers", [0, 2])
def test_max_steps_stops_and_resumes_exactly(tmp_path, workers):
    extras = dict(STEPS, epochs=2, workers=workers, ema=True, ema_decay=0.9, mixup=0.4, cutmix=1.0, drop_path_rate=0.1)
    train(_cfg(tmp_path, "straight", **extras))

    first = train(_cfg(tmp_path, "stopped", max_steps=2, **extras))  # two of epoch 1's three updates
    assert (first["final"], first["epochs_done"], first["num_updates"]) == (None, 0, 2)
    assert first["partial_epoch"]["batches"] == 2 and first["partial_epoch"]["samples"] == 64
    saved = load_training_checkpoint(tmp_path / "stopped" / "last.pth")
    assert (saved["epoch"], saved["num_updates"], saved["position"]["batches_done"]) == (0, 2, 2)
    assert _history(tmp_path / "stopped") == [] and not (tmp_path / "stopped" / "best.pth").exists()

    second = train(_cfg(tmp_path, "stopped", max_steps=4, resume=True, **extras))  # past the end of epoch 1
    assert (second["epochs_done"], second["num_updates"], second["partial_epoch"]["batches"]) == (1, 4, 1)
    assert load_training_checkpoint(tmp_path / "stopped" / "best.pth")["epoch"] == 1
    torch.manual_seed(1234)  # the restarted process starts from other RNG states
    last = train(_cfg(tmp_path, "stopped", resume=True, **extras))
    assert last["partial_epoch"] is None and last["epochs_done"] == 2
    _same_run(tmp_path / "straight", tmp_path / "stopped")


def test_resume_may_extend_epochs_but_not_drop_below_the_trained_ones(tmp_path):
    train(_cfg(tmp_path, "extended", epochs=1, **STEPS))
    summary = train(_cfg(tmp_path, "extended", epochs=3, resume=True, **STEPS))
    assert summary["epochs_done"] == 3 and summary["num_updates"] == 9
    lrs = [h["lr"] for h in _history(tmp_path / "extended")]
    # the 1-epoch cosine ended at min_lr; the 3-epoch one is above it after epoch 2 and ends at min_lr again
    assert lrs[0] == pytest.approx(TINY_MIN_LR) and lrs[1] > 10 * TINY_MIN_LR and lrs[2] == pytest.approx(TINY_MIN_LR)

    train(_cfg(tmp_path, "again", epochs=1, **STEPS))  # the same extension, stopped in epoch 3 and resumed
    train(_cfg(tmp_path, "again", epochs=3, max_steps=7, resume=True, **STEPS))
    train(_cfg(tmp_path, "again", epochs=3, resume=True, **STEPS))
    _same_run(tmp_path / "extended", tmp_path / "again")

    with pytest.raises(InvalidArgumentError, match=r"with epochs 2: it has trained 3 epochs; .* not drop below 3"):
        train(_cfg(tmp_path, "extended", epochs=2, resume=True, **STEPS))
    train(_cfg(tmp_path, "partial", epochs=2, max_steps=4, **STEPS))
    with pytest.raises(InvalidArgumentError, match=r"trained 1 epoch and part of the next; .* not drop below 2"):
        train(_cfg(tmp_path, "partial", epochs=1, resume=True, **STEPS))
    assert load_training_checkpoint(tmp_path / "extended" / "last.pth")["epoch"] == 3  # refusals change nothing


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
    flags = ["--data", str(tmp_path / "imgs"), "--img-size", "28"]
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


def test_export_of_a_two_stage_ats_fine_tuned_run(tmp_path):
    """A model trained in two runs (the second continues from the first's weights, with ATS in the loop) exports
    with both stages' epochs, configs and time, its ATS settings, and accuracies measured with ATS applied."""
    from ravit.train.export import export_zoo_model

    deeper = {**TINY["model_kwargs"], "depth": 3}  # ATS in block 1 of 3 changes what the class token reads
    train(_cfg(tmp_path, "stage1", epochs=5, model_kwargs=deeper))
    train(_cfg(tmp_path, "stage2", epochs=1, model_kwargs=deeper, init_checkpoint=str(tmp_path / "stage1" / "last.pth"),
               ats_blocks=[1], ats_budget=1))
    entry = export_zoo_model(tmp_path / "stage2", "test_export_two_stage_ats", "a test model", "cmd",
                             zoo_dir=tmp_path / "zoo", previous_runs=(tmp_path / "stage1",))
    assert entry["epochs"] == 6 and entry["previous_stages"][0]["output"] == str(tmp_path / "stage1")
    assert entry["ats"] == {"blocks": [1], "budget": 1, "sampler": "inverse_transform"}
    seconds = [r["seconds"] for run in ("stage1", "stage2") for r in _history(tmp_path / run)]
    assert entry["training_time"]["wall_seconds"] == pytest.approx(sum(seconds), abs=0.1)
    model = ravit.create_model("test_export_two_stage_ats", pretrained=True)
    loader = eval_loader("fashion_mnist", 1, 28)
    assert evaluate(model, loader, torch.device("cpu"))["top1"] == pytest.approx(entry["test_top1_dense"], abs=0.01)
    with_ats = ravit.apply_ats(model, **entry["ats"])
    assert evaluate(with_ats, loader, torch.device("cpu"))["top1"] == pytest.approx(entry["test_top1"], abs=0.01)
    assert entry["test_top1"] != entry["test_top1_dense"]
    manifest = json.loads((tmp_path / "zoo" / "manifest.json").read_text())
    assert manifest["models"]["test_export_two_stage_ats"]["ats"] == entry["ats"]
