"""Write a corrupted copy of a dataset in the ImageNet-C layout: ``<out>/<corruption>/<severity>/<class>/<image>``.

Sources are any ImageFolder or Fashion-MNIST. With ``recipe='imagenet-c'`` each image goes through the recipe that
made ImageNet-C (Hendrycks & Dietterich, ICLR 2019; ``make_imagenet_c.py``): resize the short side to 256, centre
crop 224, corrupt, save as JPEG quality 85 (``optimize=True``). With ``recipe='keep'`` images keep their size and
are saved losslessly as PNG.

Every file is written to a hidden temporary name and renamed into place, so a killed run never leaves a
half-written image; a rerun skips images already written. Corruption randomness is seeded per (seed, corruption,
severity, batch), so a resumed run writes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import io
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ravit.errors import InvalidArgumentError, MissingFileError
from ravit.robustness.registry import ALL_CORRUPTIONS, SEVERITIES, check_corruption, corrupt

__all__ = ["SourceImages", "source_images", "write_c_dataset", "RECIPES"]

RECIPES = ("keep", "imagenet-c")


@dataclass(frozen=True)
class SourceImages:
    """The images to corrupt: a loader by index, their class names and output file names."""

    load: Callable[[int], torch.Tensor]  # index -> (C, H, W) float in [0, 1]
    classes: list[str]  # class folder name per image
    names: list[str]  # output file stem per image

    def __len__(self) -> int:
        return len(self.names)

    def head(self, n: int | None) -> SourceImages:
        """The first ``n`` images (all if ``n`` is None)."""
        return self if n is None else SourceImages(self.load, self.classes[:n], self.names[:n])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def _recipe_crop(img: Image.Image) -> Image.Image:
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = int(round((w - 224) / 2)), int(round((h - 224) / 2))  # as torchvision's CenterCrop
    return img.crop((left, top, left + 224, top + 224))


def source_images(data: str, split: str = "test", data_dir: str | None = None, recipe: str = "keep") -> SourceImages:
    """``'fashion-mnist'`` (the split's images, class folders named after ``ravit.data.CLASSES``) or an
    ImageFolder path (same class folders and file stems as the source)."""
    if recipe not in RECIPES:
        raise InvalidArgumentError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    if data == "fashion-mnist":
        from ravit.data import CLASSES, load_fashion_mnist

        images, labels = load_fashion_mnist(split, data_dir)

        def load_fm(i: int) -> torch.Tensor:
            if recipe == "imagenet-c":
                return _to_tensor(_recipe_crop(Image.fromarray(images[i].numpy(), "L")))
            return images[i].float().div(255)[None]

        names = [f"{split}_{i:05d}" for i in range(len(labels))]
        return SourceImages(load_fm, [_safe(CLASSES[int(k)]) for k in labels], names)
    from torchvision.datasets import ImageFolder

    root = Path(data)
    if not root.is_dir():
        raise MissingFileError(f"dataset folder not found: {root}")
    folder = ImageFolder(str(root))

    def load_folder(i: int) -> torch.Tensor:
        with Image.open(folder.samples[i][0]) as im:
            im = im.convert("L" if im.mode in ("L", "I;16", "I") else "RGB")
            return _to_tensor(_recipe_crop(im) if recipe == "imagenet-c" else im)

    return SourceImages(
        load_folder, [folder.classes[t] for _, t in folder.samples], [Path(p).stem for p, _ in folder.samples]
    )


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


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
    """Write every (corruption, severity) copy of ``source`` under ``out``; returns counts written / skipped.

    Images of different sizes are batched by size; randomness is per (seed, corruption, severity, batch index),
    batches being fixed slices of the source order, so the output does not depend on what was already on disk.
    """
    if recipe not in RECIPES:
        raise InvalidArgumentError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    names = list(corruptions) if corruptions else list(ALL_CORRUPTIONS)
    sevs = list(severities) if severities else list(SEVERITIES)
    for c in names:
        for s in sevs:
            check_corruption(c, s)
    if len(source) == 0:
        raise InvalidArgumentError("the source dataset has no images")
    fmt, ext = ("JPEG", ".JPEG") if recipe == "imagenet-c" else ("PNG", ".png")
    out = Path(out)
    batches = [range(i, min(i + batch_size, len(source))) for i in range(0, len(source), batch_size)]
    stats = {"written": 0, "skipped": 0}
    bar = tqdm(total=len(names) * len(sevs) * len(source), desc="corrupt", unit="img", disable=not progress)
    for c in names:
        for s in sevs:
            base = out / c / str(s)
            for b, idx in enumerate(batches):
                paths = [base / source.classes[i] / f"{source.names[i]}{ext}" for i in idx]
                todo = [k for k, p in enumerate(paths) if not p.exists()]
                stats["skipped"] += len(paths) - len(todo)
                bar.update(len(paths) - len(todo))
                if not todo:
                    continue
                images = [source.load(i) for i in idx]
                gen = torch.Generator(device=device).manual_seed(zlib.crc32(repr((seed, c, s, b)).encode()))
                corrupted = _corrupt_by_size(images, c, s, gen, device)
                for k in todo:
                    paths[k].parent.mkdir(parents=True, exist_ok=True)
                    _write(paths[k], _encode(corrupted[k], fmt))
                    stats["written"] += 1
                    bar.update(1)
            for stale in base.glob("*/.*.tmp"):  # left by a run killed mid-write; its image was redone above
                stale.unlink(missing_ok=True)
    bar.close()
    return stats


def _corrupt_by_size(
    images: list[torch.Tensor], name: str, severity: int, gen: torch.Generator, device
) -> list[torch.Tensor]:
    """Corrupt a list of (C, H, W) images, stacking those of equal shape into one batch (in first-seen order)."""
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    for idx in groups.values():
        batch = torch.stack([images[i] for i in idx]).to(device)
        for i, y in zip(idx, corrupt(batch, name, severity, gen), strict=True):
            out[i] = y
    return out
