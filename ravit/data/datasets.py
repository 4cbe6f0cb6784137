"""Dataset registry: Fashion-MNIST (IDX files, no network) and any ImageFolder.

``create_dataset(name, split, data_dir, transform)`` returns a map-style dataset of ``(transformed PIL image, int
label)`` with a ``classes`` attribute (class names in label order: compare two splits with
``ravit.data.check_same_classes``); ``dataset_info(name)`` gives what a model and a transform need to know (classes,
native channels and size, normalisation statistics). New datasets register with ``@register_dataset(name, info)``.
ImageFolder images are read by ``ravit.data.images.load_rgb``: 16-bit images scaled, not clipped, and an unreadable
file raises a DataError naming it.

``open_data(data, split, data_dir, transform)`` is what the command line's ``--data NAME_OR_FOLDER`` means: a
registered name (``fashion-mnist``; ``-`` and ``_`` are the same) or an image folder, ``<folder>/<class>/<image>`` or
``<folder>/<split>/<class>/<image>``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from ravit.data.fashion_mnist import CLASSES, load_fashion_mnist
from ravit.data.images import load_rgb
from ravit.errors import InvalidArgumentError, MissingFileError

__all__ = [
    "DatasetInfo",
    "FashionMNIST",
    "check_data",
    "create_dataset",
    "data_name",
    "data_names",
    "dataset_info",
    "list_datasets",
    "open_data",
    "register_dataset",
]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; ``classes``/``img_size`` are None where they depend on the folder."""

    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int | None = None
    classes: tuple[str, ...] | None = None
    crop_pct: float = 0.875
    splits: tuple[str, ...] = ("train", "test")


_REGISTRY: dict[str, tuple[Callable[..., Dataset], DatasetInfo]] = {}


def register_dataset(name: str, info: DatasetInfo):
    """Decorator: register ``builder(split, data_dir, transform) -> Dataset`` under ``name``."""

    def wrap(builder):
        _REGISTRY[name] = (builder, info)
        return builder

    return wrap


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def _lookup(name: str):
    if name not in _REGISTRY:
        raise InvalidArgumentError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}")
    return _REGISTRY[name]


def dataset_info(name: str) -> DatasetInfo:
    return _lookup(name)[1]


def create_dataset(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None, transform: Callable | None = None
) -> Dataset:
    """The ``split`` of dataset ``name``; raises FileNotFoundError (how to get it) or ValueError (empty)."""
    builder, info = _lookup(name)
    if split not in info.splits:
        raise InvalidArgumentError(f"dataset {name!r} has no split {split!r}; expected one of {list(info.splits)}")
    dataset = builder(split, data_dir, transform)
    if len(dataset) == 0:
        raise InvalidArgumentError(f"dataset {name!r} split {split!r} is empty (data_dir={data_dir})")
    return dataset


class FashionMNIST(Dataset):
    """Fashion-MNIST held in memory as uint8 (60k/10k images of 28x28); items are ``(transform(PIL 'L'), label)``.

    The one Fashion-MNIST dataset: training and evaluation pass timm's pipelines as ``transform``
    (``ModelInput.transform()``), robustness evaluation a [0, 1] tensor view at the model's size
    (``ModelInput.unit_transform()``)."""

    classes = CLASSES

    def __init__(self, split: str = "train", data_dir: str | os.PathLike | None = None, transform=None):
        source = "train" if split in HOLDOUT_SPLITS else split
        self.images, labels = load_fashion_mnist(source, data_dir)  # (N, 28, 28) uint8, (N,) int64
        if split in HOLDOUT_SPLITS:
            keep = holdout_indices(len(labels), split)
            self.images, labels = self.images[keep], labels[keep]
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index].numpy())  # uint8 (28, 28) -> mode "L"
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


# A validation set carved out of the training split, so model selection never looks at the test split: 'holdout' is a
# fixed random 5,000 of the 60,000 training images (permutation seeded with 0, independent of any run's seed) and
# 'train-holdout' the other 55,000.
HOLDOUT_SPLITS = ("train-holdout", "holdout")
HOLDOUT_SIZE = 5000


def holdout_indices(num_train: int, split: str) -> torch.Tensor:
    """Sorted indices into the training split: the held-out images ('holdout') or the rest ('train-holdout')."""
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(0))
    part = order[:HOLDOUT_SIZE] if split == "holdout" else order[HOLDOUT_SIZE:]
    return part.sort().values


# Statistics of the Fashion-MNIST training images (pixel values / 255).
_FMNIST_INFO = DatasetInfo(in_chans=1, mean=(0.2860,), std=(0.3530,), img_size=28, classes=CLASSES, crop_pct=1.0,
                           splits=("train", "test") + HOLDOUT_SPLITS)


@register_dataset("fashion_mnist", _FMNIST_INFO)
def _fashion_mnist(split, data_dir, transform):
    return FashionMNIST(split, data_dir, transform)


@register_dataset(
    "imagefolder",
    DatasetInfo(in_chans=3, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, splits=("train", "val", "test")),
)
def _imagefolder(split, data_dir, transform):
    """``data_dir/<split>/<class>/<image>`` (torchvision's ImageFolder), e.g. ImageNet's train/ and val/; ``classes``
    are the sorted class folder names."""
    if data_dir is None:
        raise InvalidArgumentError("dataset 'imagefolder' needs a data_dir holding <split>/<class>/<images>")
    root = Path(data_dir) / split
    if not root.is_dir():
        raise MissingFileError(f"ImageFolder split {split!r} not found: {root} is not a directory")
    try:
        return ImageFolder(str(root), transform=transform, loader=load_rgb)
    except FileNotFoundError as err:  # torchvision's message for no class folders / no images
        raise InvalidArgumentError(f"ImageFolder {root} is empty: {err}") from None


def data_name(data: str | os.PathLike) -> str | None:
    """The registered dataset ``data`` names (``'fashion-mnist'`` and ``'fashion_mnist'`` are both
    ``'fashion_mnist'``), or None when it names none (then it is a folder). 'imagefolder' needs a folder: no name."""
    key = str(data).strip().lower().replace("-", "_")
    return key if key in _REGISTRY and key != "imagefolder" else None


def data_names() -> list[str]:
    """The names ``--data`` takes, as written on a command line (``fashion-mnist``)."""
    return [name.replace("_", "-") for name in list_datasets() if name != "imagefolder"]


def check_data(data: str | os.PathLike) -> str:
    """``data`` as ``--data`` reads it: a dataset name in its command-line spelling (``fashion_mnist`` ->
    ``fashion-mnist``) or an existing folder, unchanged; anything else is a user error listing the names."""
    name = data_name(data)
    if name is not None:
        return name.replace("_", "-")
    if Path(data).is_dir():
        return str(data)
    known = ", ".join(data_names())
    if os.sep in str(data) or Path(data).exists():
        raise MissingFileError(f"data folder not found: {data} (or a dataset name: {known})")
    raise InvalidArgumentError(f"unknown data {str(data)!r}: neither a dataset name ({known}) nor a folder")


def open_data(
    data: str | os.PathLike, split: str = "test", data_dir: str | os.PathLike | None = None,
    transform: Callable | None = None,
) -> Dataset:
    """``--data``: a registered dataset's ``split`` (``data_dir``: where its files are), or an image folder: its
    ``<split>`` subfolder when there is one (``<folder>/<split>/<class>/<image>``), else the folder itself
    (``<folder>/<class>/<image>``). Items are ``(transform(PIL image), label)``; ``classes`` names the labels."""
    name = data_name(data)
    if name is not None:
        return create_dataset(name, split, data_dir, transform)
    folder = Path(check_data(data))
    root = folder / split if (folder / split).is_dir() else folder
    try:
        return ImageFolder(str(root), transform=transform, loader=load_rgb)
    except FileNotFoundError as err:  # torchvision's message for no class folders / no images
        raise MissingFileError(f"no images in {root} (expected <folder>/<class>/<image>): {err}") from None
