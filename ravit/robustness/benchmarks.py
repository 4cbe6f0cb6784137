"""Benchmark datasets on disk: ImageNet-C, ImageNet-A, ImageNet-R, ImageNet-Sketch (and any ImageFolder).

- ImageNet-C (Hendrycks & Dietterich, ICLR 2019): ``<root>/<corruption>/<severity>/<wnid>/<image>``, 15 benchmark
  + 4 extra corruptions, severities 1-5.
- ImageNet-A (Hendrycks et al., CVPR 2021) and ImageNet-R (Hendrycks et al., ICCV 2021): 200-class subsets as
  ``<root>/<wnid>/<image>``. A 1000-class model's logits are restricted to those 200 classes (the standard
  evaluation, FAN's ``validate_ood.py``); the index lists are read from the ones timm ships
  (``timm/data/_info/imagenet_{a,r}_indices.txt``). Sorted wnid folders line up with the ascending indices.
- ImageNet-Sketch (Wang et al., NeurIPS 2019): all 1000 classes, ``<root>/<wnid>/<image>``.
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

import torch

from ravit.errors import InvalidArgumentError, MissingFileError
from ravit.robustness.registry import ALL_CORRUPTIONS, SEVERITIES

__all__ = [
    "imagenet_synsets",
    "imagenet_a_indices",
    "imagenet_r_indices",
    "imagenet_a_synsets",
    "imagenet_r_synsets",
    "class_mask",
    "list_classes",
    "imagenet_c_folder",
    "check_classes",
]


def _timm_info(name: str) -> list[str]:
    with importlib.resources.files("timm.data").joinpath("_info", name).open() as f:
        return [line.strip() for line in f if line.strip()]


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order."""
    return tuple(_timm_info("imagenet_synsets.txt"))


@functools.cache
def imagenet_a_indices() -> tuple[int, ...]:
    """The 200 ImageNet-1k class indices of ImageNet-A, ascending."""
    return tuple(int(i) for i in _timm_info("imagenet_a_indices.txt"))


@functools.cache
def imagenet_r_indices() -> tuple[int, ...]:
    """The 200 ImageNet-1k class indices of ImageNet-R, ascending."""
    return tuple(int(i) for i in _timm_info("imagenet_r_indices.txt"))


@functools.cache
def imagenet_a_synsets() -> tuple[str, ...]:
    return tuple(_timm_info("imagenet_a_synsets.txt"))


@functools.cache
def imagenet_r_synsets() -> tuple[str, ...]:
    return tuple(_timm_info("imagenet_r_synsets.txt"))


def class_mask(benchmark: str) -> torch.Tensor | None:
    """Indices of the 1000 logits kept for ``benchmark`` ('imagenet-a', 'imagenet-r'); None for all 1000."""
    if benchmark == "imagenet-a":
        return torch.tensor(imagenet_a_indices())
    if benchmark == "imagenet-r":
        return torch.tensor(imagenet_r_indices())
    return None


def list_classes(root: str | Path) -> list[str]:
    """Sorted class folder names of an ImageFolder; errors name the folder."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"dataset folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise MissingFileError(f"no class folders in {root} (expected <root>/<class>/<image>)")
    return classes


def imagenet_c_folder(root: str | Path, corruption: str, severity: int) -> Path:
    """``<root>/<corruption>/<severity>``, or a FileNotFoundError naming what is missing."""
    if corruption not in ALL_CORRUPTIONS:
        raise InvalidArgumentError(f"unknown corruption {corruption!r}; valid names: {', '.join(ALL_CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise InvalidArgumentError(
            f"unknown severity {severity!r}; valid severities: {', '.join(map(str, SEVERITIES))}")
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"ImageNet-C folder not found: {root}")
    if not (root / corruption).is_dir():
        raise MissingFileError(f"corruption folder missing: {root / corruption}")
    folder = root / corruption / str(severity)
    if not folder.is_dir():
        raise MissingFileError(f"severity folder missing: {folder}")
    return folder


def check_classes(classes: list[str], num_classes: int, benchmark: str = "folder") -> None:
    """Raise ``ValueError`` if an ImageFolder's classes cannot be scored by a model with ``num_classes`` outputs."""
    if benchmark in ("imagenet-a", "imagenet-r"):
        expected = imagenet_a_synsets() if benchmark == "imagenet-a" else imagenet_r_synsets()
        if num_classes != 1000:
            raise InvalidArgumentError(f"{benchmark} needs a 1000-class ImageNet model, got {num_classes} classes")
        if tuple(classes) != tuple(sorted(expected)):
            extra = sorted(set(classes) - set(expected))[:5]
            missing = sorted(set(expected) - set(classes))[:5]
            raise InvalidArgumentError(
                f"class folders do not match the 200 {benchmark} wnids ({len(classes)} folders; unexpected "
                f"{extra or 'none'}; missing {missing or 'none'})"
            )
        return
    if len(classes) != num_classes:
        raise InvalidArgumentError(
            f"{len(classes)} class folders ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}) but the "
            f"model has {num_classes} classes"
        )
    if num_classes == 1000 and all(c.startswith("n") and len(c) == 9 for c in classes):
        unknown = sorted(set(classes) - set(imagenet_synsets()))[:5]
        if unknown:
            raise InvalidArgumentError(f"class folders are not ImageNet-1k wnids: {unknown}")
