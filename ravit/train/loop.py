"""The training and evaluation loops behind ``ravit train`` / ``ravit eval``.

Recipe (FAN, Zhou et al. 2022, Sec. 4; DeiT's, which FAN follows): AdamW, cosine schedule with linear warm-up,
label smoothing, optional mixup/cutmix, EMA of the weights, AMP, gradient clipping; all parts are timm's.

A run (``train``) is a thin driver over four steps: ``_build`` (data, model, optimizer, schedule), ``_restore`` (the
state of ``last.pth`` when resuming), ``_run`` (the epochs) and ``_save`` (a checkpoint after each epoch and at a stop).

Exact resume: the data order and every random draw of an epoch are a pure function of (seed, epoch, rank): the
sampler is a ``DistributedSampler`` (seeded, ``set_epoch``) also for one process, and the global torch / numpy /
python RNGs are reseeded from (seed, epoch, rank) at the start of each epoch. With model, optimizer, EMA and scaler
restored from the last checkpoint (the LR schedule is a function of the config and the update count: rebuilt, not
loaded), a resumed run computes the same numbers as an uninterrupted one.

``max_steps`` stops a run once it has made that many optimizer steps in all, also mid-epoch; the schedule stays the
one of ``epochs``. The checkpoint of a stop also holds the batches of the epoch already done, their loss sums and
every process's RNG states. Resuming it (without the limit, or with a larger one) loads those batches again and drops
them, so the data workers' random streams advance as they did, then restores the RNG states: the result equals an
uninterrupted run's.

``epochs`` may change on resume, but not below the epochs already trained. The cosine schedule spans ``epochs``, so a
new length changes the rest of it: a finished 10-epoch run resumed with 15 epochs continues at the LR that the
15-epoch cosine has after epoch 10 (above ``min_lr``, where the 10-epoch schedule ended) and decays to ``min_lr`` at
epoch 15: a warm restart, not what a run planned for 15 epochs computes. The extended run is deterministic and
resumes exactly from any of its own checkpoints.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
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
from ravit.outputs import atomic_open, check_output_dir, write_json, write_text
from ravit.train.checkpoint import (
    atomic_save,
    capture_rng,
    load_training_checkpoint,
    restore_rng,
)
from ravit.train.config import TrainConfig, resolve_config, resume_conflicts
from ravit.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
)

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


def _replay(loader: Iterable, skip: int, rng: dict | None) -> Iterator:
    """The batches of ``loader`` after the first ``skip``, which are loaded and dropped (so data workers' random
    streams advance as in the run that trained them); then the RNG states ``rng`` of that run's stop are restored."""
    batches = iter(loader)
    for _ in range(skip):
        next(batches)
    if rng is not None:
        restore_rng(rng)
    yield from batches


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
    *,
    start: int = 0,
    rng: dict | None = None,
    sums: tuple[float, float] = (0.0, 0.0),
    stop_at: int | None = None,
) -> tuple[torch.Tensor, int]:
    """One pass over ``loader`` from batch ``start`` (a stopped epoch: ``rng`` are the RNG states of the stop, ``sums``
    the loss sum and sample count of the batches before it), ending early once ``num_updates`` reaches ``stop_at``.

    Returns the (loss sum, samples) of the epoch so far as float64, summed over processes, and ``num_updates``."""
    model.train()
    device = dist_info.device
    totals = torch.tensor(sums, dtype=torch.float64)  # loss sum, samples
    bar = tqdm(
        _replay(loader, start, rng),
        total=len(loader),
        initial=start,
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
        totals += torch.tensor([loss.item() * len(images), len(images)], dtype=torch.float64)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
        if stop_at is not None and num_updates >= stop_at:
            break
    bar.close()
    return all_reduce_sum(totals, dist_info), num_updates


def _train_metrics(totals: torch.Tensor) -> dict:
    return {"train_loss": totals[0].item() / max(totals[1].item(), 1), "samples": int(totals[1].item())}


@dataclass
class _Parts:
    """What ``_build`` makes: the data, the model (never DDP-wrapped here) and what trains it."""

    train_loader: DataLoader
    val_loader: DataLoader
    model: nn.Module
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler
    mixup: Mixup | None
    loss_fn: nn.Module


@dataclass
class _Progress:
    """Where a run stands beyond its weights and optimizer states; a checkpoint stores it."""

    epoch: int = 0  # finished epochs
    num_updates: int = 0
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    best: dict | None = None
    batches_done: int = 0  # batches of epoch ``epoch`` + 1 already trained (a run stopped by max_steps)
    sums: tuple[float, float] = (0.0, 0.0)  # their loss sum and sample count, over all processes
    rng: dict | None = None  # this process's RNG states at that stop


def _resume_checkpoint(cfg: TrainConfig, out: Path, dist_info: DistInfo) -> dict | None:
    """``<out>/last.pth`` when resuming (None for a new run), checked against ``cfg``."""
    last_path = out / "last.pth"
    if not last_path.exists():
        return None
    if not cfg.resume:
        raise InvalidArgumentError(
            f"{out} already holds a run; pass --resume to continue it or choose another --output")
    ckpt = load_training_checkpoint(last_path)
    diff = resume_conflicts(ckpt["config"], cfg)
    if diff:
        details = "; ".join(f"{k}: {ckpt['config'].get(k)!r} -> {getattr(cfg, k, None)!r}" for k in diff)
        raise InvalidArgumentError(f"cannot resume {last_path}: it was written with a different config ({details})")
    stopped = ckpt.get("position") is not None
    if cfg.epochs < ckpt["epoch"] + stopped:
        trained = f"{ckpt['epoch']} epoch{'' if ckpt['epoch'] == 1 else 's'}" + (" and part of the next" * stopped)
        raise InvalidArgumentError(f"cannot resume {last_path} with epochs {cfg.epochs}: it has trained {trained}; "
                                   f"epochs may grow or stay, but not drop below {ckpt['epoch'] + stopped}")
    if dist_info.is_main:
        _repair_best(ckpt, out / "best.pth")
    return ckpt


def _repair_best(ckpt: dict, best_path: Path) -> None:
    """Rewrite ``best.pth`` from the resumed ``last.pth`` when that epoch is the best one and ``best.pth`` holds
    another (a run killed between writing the two): the best epoch's files then agree again. A ``last.pth`` written
    mid-epoch (max_steps) follows a complete epoch-end write, and holds other weights than the best epoch's."""
    best = ckpt.get("best") or {}
    if best.get("epoch") != ckpt["epoch"] or ckpt.get("position") is not None:
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


def _schedule(optimizer, cfg: TrainConfig, updates_per_epoch: int) -> CosineLRScheduler:
    """Linear warm-up, then a cosine from ``lr`` to ``min_lr`` at the end of ``cfg.epochs``, stepped per update."""
    warmup = round(cfg.warmup_epochs * updates_per_epoch)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, cfg.epochs * updates_per_epoch - warmup),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def _build(cfg: TrainConfig, dist_info: DistInfo) -> _Parts:
    """Data, model (seeded: every process starts from the same weights), EMA, optimizer, schedule, mixup and loss."""
    train_loader, val_loader, (img_size, in_chans, num_classes) = _data(cfg, dist_info)
    seed_everything(cfg.seed)
    model = build_model(cfg, img_size, in_chans, num_classes)
    if cfg.ats_blocks is not None:
        model = _apply_ats(model, cfg)
    model.to(dist_info.device)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    return _Parts(
        train_loader=train_loader,
        val_loader=val_loader,
        model=model,
        ema=ema,
        optimizer=optimizer,
        scheduler=_schedule(optimizer, cfg, len(train_loader)),
        scaler=torch.amp.GradScaler(dist_info.device.type, enabled=cfg.amp and cfg.amp_dtype == "float16"),
        mixup=mixup,
        loss_fn=SoftTargetCrossEntropy() if mixing else nn.CrossEntropyLoss(label_smoothing=cfg.smoothing),
    )


def _restore(parts: _Parts, ckpt: dict, cfg: TrainConfig, dist_info: DistInfo) -> _Progress:
    """Load ``ckpt`` (a checked ``last.pth``) into ``parts``; returns where the run stands."""
    try:
        parts.model.load_state_dict(ckpt["state_dict"])
        if parts.ema is not None:
            parts.ema.module.load_state_dict(ckpt["state_dict_ema"])
    except (RuntimeError, KeyError) as err:
        raise InvalidArgumentError(f"{Path(cfg.output) / 'last.pth'} does not fit model {cfg.model!r}: "
                                   f"{str(err).splitlines()[0]}") from None
    parts.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        parts.scaler.load_state_dict(ckpt["scaler"])
    progress = _Progress(epoch=ckpt["epoch"], num_updates=ckpt["num_updates"], history=list(ckpt["history"]),
                         best=ckpt["best"])
    position = ckpt.get("position")
    if position is not None:
        if position["world_size"] != dist_info.world_size:
            raise InvalidArgumentError(
                f"{Path(cfg.output) / 'last.pth'} stopped mid-epoch with {position['world_size']} process(es); resume "
                f"it with as many (this run has {dist_info.world_size})")
        progress.batches_done, progress.sums = position["batches_done"], tuple(position["sums"])
        progress.rng = position["rng"][dist_info.rank]
    parts.scheduler.step_update(progress.num_updates)
    return progress


def _start_files(cfg: TrainConfig, out: Path, history: list[dict]) -> None:
    """``config.yaml``, and ``log.jsonl`` rewritten from the checkpoint's history, so a run killed after its log line
    but before its checkpoint never shows an epoch twice."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
    write_text(out / "log.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def _distribute(model: nn.Module, dist_info: DistInfo) -> nn.Module:
    """``model`` wrapped in DDP when there are several processes."""
    if not dist_info.distributed:
        return model
    if dist_info.device.type != "cuda":
        return DistributedDataParallel(model)
    # SyncBatchNorm raises on CPU modules; the conversion replaces the BatchNorm children of ``model`` in place
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[dist_info.device.index])


def _save(cfg: TrainConfig, parts: _Parts, progress: _Progress, out: Path, *, improved: bool = False,
          position: dict | None = None) -> None:
    """``last.pth`` for ``progress`` (and ``best.pth`` when ``improved``); ``position`` marks a mid-epoch stop."""
    state = {
        "state_dict": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler.is_enabled() else None,
        "rng": capture_rng(),
        "epoch": progress.epoch,
        "num_updates": progress.num_updates,
        "history": progress.history,
        "best": progress.best,
        "config": asdict(cfg),
        "model": cfg.model,
        "position": position,
    }
    if parts.ema is not None:
        state["state_dict_ema"] = parts.ema.module.state_dict()
    # best.pth first: a kill between the two writes leaves last.pth one epoch behind, and resuming redoes that epoch
    # bit-identically (rewriting best.pth); _repair_best covers a run killed in the other order.
    if improved:
        atomic_save(state, out / "best.pth")
    atomic_save(state, out / "last.pth")


def _partial_epoch(progress: _Progress, batches_per_epoch: int) -> dict | None:
    """What a run stopped mid-epoch has trained of that epoch (None at an epoch's end)."""
    if not progress.batches_done:
        return None
    loss, samples = progress.sums
    return {"epoch": progress.epoch + 1, "batches": progress.batches_done, "of": batches_per_epoch,
            "num_updates": progress.num_updates, "train_loss": loss / max(samples, 1), "samples": int(samples)}


def _end_epoch(cfg: TrainConfig, parts: _Parts, progress: _Progress, totals: torch.Tensor, num_updates: int,
               started: float, dist_info: DistInfo) -> tuple[_Progress, bool]:
    """Validate after epoch ``progress.epoch`` + 1 (the model, and its EMA when kept); returns the progress with the
    epoch's record, and whether the epoch is the best so far (by EMA top-1 when kept)."""
    val = evaluate(parts.model, parts.val_loader, dist_info.device, dist_info, cfg.amp, cfg.amp_dtype)
    record = {
        "epoch": progress.epoch + 1,
        **_train_metrics(totals),
        "lr": parts.optimizer.param_groups[0]["lr"],
        "val_loss": val["loss"],
        "top1": val["top1"],
        "top5": val["top5"],
        "val_count": val["count"],
    }
    if parts.ema is not None:
        ema_val = evaluate(parts.ema.module, parts.val_loader, dist_info.device, dist_info, cfg.amp, cfg.amp_dtype)
        record.update(ema_top1=ema_val["top1"], ema_top5=ema_val["top5"], ema_val_loss=ema_val["loss"])
    record["seconds"] = round(time.time() - started, 2)
    score = record.get("ema_top1", record["top1"])
    improved = progress.best is None or score > progress.best["score"]
    best = progress.best
    if improved:
        best = {
            "epoch": record["epoch"],
            "score": score,
            "top1": record["top1"],
            **({"ema_top1": record["ema_top1"]} if parts.ema is not None else {}),
        }
    history = [*progress.history, record]
    return _Progress(epoch=record["epoch"], num_updates=num_updates, history=history, best=best), improved


def _run(cfg: TrainConfig, parts: _Parts, model: nn.Module, progress: _Progress, dist_info: DistInfo,
         out: Path) -> _Progress:
    """Train from ``progress`` to the end of ``cfg.epochs`` or to ``cfg.max_steps`` updates; ``model`` is
    ``parts.model``, DDP-wrapped when distributed. Rank 0 writes a checkpoint after each epoch and at a stop."""
    batches_per_epoch = len(parts.train_loader)
    for epoch in range(progress.epoch, cfg.epochs):
        if cfg.max_steps is not None and progress.num_updates >= cfg.max_steps:
            break
        started = time.time()
        parts.train_loader.sampler.set_epoch(epoch)
        seed_everything(cfg.seed, epoch, dist_info.rank)
        totals, num_updates = train_one_epoch(
            model, parts.train_loader, parts.optimizer, parts.scheduler, parts.loss_fn, cfg, dist_info,
            progress.num_updates, parts.mixup, parts.ema, parts.scaler, epoch,
            start=progress.batches_done,
            rng=progress.rng,
            sums=progress.sums if dist_info.is_main else (0.0, 0.0),  # counted once in the sum over processes
            stop_at=cfg.max_steps,
        )
        batches_done = progress.batches_done + num_updates - progress.num_updates
        if batches_done < batches_per_epoch:  # stopped by max_steps
            rngs = gather_objects(capture_rng(), dist_info)  # before anything else draws from them
            progress = _Progress(epoch=epoch, num_updates=num_updates, history=progress.history, best=progress.best,
                                 batches_done=batches_done, sums=tuple(totals.tolist()))
            if dist_info.is_main:
                position = {"batches_done": batches_done, "sums": list(progress.sums),
                            "world_size": dist_info.world_size, "rng": rngs}
                _save(cfg, parts, progress, out, position=position)
                tqdm.write(json.dumps({"stopped": _partial_epoch(progress, batches_per_epoch)}))
            barrier(dist_info)
            break
        progress, improved = _end_epoch(cfg, parts, progress, totals, num_updates, started, dist_info)
        if dist_info.is_main:
            _save(cfg, parts, progress, out, improved=improved)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(progress.history[-1]) + "\n")
            tqdm.write(json.dumps(progress.history[-1]))
        barrier(dist_info)
    return progress


def _finish(cfg: TrainConfig, progress: _Progress, out: Path, batches_per_epoch: int, dist_info: DistInfo) -> dict:
    """The run's summary (written by rank 0 with the curves)."""
    summary = {
        "final": progress.history[-1] if progress.history else None,
        "best": progress.best,
        "epochs": cfg.epochs,
        "epochs_done": progress.epoch,
        "num_updates": progress.num_updates,
        "partial_epoch": _partial_epoch(progress, batches_per_epoch),
        "output": str(out),
    }
    if dist_info.is_main:
        write_json(out / "summary.json", summary)
        if progress.history:
            _plot_history(progress.history, out / "curves.png")
    return summary


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
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run; returns the summary written to ``<output>/summary.json``.

    Writes ``<output>/config.yaml``, ``last.pth`` and ``best.pth`` (every epoch, atomically; ``last.pth`` also at a
    ``max_steps`` stop), ``log.jsonl`` (one line per finished epoch), ``summary.json`` and ``curves.png``. Only rank 0
    writes.
    """
    cfg = resolve_config(cfg)
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
    out = Path(cfg.output)
    ckpt = _resume_checkpoint(cfg, out, dist_info)
    parts = _build(cfg, dist_info)
    progress = _restore(parts, ckpt, cfg, dist_info) if ckpt is not None else _Progress()
    if dist_info.is_main:
        _start_files(cfg, out, progress.history)
    progress = _run(cfg, parts, _distribute(parts.model, dist_info), progress, dist_info, out)
    return _finish(cfg, progress, out, len(parts.train_loader), dist_info)
