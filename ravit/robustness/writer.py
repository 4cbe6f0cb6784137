"""Write a corrupted copy of a dataset in the ImageNet-C layout: ``<out>/<corruption>/<severity>/<class>/<image>``.

Sources are any ImageFolder or Fashion-MNIST. With ``recipe='imagenet-c'`` each image goes through the recipe that
made ImageNet-C (Hendrycks & Dietterich, ICLR 2019; ``make_imagenet_c.py``): resize the short side to 256, centre
crop 224, corrupt, save as JPEG quality 85 (``optimize=True``). With ``recipe='keep'`` images keep their size and
are saved as 8-bit PNG (16-bit sources are read at their full scale, then rounded to 8 bits).

Every file is written to a temporary name and renamed into place (``ravit.outputs``), so a killed run never leaves a
half-written image; a rerun skips images already written. Corruption randomness is seeded per image, from (seed,
image index, corruption, severity) with generators on the CPU, so an output image depends only on the source image
and the seed: not on the batch size, the device's random stream or what was already on disk.

The output root holds ``ravit-corrupt.json`` (``ravit.data.CLASS_MAP_FILE``): the settings that made the copy (source,
recipe, seed), checked on every rerun so two settings never mix in one folder, and the class name of each class
folder (``T-shirt/top`` is stored in ``T-shirt_top``), which evaluation reads to map folders to a model's classes by
name. Output file names are unique per class folder, also on case-insensitive file systems: images whose stems
collide (``x.png`` and ``x.PNG``) are written as ``x_1``, ``x_2`` in the order of their source names. An unreadable
source image is skipped with a warning and counted.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ravit.data.classes import CLASS_MAP_FILE, folder_name
from ravit.data.datasets import data_name
from ravit.data.images import load_rgb, load_tensor
from ravit.errors import DataError, InvalidArgumentError, MissingFileError
from ravit.outputs import write_bytes
from ravit.robustness.registry import ALL_CORRUPTIONS, SEVERITIES, check_corruption, corrupt, image_generators

__all__ = ["SourceImages", "source_images", "write_c_dataset", "unique_names", "RECIPES"]

RECIPES = ("keep", "imagenet-c")


@dataclass(frozen=True)
class SourceImages:
    """The images to corrupt: a loader by index, their class folder and output file names, and where they came from.

    ``class_names`` maps each class folder to its class name, in label order (default: folder = name); ``origin``
    identifies the source in the output's settings (a rerun into the same folder must have the same)."""

    load: Callable[[int], torch.Tensor]  # index -> (C, H, W) float in [0, 1]
    classes: list[str]  # class folder name per image
    names: list[str]  # output file stem per image, unique within a class folder
    class_names: dict[str, str] = field(default_factory=dict)
    origin: dict[str, object] = field(default_factory=dict)
    paths: list[str] | None = None  # source file per image, for messages

    def __len__(self) -> int:
        return len(self.names)

    def head(self, n: int | None) -> SourceImages:
        """The first ``n`` images (all if ``n`` is None)."""
        if n is None:
            return self
        paths = None if self.paths is None else self.paths[:n]
        return SourceImages(self.load, self.classes[:n], self.names[:n], self.class_names, self.origin, paths)


def unique_names(classes: Sequence[str], stems: Sequence[str]) -> list[str]:
    """Output stems unique within each class folder, compared case-insensitively: a stem shared by several images
    (``x.png``, ``x.PNG``) becomes ``x_1``, ``x_2``, ... in the given order, skipping names already taken."""
    key = [(c, s.lower()) for c, s in zip(classes, stems, strict=True)]
    count: dict[tuple[str, str], int] = {}
    for k in key:
        count[k] = count.get(k, 0) + 1
    taken = {k for k, n in count.items() if n == 1}
    out = []
    for (c, low), stem in zip(key, stems, strict=True):
        if count[(c, low)] == 1:
            out.append(stem)
            continue
        i = 1
        while (c, f"{low}_{i}") in taken:
            i += 1
        taken.add((c, f"{low}_{i}"))
        out.append(f"{stem}_{i}")
    return out


def _recipe_crop(img: Image.Image) -> Image.Image:
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = int(round((w - 224) / 2)), int(round((h - 224) / 2))  # as torchvision's CenterCrop
    return img.crop((left, top, left + 224, top + 224))


def source_images(data: str, split: str = "test", data_dir: str | None = None, recipe: str = "keep") -> SourceImages:
    """``'fashion-mnist'`` / ``'fashion_mnist'`` (the split's images, class folders named after ``ravit.data.CLASSES``)
    or an ImageFolder path (same class folders as the source, file stems made unique per folder)."""
    if recipe not in RECIPES:
        raise InvalidArgumentError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    if data_name(data) == "fashion_mnist":
        from ravit.data import CLASSES, load_fashion_mnist

        images, labels = load_fashion_mnist(split, data_dir)

        def load_fm(i: int) -> torch.Tensor:
            if recipe == "imagenet-c":
                return _to_tensor(_recipe_crop(Image.fromarray(images[i].numpy(), "L")))
            return images[i].float().div(255)[None]

        names = [f"{split}_{i:05d}" for i in range(len(labels))]
        class_names = {folder_name(c): c for c in CLASSES}
        return SourceImages(load_fm, [folder_name(CLASSES[int(k)]) for k in labels], names, class_names,
                            {"data": "fashion-mnist", "split": split})
    from torchvision.datasets import ImageFolder

    root = Path(data)
    if not root.is_dir():
        raise MissingFileError(f"dataset folder not found: {root}")
    try:
        folder = ImageFolder(str(root), loader=load_rgb)
    except FileNotFoundError as err:  # torchvision's message for no class folders / no images
        raise MissingFileError(f"no images in {root} (expected <root>/<class>/<image>): {err}") from None
    paths = [p for p, _ in folder.samples]

    def load_folder(i: int) -> torch.Tensor:
        if recipe == "imagenet-c":
            return _to_tensor(_recipe_crop(load_rgb(paths[i])))
        return load_tensor(paths[i])

    classes = [folder.classes[t] for _, t in folder.samples]
    names = unique_names(classes, [Path(p).stem for p in paths])
    return SourceImages(load_folder, classes, names, {c: c for c in folder.classes},
                        {"data": str(root.resolve())}, paths)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).float().div(255)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


def _encode(img: torch.Tensor, fmt: str) -> bytes:
    arr = torch.round(img.clamp(0, 1) * 255).to(torch.uint8).cpu()
    arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(arr).save(buf, "JPEG", quality=85, optimize=True)
    else:
        Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _describe(settings: dict) -> str:
    return ", ".join(f"{k} {v!r}" for k, v in sorted(settings.items()))


def _claim(out: Path, settings: dict[str, object], class_names: dict[str, str]) -> None:
    """Record ``settings`` and the class map at ``out``, or refuse if ``out`` holds a copy made otherwise."""
    path = out / CLASS_MAP_FILE
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
            old, old_classes = recorded["settings"], recorded["classes"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path}: not a ravit corrupt settings file ({type(err).__name__}: {err})") from None
        if old != settings:
            raise InvalidArgumentError(
                f"{out} holds a corrupted copy made with {_describe(old)}; this run asks for {_describe(settings)}. "
                "Rerun with the same settings to resume, or write to another folder"
            )
        if old_classes == class_names:
            return
    elif out.is_dir() and any((out / c).is_dir() for c in ALL_CORRUPTIONS):
        raise InvalidArgumentError(
            f"{out} holds corruption folders but no {CLASS_MAP_FILE} (not written by this version of ravit "
            "corrupt): its settings are unknown, so new images would mix with them; write to another folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(path, json.dumps({"settings": settings, "classes": class_names}, indent=2).encode())


def write_c_dataset(
    source: SourceImages,
    out: str | os.PathLike,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    *,
    recipe: str = "keep",
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, int]:
    """Write every (corruption, severity) copy of ``source`` under ``out``; returns the counts written, skipped
    (already present) and unreadable (source images skipped, each named in a warning).

    ``None`` corruptions / severities mean all; an empty list is an error. Images are corrupted ``batch_size`` at a
    time (stacked by size), each with its own generator, so the output does not depend on ``batch_size``.
    """
    if recipe not in RECIPES:
        raise InvalidArgumentError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    names = list(ALL_CORRUPTIONS) if corruptions is None else list(corruptions)
    sevs = list(SEVERITIES) if severities is None else list(severities)
    if not names or not sevs:
        raise InvalidArgumentError("no corruption or no severity to write (None means all)")
    for c in names:
        for s in sevs:
            check_corruption(c, s)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(source) == 0:
        raise InvalidArgumentError("the source dataset has no images")
    fmt, ext = ("JPEG", ".JPEG") if recipe == "imagenet-c" else ("PNG", ".png")
    out = Path(out)
    class_names = source.class_names or {c: c for c in sorted(set(source.classes))}
    _claim(out, {**source.origin, "recipe": recipe, "seed": int(seed)}, class_names)
    stats = {"written": 0, "skipped": 0, "unreadable": 0}
    unreadable: set[int] = set()
    bar = tqdm(total=len(names) * len(sevs) * len(source), desc="corrupt", unit="img", disable=not progress)
    for c in names:
        for s in sevs:
            base = out / c / str(s)
            for start in range(0, len(source), batch_size):
                idx = [i for i in range(start, min(start + batch_size, len(source))) if i not in unreadable]
                paths = {i: base / source.classes[i] / f"{source.names[i]}{ext}" for i in idx}
                todo = [i for i in idx if not paths[i].exists()]
                stats["skipped"] += len(idx) - len(todo)
                bar.update(len(idx) - len(todo))
                images = {}
                for i in todo:
                    try:
                        images[i] = source.load(i)
                    except DataError as err:
                        unreadable.add(i)
                        warnings.warn(f"skipping an unreadable source image: {err}", stacklevel=2)
                if not images:
                    continue
                for i, y in _corrupt_by_size(images, c, s, seed, device).items():
                    write_bytes(paths[i], _encode(y, fmt))
                    stats["written"] += 1
                    bar.update(1)
            for stale in base.glob("*/*.tmp"):  # left by a run killed mid-write; its image was redone above
                stale.unlink(missing_ok=True)
    bar.close()
    stats["unreadable"] = len(unreadable)
    return stats


def _corrupt_by_size(
    images: dict[int, torch.Tensor], name: str, severity: int, seed: int, device
) -> dict[int, torch.Tensor]:
    """Corrupt (C, H, W) images keyed by source index, stacking those of equal shape into one batch; each image's
    randomness comes from its own CPU generator (see ``image_generators``)."""
    out: dict[int, torch.Tensor] = {}
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in images.items():
        groups.setdefault(tuple(im.shape), []).append(i)
    for idx in groups.values():
        batch = torch.stack([images[i] for i in idx]).to(device)
        gens = image_generators(seed, idx, name, severity)
        for i, y in zip(idx, corrupt(batch, name, severity, gens), strict=True):
            out[i] = y
    return out
