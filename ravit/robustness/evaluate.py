"""Robustness evaluation of any classifier: on-the-fly corruptions of any dataset, an ImageNet-C folder,
ImageNet-A / -R (200-class logit masks) and ImageNet-Sketch.

Protocol (FAN ``validate_ood.py``; Hendrycks & Dietterich, ICLR 2019): images are resized and centre-cropped to
the model's input size (``ravit.data.ModelInput``: its timm data config, the model as built), corrupted in [0, 1]
pixel space, then normalised with the model's mean / std. Under ``torchrun`` each rank scores a disjoint shard and
the correct / total counts are summed once at the end; only rank 0 should write results. On-the-fly corruptions are
seeded per image (seed, dataset index, corruption, severity), so counts do not depend on the batch size or the
number of ranks.

Class folders are mapped to the model's classes by name (``ravit.data.classes``: the model's ``label_names`` or
ImageNet wnids, and the class map ``ravit corrupt`` writes), never by alphabetical position; ImageNet-A/-R keep
their sorted 200 wnids, which line up with the ascending logit mask.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from ravit.data.classes import label_map, read_class_map
from ravit.data.datasets import check_data, create_dataset, data_name
from ravit.data.images import load_rgb
from ravit.data.model_input import ModelInput
from ravit.errors import InvalidArgumentError, MissingFileError
from ravit.outputs import write_bytes, write_json
from ravit.robustness.benchmarks import check_classes, class_mask, imagenet_c_folder, list_classes
from ravit.robustness.metrics import Baseline, summarize
from ravit.robustness.registry import (
    ALL_CORRUPTIONS,
    BENCHMARK_CORRUPTIONS,
    SEVERITIES,
    check_corruption,
    corrupt,
    image_generators,
)

__all__ = [
    "RobustnessResult",
    "ModelInput",
    "image_dataset",
    "evaluate_corruptions",
    "evaluate_imagenet_c",
    "evaluate_folder",
]


class _Relabeled(Dataset):
    """``dataset`` with each label ``y`` replaced by ``labels[y]`` (dataset order -> the model's class index)."""

    def __init__(self, dataset: Dataset, labels: list[int]):
        self.dataset, self.labels = dataset, labels
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, self.labels[y]


class _ClassFolder(ImageFolder):
    """torchvision's ImageFolder with the class folders of ``list_classes`` (hidden folders are not classes), so
    its label k is the k-th name that ``list_classes`` and the label maps see."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = list_classes(directory)
        return classes, {c: i for i, c in enumerate(classes)}


def _folder(root: str | Path, spec: ModelInput, labels: list[int] | None = None) -> Dataset:
    """An ImageFolder as [0, 1] tensors at the model's input size; ``labels`` maps its sorted class index to the
    model's."""
    target = None if labels is None or labels == list(range(len(labels))) else labels.__getitem__
    try:
        return _ClassFolder(str(root), transform=spec.unit_transform(), target_transform=target, loader=load_rgb)
    except FileNotFoundError as err:  # torchvision's message for class folders without images
        raise MissingFileError(f"no images in {root} (expected <root>/<class>/<image>): {err}") from None


def image_dataset(data: str | os.PathLike, spec: ModelInput, split: str = "test",
                  data_dir: str | os.PathLike | None = None) -> Dataset:
    """``--data`` (``ravit.data.open_data``: ``'fashion-mnist'`` or an image folder, its ``<split>`` subfolder when
    there is one) as (C, H, W) float in [0, 1] at the model's input size (``spec.unit_transform()``).

    The dataset has a ``classes`` attribute (sorted class folder names for an image folder, whose labels are
    mapped to the model's classes by name in ``evaluate_corruptions``)."""
    name = data_name(data)
    if name is not None:
        return create_dataset(name, split, data_dir, spec.unit_transform())
    folder = Path(check_data(data))
    root = folder / split if (folder / split).is_dir() else folder
    list_classes(root)
    return _folder(root, spec)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard(dataset: Dataset, limit: int | None) -> Dataset:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    rank, world = _rank_world()
    return Subset(dataset, range(rank, n, world))


def _gather(counts: torch.Tensor) -> torch.Tensor:
    """Sum (correct, total) counts over ranks: one collective for the whole evaluation."""
    if _rank_world()[1] > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        counts = counts.to(device)
        dist.all_reduce(counts)
    return counts.cpu()


@dataclass
class RobustnessResult:
    """Counts and accuracies of one robustness evaluation; ``summary()`` adds mCE, means and retention."""

    model: str
    benchmark: str
    clean: tuple[int, int] | None = None  # (correct, total)
    counts: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)
    baseline: Baseline | None = None  # the mCE baseline (None: AlexNet's ImageNet-C errors)

    @property
    def clean_accuracy(self) -> float | None:
        return self.clean[0] / self.clean[1] if self.clean and self.clean[1] else None

    @property
    def accuracy(self) -> dict[str, dict[int, float]]:
        return {c: {s: k / n for s, (k, n) in sev.items()} for c, sev in self.counts.items()}

    def summary(self) -> dict[str, object]:
        if not self.counts:
            return {"accuracy": self.clean_accuracy}
        return summarize(self.accuracy, self.clean_accuracy, self.baseline)

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "benchmark": self.benchmark,
            "meta": self.meta,
            "clean": None if self.clean is None else {"correct": self.clean[0], "total": self.clean[1]},
            "accuracy": {c: {str(s): a for s, a in sev.items()} for c, sev in self.accuracy.items()},
            "counts": {c: {str(s): list(k) for s, k in sev.items()} for c, sev in self.counts.items()},
            "summary": _jsonable(self.summary()),
        }

    def rows(self) -> list[dict[str, object]]:
        clean = self.clean_accuracy
        rows = []
        if self.clean is not None:
            rows.append({"corruption": "clean", "severity": 0, "accuracy": clean, "correct": self.clean[0],
                         "total": self.clean[1], "retention": 1.0 if clean else None})
        for c, sev in self.counts.items():
            for s, (k, n) in sorted(sev.items()):
                rows.append({"corruption": c, "severity": s, "accuracy": k / n, "correct": k, "total": n,
                             "retention": (k / n) / clean if clean else None})
        return rows

    def save(self, out_dir: str | os.PathLike, plots: bool = True) -> list[Path]:
        """Write ``robustness.json``, ``robustness.csv`` and (with corruptions) two PNG plots; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "robustness.json", out / "robustness.csv"]
        write_json(paths[0], self.to_dict())
        buf = io.StringIO()
        writer = csv.DictWriter(buf, ["corruption", "severity", "accuracy", "correct", "total", "retention"])
        writer.writeheader()
        writer.writerows(self.rows())
        write_bytes(paths[1], buf.getvalue().encode())
        if plots and self.counts:
            paths += _plot(self, out)
        return paths


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _plot(result: RobustnessResult, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc, clean = result.accuracy, result.clean_accuracy
    paths = []
    fig, ax = plt.subplots(figsize=(11, 5.5))
    colors = plt.get_cmap("tab20").colors
    for i, (c, sev) in enumerate(acc.items()):
        xs = sorted(sev)
        ys = [100 * sev[s] for s in xs]
        if clean is not None:
            xs, ys = [0, *xs], [100 * clean, *ys]
        style = "-" if c in BENCHMARK_CORRUPTIONS else "--"  # dashed: the 4 extra corruptions
        ax.plot(xs, ys, style, marker="o", color=colors[i % len(colors)], label=c)
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{result.model}: accuracy vs corruption severity ({result.benchmark})")
    ax.set_xticks(range(0, 6))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    paths.append(_save_fig(fig, out / "accuracy_vs_severity.png"))
    fig, ax = plt.subplots(figsize=(10, 5))
    names = list(acc)
    means = [100 * sum(acc[c].values()) / len(acc[c]) for c in names]
    ax.bar(range(len(names)), means, color="tab:blue")
    if clean is not None:
        ax.axhline(100 * clean, color="tab:red", linestyle="--", label=f"clean {100 * clean:.1f}%")
        ax.legend()
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("top-1 accuracy, mean over severities (%)")
    ax.set_xlabel("corruption")
    ax.set_title(f"{result.model}: accuracy per corruption ({result.benchmark})")
    fig.tight_layout()
    paths.append(_save_fig(fig, out / "accuracy_by_corruption.png"))
    return paths


def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def _loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


@torch.inference_mode()
def _predict(model: nn.Module, spec: ModelInput, images: torch.Tensor, mask: torch.Tensor | None,
             bf16: bool = False) -> torch.Tensor:
    """Predicted classes; with ``bf16`` the model (only: never the corruption) runs under bf16 autocast."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(spec.normalize(images))
    if mask is not None:
        logits = logits[:, mask.to(logits.device)]
    return logits.argmax(-1)


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if n is None:
        raise InvalidArgumentError("the model has no num_classes attribute; cannot check the dataset's classes")
    return int(n)


def _check_run(batch_size: int, limit: int | None, workers: int) -> None:
    for flag, value, low in (("batch_size", batch_size, 1), ("limit", limit, 1), ("workers", workers, 0)):
        if value is None and flag == "limit":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgumentError(f"{flag} must be an integer >= {low}, got {value!r}")


def _labels(dataset: Dataset, model: nn.Module) -> Dataset:
    """``dataset`` with labels in the model's class order, matched by class name (see ``ravit.data.classes``)."""
    classes = getattr(dataset, "classes", None)
    if classes is None:
        return dataset
    folder = isinstance(dataset, ImageFolder)
    where = dataset.root if folder else type(dataset).__name__
    labels = label_map(list(classes), model, read_class_map(dataset.root) if folder else None, str(where),
                       ordered=not folder)
    return dataset if labels == list(range(len(classes))) else _Relabeled(dataset, labels)


def _conditions(corruptions: Iterable[str] | None, severities: Iterable[int] | None) -> list[tuple[str, int]]:
    names = list(ALL_CORRUPTIONS) if corruptions is None else list(corruptions)
    sevs = list(SEVERITIES) if severities is None else list(severities)
    if not names or not sevs:
        raise InvalidArgumentError("no corruption or no severity to evaluate (None means all)")
    for c in names:
        for s in sevs:
            check_corruption(c, s)
    return [(c, s) for c in names for s in sevs]


def evaluate_corruptions(
    model: nn.Module,
    dataset: Dataset,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    *,
    name: str = "model",
    batch_size: int = 64,
    seed: int = 0,
    limit: int | None = None,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress: bool = True,
    spec: ModelInput | None = None,
    bf16: bool = False,
) -> RobustnessResult:
    """Clean accuracy and accuracy under each (corruption, severity), corrupting ``dataset`` on the fly.

    ``dataset`` yields ((C, H, W) float in [0, 1], label) at the model's input size (see ``image_dataset``); its
    ``classes`` are matched to the model's by name. Each image's corruption is seeded from (seed, its index in
    ``dataset``, corruption, severity) with a generator on ``device``, so counts do not depend on the batch size or
    the number of ranks. ``spec`` normalises the images (default: ``ModelInput.from_model(model)``). ``bf16`` runs
    the model (not the corruptions) under bf16 autocast. The progress bar counts (batch, condition) steps and names
    the one running ("<name> · corruptions · fog/3").
    """
    conds = _conditions(corruptions, severities)
    _check_run(batch_size, limit, workers)
    spec = spec or ModelInput.from_model(model)
    _num_classes(model)
    dataset = _labels(dataset, model)
    rank, _ = _rank_world()
    model = model.to(device).eval()
    counts = torch.zeros(len(conds) + 1, 2, dtype=torch.long)  # row 0: clean
    shard = _shard(dataset, limit)
    loader = _loader(shard, batch_size, workers)
    bar = tqdm(total=len(loader) * (len(conds) + 1), desc=f"{name} · corruptions",
               disable=not progress or rank != 0)
    for b, (images, labels) in enumerate(loader):
        images, labels = images.to(device), labels.to(device)
        index = shard.indices[b * batch_size : b * batch_size + len(labels)]  # positions in ``dataset``
        bar.set_description(f"{name} · corruptions · clean", refresh=False)
        counts[0] += torch.tensor([int((_predict(model, spec, images, None, bf16) == labels).sum()), len(labels)])
        bar.update()
        for i, (c, s) in enumerate(conds, start=1):
            bar.set_description(f"{name} · corruptions · {c}/{s}", refresh=False)
            gens = image_generators(seed, index, c, s, images.device)
            pred = _predict(model, spec, corrupt(images, c, s, gens), None, bf16)
            counts[i] += torch.tensor([int((pred == labels).sum()), len(labels)])
            bar.update()
    bar.close()
    counts = _gather(counts)
    result = RobustnessResult(name, "corrupt", (int(counts[0, 0]), int(counts[0, 1])))
    for (c, s), (k, n) in zip(conds, counts[1:].tolist(), strict=True):
        result.counts.setdefault(c, {})[s] = (k, n)
    result.meta.update(seed=seed, limit=limit, input=list(spec.size), in_chans=spec.in_chans,
                       precision="bf16" if bf16 else "fp32")
    return result


def _score_folder(
    model: nn.Module, dataset: Dataset, spec: ModelInput, mask: torch.Tensor | None, batch_size: int, limit: int | None,
    device, workers: int, desc: str, progress: bool, bf16: bool,
) -> torch.Tensor:
    correct = total = 0
    rank, _ = _rank_world()
    for images, labels in tqdm(_loader(_shard(dataset, limit), batch_size, workers), desc=desc,
                               disable=not progress or rank != 0, leave=False):
        images, labels = images.to(device), labels.to(device)
        correct += int((_predict(model, spec, images, mask, bf16) == labels).sum())
        total += len(labels)
    return torch.tensor([correct, total])


def _folder_labels(root: str | os.PathLike, model: nn.Module) -> list[int]:
    """The model's class index of each sorted class folder of ``root``, matched by name."""
    return label_map(list_classes(root), model, read_class_map(root), str(root))


def evaluate_imagenet_c(
    model: nn.Module,
    root: str | os.PathLike,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    *,
    clean_root: str | os.PathLike | None = None,
    name: str = "model",
    batch_size: int = 64,
    limit: int | None = None,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress: bool = True,
    spec: ModelInput | None = None,
    bf16: bool = False,
) -> RobustnessResult:
    """Accuracy on ``<root>/<corruption>/<severity>/`` ImageFolders (all 19 x 5 by default), plus clean accuracy on
    ``clean_root`` if given. Every folder is checked before any is scored, so a missing one fails fast. ``spec``:
    the model's input (default: ``ModelInput.from_model(model)``); ``bf16``: the model under bf16 autocast."""
    conds = _conditions(corruptions, severities)
    _check_run(batch_size, limit, workers)
    folders = [imagenet_c_folder(root, c, s) for c, s in conds]
    spec = spec or ModelInput.from_model(model)
    _num_classes(model)
    labels = [_folder_labels(folder, model) for folder in folders]
    clean_labels = None if clean_root is None else _folder_labels(clean_root, model)
    model = model.to(device).eval()
    counts = torch.zeros(len(conds) + 1, 2, dtype=torch.long)
    if clean_root is not None:
        counts[0] = _score_folder(model, _folder(clean_root, spec, clean_labels), spec, None, batch_size, limit,
                                  device, workers, "clean", progress, bf16)
    rank, _ = _rank_world()
    for i, ((c, s), folder, lab) in enumerate(tqdm(list(zip(conds, folders, labels, strict=True)),
                                                   desc="imagenet-c", disable=not progress or rank != 0), start=1):
        counts[i] = _score_folder(model, _folder(folder, spec, lab), spec, None, batch_size, limit, device, workers,
                                  f"{c}/{s}", progress, bf16)
    counts = _gather(counts)
    clean = (int(counts[0, 0]), int(counts[0, 1])) if clean_root is not None else None
    result = RobustnessResult(name, "imagenet-c", clean)
    for (c, s), (k, n) in zip(conds, counts[1:].tolist(), strict=True):
        result.counts.setdefault(c, {})[s] = (k, n)
    result.meta.update(root=str(root), clean_root=None if clean_root is None else str(clean_root), limit=limit,
                       precision="bf16" if bf16 else "fp32")
    return result


def evaluate_folder(
    model: nn.Module,
    root: str | os.PathLike,
    benchmark: str = "folder",
    *,
    name: str = "model",
    batch_size: int = 64,
    limit: int | None = None,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress: bool = True,
    spec: ModelInput | None = None,
    bf16: bool = False,
) -> RobustnessResult:
    """Top-1 on an ImageFolder: 'imagenet-a' / 'imagenet-r' (logits masked to their 200 classes), 'sketch' or any
    'folder' whose classes match the model's. ``spec``: the model's input (default: ``ModelInput.from_model(model)``);
    ``bf16``: the model under bf16 autocast.
    """
    if benchmark not in ("imagenet-a", "imagenet-r", "sketch", "folder"):
        raise InvalidArgumentError(f"unknown benchmark {benchmark!r}; valid: imagenet-a, imagenet-r, sketch, folder")
    _check_run(batch_size, limit, workers)
    spec = spec or ModelInput.from_model(model)
    if benchmark in ("imagenet-a", "imagenet-r"):  # sorted wnids = ascending indices of the 200-logit mask
        check_classes(list_classes(root), _num_classes(model), benchmark)
        labels = None
    else:
        _num_classes(model)
        labels = _folder_labels(root, model)
    model = model.to(device).eval()
    counts = _gather(_score_folder(model, _folder(root, spec, labels), spec, class_mask(benchmark), batch_size, limit,
                                   device, workers, benchmark, progress, bf16)[None])
    result = RobustnessResult(name, benchmark, (int(counts[0, 0]), int(counts[0, 1])))
    result.meta.update(root=str(root), limit=limit, masked_classes=benchmark in ("imagenet-a", "imagenet-r"),
                       precision="bf16" if bf16 else "fp32")
    return result
