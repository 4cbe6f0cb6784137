"""Fashion-MNIST from its gzipped IDX files (Xiao et al. 2017), without a network.

The Debian package ``dataset-fashion-mnist`` installs them under ``/usr/share/datasets/fashion-mnist``; torchvision
cannot read that layout (it expects raw/ and downloads), so we read IDX ourselves: a 16-byte (images) or 8-byte
(labels) big-endian header, then uint8 data.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ravit.errors import DataError, InvalidArgumentError, MissingFileError

__all__ = ["CLASSES", "DEFAULT_DIR", "find_fashion_mnist", "load_fashion_mnist", "read_idx"]

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = (
    "install the Debian package ('apt-get install dataset-fashion-mnist'), or pass a folder holding "
    "train/t10k-{images-idx3,labels-idx1}-ubyte[.gz] (also read from $RAVIT_FMNIST_DIR)"
)
_REPAIR = "reinstall the dataset ('apt-get install --reinstall dataset-fashion-mnist') or copy the file again"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file (gzipped or not) as a uint8 array: (N, H, W) for images, (N,) for labels.

    A truncated, corrupt or non-IDX file raises DataError naming it."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # a cut or damaged .gz
        raise DataError(f"{path}: damaged or truncated gzip file ({err}); {_REPAIR}") from None
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file (too short); {_REPAIR}")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise DataError(f"{path}: not a uint8 IDX file (magic {data[:4].hex()}); {_REPAIR}")
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header cut short (truncated); {_REPAIR}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {body.size} values (truncated?); {_REPAIR}")
    return body.reshape(shape)


def _locate(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the four IDX files: ``data_dir``, else $RAVIT_FMNIST_DIR, else the Debian path."""
    candidates = [Path(data_dir)] if data_dir is not None else []
    if data_dir is None and os.environ.get("RAVIT_FMNIST_DIR"):
        candidates.append(Path(os.environ["RAVIT_FMNIST_DIR"]))
    if data_dir is None:
        candidates.append(DEFAULT_DIR)
    for folder in candidates:
        if all(_locate(folder, stem) for pair in _FILES.values() for stem in pair):
            return folder
    tried = ", ".join(str(c) for c in candidates)
    raise MissingFileError(f"Fashion-MNIST not found (looked in {tried}): {_HOW_TO_GET}")


def load_fashion_mnist(split: str = "train", data_dir: str | os.PathLike | None = None):
    """``(images, labels)``: uint8 tensor (N, 28, 28) and int64 tensor (N,) for split 'train' (60k) or 'test' (10k)."""
    if split not in _FILES:
        raise InvalidArgumentError(f"unknown split {split!r}; expected one of {sorted(_FILES)}")
    folder = find_fashion_mnist(data_dir)
    image_stem, label_stem = _FILES[split]
    images = read_idx(_locate(folder, image_stem))
    labels = read_idx(_locate(folder, label_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
