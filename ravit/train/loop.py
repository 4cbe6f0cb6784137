"""The training and evaluation loops behind ``ravit train`` / ``ravit eval``.

Recipe (FAN, Zhou et al. 2022, Sec. 4; DeiT's, which FAN follows): AdamW, cosine schedule with linear warm-up,
label smoothing, optional mixup/cutmix, EMA of the weights, AMP, gradient clipping; all parts are timm's.

Exact resume: the data order and every random draw of an epoch are a pure function of (seed, epoch, rank): the
sampler is a ``DistributedSampler`` (seeded, ``set_epoch``) also for one process, and the global torch / numpy /
python RNGs are reseeded from (seed, epoch, rank) at the start of each epoch. With model, optimizer, scheduler, EMA
and scaler restored from the last checkpoint, a resumed run computes the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

import ravit
from ravit._factory import accepted_model_kwargs
from ravit.cli._args import resolve_device
from ravit.data import check_same_classes, create_dataset, create_transform, dataset_info
from ravit.errors import DataError, InvalidArgumentError
from ravit.outputs import check_output_dir
from ravit.train.checkpoint import (
    atomic_save,
    capture_rng,
    load_training_checkpoint,
    restore_rng,
)
from ravit.train.config import RESUME_SAFE_KEYS, TrainConfig
from ravit.train.distributed import DistInfo, all_reduce_sum, barrier, cleanup, init_distributed

__all__ = ["build_model", "evaluate", "seed_everything", "train", "train_one_epoch"]


def seed_everything(*keys: int) -> None:
    """Seed torch, numpy and python from a tuple of integers (e.g. seed, epoch, rank) via numpy's SeedSequence."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _autocast(device: torch.device, cfg_amp: bool, amp_dtype: str):
    if not cfg_amp:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, amp_dtype))


def build_model(cfg: TrainConfig, img_size: int, in_chans: int, num_classes: int) -> nn.Module:
    """The model named by ``cfg.model`` (ravit or timm) with its kwargs, optionally pretrained / from a checkpoint
    (``init_checkpoint``: a new classifier when ``num_classes`` differs from the checkpoint's, logged)."""
    kwargs = dict(cfg.model_kwargs)
    resolved = dict(img_size=img_size, in_chans=in_chans, num_classes=num_classes, drop_path_rate=cfg.drop_path_rate)
    for key, value in resolved.items():
        if value is not None:
            if key in kwargs and kwargs[key] != value:
                raise InvalidArgumentError(f"{key} is {value} but model_kwargs says {kwargs[key]}")
            kwargs[key] = value
    # img_size sizes the data pipeline; a model that takes any input size (CNNs) has no such argument.
    arch = cfg.model.split(".", 1)[0]
    accepted = accepted_model_kwargs(arch) if timm.is_model(arch) else None
    drop_size = "img_size" not in cfg.model_kwargs
    if drop_size and accepted is not None and "img_size" not in accepted:
        kwargs.pop("img_size")
    try:
        return ravit.create_model(cfg.model, pretrained=cfg.pretrained, checkpoint_path=cfg.init_checkpoint, **kwargs)
    except TypeError as err:
        # Only for a model whose arguments cannot be listed beforehand (accepted is None); other errors stay.
        if accepted is not None or not drop_size or "unexpected keyword argument 'img_size'" not in str(err):
            raise
        kwargs.pop("img_size")
        return ravit.create_model(cfg.model, pretrained=cfg.pretrained, checkpoint_path=cfg.init_checkpoint, **kwargs)


def _apply_ats(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Insert ATS: ``cfg.ats_budget`` is an int token count or a float ratio, as ``ravit.apply_ats`` reads them."""
    return ravit.apply_ats(model, blocks=cfg.ats_blocks, budget=cfg.ats_budget, sampler=cfg.ats_sampler)


def _data(cfg: TrainConfig, dist_info: DistInfo):
    """Datasets, loaders and the resolved (img_size, in_chans, num_classes)."""
    info = dataset_info(cfg.dataset)
    in_chans = cfg.in_chans or cfg.model_kwargs.get("in_chans") or info.in_chans
    img_size = cfg.img_size or cfg.model_kwargs.get("img_size") or info.img_size
    if img_size is None:
        raise InvalidArgumentError(f"dataset {cfg.dataset!r} has no native size: set img_size")
    crop_pct = cfg.crop_pct if cfg.crop_pct is not None else info.crop_pct
    common = dict(img_size=img_size, in_chans=in_chans, mean=info.mean, std=info.std)
    train_tf = create_transform(
        **common,
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        re_prob=cfg.reprob,
    )
    val_tf = create_transform(**common, is_training=False, crop_pct=crop_pct)
    train_set = create_dataset(cfg.dataset, cfg.train_split, cfg.data_dir, train_tf)
    val_set = create_dataset(cfg.dataset, cfg.val_split, cfg.data_dir, val_tf)
    classes = list(train_set.classes)  # a label is a class's position: both splits must list the same classes
    check_same_classes(classes, val_set.classes, f"the {cfg.train_split!r} and {cfg.val_split!r} splits")
    num_classes = cfg.num_classes or cfg.model_kwargs.get("num_classes") or len(classes)
    if num_classes < len(classes):
        raise InvalidArgumentError(f"num_classes is {num_classes} but the {cfg.train_split!r} split has {len(classes)} "
                                   "classes; drop num_classes to use the dataset's")
    if cfg.train_subset is not None and cfg.train_subset < len(train_set):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))
        train_set = Subset(train_set, order[: cfg.train_subset].sort().values.tolist())
    if cfg.val_subset is not None and cfg.val_subset < len(val_set):
        val_set = Subset(val_set, list(range(cfg.val_subset)))

    sampler = DistributedSampler(
        train_set, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=cfg.seed
    )
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    train_loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        drop_last=mixing,  # timm's Mixup needs even batches
        pin_memory=dist_info.device.type == "cuda",
    )
    if len(train_loader) == 0:
        raise InvalidArgumentError(
            f"no full batch: {len(sampler)} training images per process < batch_size {cfg.batch_size}")
    # Evaluation: rank r takes images r, r+W, ... so every image counts exactly once (no DistributedSampler padding).
    val_indices = list(range(dist_info.rank, len(val_set), dist_info.world_size))
    val_loader = DataLoader(
        val_set,
        batch_size=cfg.eval_batch_size,
        sampler=val_indices,
        num_workers=cfg.workers,
        pin_memory=dist_info.device.type == "cuda",
    )
    return train_loader, val_loader, (img_size, in_chans, num_classes)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    dist_info: DistInfo | None = None,
    amp: bool = False,
    amp_dtype: str = "bfloat16",
    progress: bool = False,
) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader, summed over processes."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 correct, top-5 correct, count
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with _autocast(device, amp, amp_dtype):
            logits = model(images)  # (B, num_classes)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, 5)
        hits = top.eq(targets[:, None])
        sums += torch.tensor(
            [
                F.cross_entropy(logits, targets, reduction="sum").item(),
                hits[:, 0].sum().item(),
                hits.any(dim=-1).sum().item(),
                len(targets),
            ],
            dtype=torch.float64,
        )
    if dist_info is not None:
        sums = all_reduce_sum(sums, dist_info)
    model.train(was_training)
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1)
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "count": int(count)}


def train_one_epoch(
    model,
    loader,
    optimizer,
    scheduler,
    loss_fn,
    cfg: TrainConfig,
    dist_info: DistInfo,
    num_updates: int,
    mixup=None,
    ema=None,
    scaler=None,
    epoch: int = 0,
) -> tuple[dict, int]:
    """One pass over ``loader``; returns (metrics, num_updates). Metrics are summed over processes."""
    model.train()
    device = dist_info.device
    sums = torch.zeros(2, dtype=torch.float64)  # loss sum, samples
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        disable=not (cfg.progress and dist_info.is_main),
        mininterval=2.0,
    )
    for images, targets in bar:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)  # targets become soft (B, num_classes)
        with _autocast(device, cfg.amp, cfg.amp_dtype):
            logits = model(images)  # (B, num_classes)
            loss = loss_fn(logits.float(), targets)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at update {num_updates}; lower the lr or disable amp")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        num_updates += 1
        scheduler.step_update(num_updates)
        if ema is not None:
            ema.update(model.module if isinstance(model, DistributedDataParallel) else model, step=num_updates)
        sums += torch.tensor([loss.item() * len(images), len(images)], dtype=torch.float64)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    sums = all_reduce_sum(sums, dist_info)
    return {"train_loss": sums[0].item() / max(sums[1].item(), 1), "samples": int(sums[1].item())}, num_updates


def _config_diff(saved: dict, cfg: TrainConfig) -> list[str]:
    current = asdict(cfg)
    keys = (set(saved) | set(current)) - RESUME_SAFE_KEYS
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def _repair_best(ckpt: dict, best_path: Path) -> None:
    """Rewrite ``best.pth`` from the resumed ``last.pth`` when that epoch is the best one and ``best.pth`` holds
    another (a run killed between writing the two): the best epoch's files then agree again."""
    best = ckpt.get("best") or {}
    if best.get("epoch") != ckpt["epoch"]:
        return
    if best_path.is_file() and _saved_epoch(best_path) == ckpt["epoch"]:
        return
    atomic_save(ckpt, best_path)


def _saved_epoch(path: Path) -> int | None:
    """The epoch a training checkpoint holds; None when it is damaged or not one (it is then rewritten)."""
    try:
        return load_training_checkpoint(path)["epoch"]
    except DataError:
        return None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train (smoothed / mixed targets)")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.plot(epochs, [h["top1"] for h in history], label="model")
    if "ema_top1" in history[0]:
        ax_acc.plot(epochs, [h["ema_top1"] for h in history], label="EMA")
    ax_acc.set(title="Validation top-1", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run; returns the summary written to ``<output>/summary.json``.

    Writes ``<output>/config.yaml``, ``last.pth`` and ``best.pth`` (every epoch, atomically), ``log.jsonl`` (one line
    per epoch), ``summary.json`` and ``curves.png``. Only rank 0 writes.
    """
    if cfg.device != "auto":
        resolve_device(cfg.device)  # a clear error for a device that does not exist here, before any work
    check_output_dir(cfg.output, "output folder")
    dist_info = init_distributed(cfg.device)
    try:
        return _train(cfg, dist_info)
    finally:
        cleanup(dist_info)


def _train(cfg: TrainConfig, dist_info: DistInfo) -> dict:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = dist_info.device
    out = Path(cfg.output)
    last_path, best_path, log_path = out / "last.pth", out / "best.pth", out / "log.jsonl"

    ckpt = None
    if cfg.resume and last_path.exists():
        ckpt = load_training_checkpoint(last_path)
        diff = _config_diff(ckpt["config"], cfg)
        if diff:
            details = "; ".join(f"{k}: {ckpt['config'].get(k)!r} -> {getattr(cfg, k, None)!r}" for k in diff)
            raise InvalidArgumentError(f"cannot resume {last_path}: it was written with a different config ({details})")
        if dist_info.is_main:
            _repair_best(ckpt, best_path)
    elif not cfg.resume and last_path.exists():
        raise InvalidArgumentError(
            f"{out} already holds a run; pass --resume to continue it or choose another --output")

    train_loader, val_loader, (img_size, in_chans, num_classes) = _data(cfg, dist_info)
    seed_everything(cfg.seed)
    model = build_model(cfg, img_size, in_chans, num_classes)
    if cfg.ats_blocks is not None:
        model = _apply_ats(model, cfg)
    model.to(device)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    updates_per_epoch = len(train_loader)
    warmup = round(cfg.warmup_epochs * updates_per_epoch)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(1, cfg.epochs * updates_per_epoch - warmup),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and cfg.amp_dtype == "float16")
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    mixup = (
        Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )
        if mixing
        else None
    )
    loss_fn = SoftTargetCrossEntropy() if mixing else nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)

    start_epoch, num_updates, history, best = 0, 0, [], None
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["state_dict"])
            if ema is not None:
                ema.module.load_state_dict(ckpt["state_dict_ema"])
        except (RuntimeError, KeyError) as err:
            raise InvalidArgumentError(
                f"{last_path} does not fit model {cfg.model!r}: {str(err).splitlines()[0]}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"])
        start_epoch, num_updates = ckpt["epoch"], ckpt["num_updates"]
        history, best = list(ckpt["history"]), ckpt["best"]
        scheduler.step_update(num_updates)

    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(out / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
        # The log is rewritten from the checkpoint's history, so a run killed after its log line but before its
        # checkpoint never shows an epoch twice.
        _write_text_atomic(log_path, "".join(json.dumps(h) + "\n" for h in history))

    if dist_info.distributed:
        if device.type == "cuda":  # SyncBatchNorm raises on CPU modules
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    bare = model.module if isinstance(model, DistributedDataParallel) else model

    for epoch in range(start_epoch, cfg.epochs):
        start = time.time()
        train_loader.sampler.set_epoch(epoch)
        seed_everything(cfg.seed, epoch, dist_info.rank)
        train_metrics, num_updates = train_one_epoch(
            model, train_loader, optimizer, scheduler, loss_fn, cfg, dist_info, num_updates, mixup, ema, scaler, epoch
        )
        val = evaluate(bare, val_loader, device, dist_info, cfg.amp, cfg.amp_dtype)
        record = {
            "epoch": epoch + 1,
            **train_metrics,
            "lr": optimizer.param_groups[0]["lr"],
            "val_loss": val["loss"],
            "top1": val["top1"],
            "top5": val["top5"],
            "val_count": val["count"],
        }
        if ema is not None:
            ema_val = evaluate(ema.module, val_loader, device, dist_info, cfg.amp, cfg.amp_dtype)
            record.update(ema_top1=ema_val["top1"], ema_top5=ema_val["top5"], ema_val_loss=ema_val["loss"])
        record["seconds"] = round(time.time() - start, 2)
        history.append(record)
        score = record.get("ema_top1", record["top1"])
        improved = best is None or score > best["score"]
        if improved:
            best = {
                "epoch": epoch + 1,
                "score": score,
                "top1": record["top1"],
                **({"ema_top1": record["ema_top1"]} if ema is not None else {}),
            }
        if dist_info.is_main:
            state = {
                "state_dict": bare.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "rng": capture_rng(),
                "epoch": epoch + 1,
                "num_updates": num_updates,
                "history": history,
                "best": best,
                "config": asdict(cfg),
                "model": cfg.model,
            }
            if ema is not None:
                state["state_dict_ema"] = ema.module.state_dict()
            # best.pth first: a kill between the two writes leaves last.pth one epoch behind, and resuming redoes
            # that epoch bit-identically (rewriting best.pth); _repair_best covers a run killed in the other order.
            if improved:
                atomic_save(state, best_path)
            atomic_save(state, last_path)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            tqdm.write(json.dumps(record))
        barrier(dist_info)

    summary = {"final": history[-1], "best": best, "epochs": cfg.epochs, "output": str(out)}
    if dist_info.is_main:
        _write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        _plot_history(history, out / "curves.png")
    return summary
