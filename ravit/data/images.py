"""Reading image files: every bit depth at its true scale, and an unreadable file named in a clear error.

Pillow opens a 16-bit grayscale PNG in mode ``I;16`` (or ``I``) and its ``convert('L')`` / ``convert('RGB')`` clips
every value above 255 to white, so a 16-bit image would come out almost all white. Here 16-bit values are scaled by
1 / 65535 instead. A file that is not an image, or is truncated or corrupt, raises :class:`ravit.errors.DataError`
naming the file (system errors such as a permission denied stay what they are).
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ravit.errors import DataError

__all__ = ["load_image", "load_rgb", "load_tensor"]

_HIGH_DEPTH = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1}


def _unreadable(err: BaseException) -> bool:
    """Pillow's errors for a bad file (no errno); an OSError with an errno comes from the system, not the file."""
    if isinstance(err, (UnidentifiedImageError, SyntaxError, EOFError, zlib.error, ValueError)):
        return True
    return isinstance(err, OSError) and err.errno is None


def _read(path: str | os.PathLike, convert) -> object:
    """``convert(opened, loaded PIL image)`` with Pillow's errors for a bad file turned into a DataError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return convert(im)
    except Exception as err:
        if not _unreadable(err):
            raise
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def _to_array(im: Image.Image) -> np.ndarray:
    if im.mode in _HIGH_DEPTH:
        arr = np.clip(np.asarray(im, dtype=np.float64) / _HIGH_DEPTH[im.mode], 0, 1).astype(np.float32)
    else:
        grey = im.mode in ("1", "L", "LA", "La")
        arr = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.float32) / 255
    return arr[..., None] if arr.ndim == 2 else arr  # (H, W, C)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as float32 (H, W, C) in [0, 1], C = 1 (grayscale, any bit depth) or 3 (colour)."""
    return _read(path, _to_array)


def load_tensor(path: str | os.PathLike) -> torch.Tensor:
    """The image at ``path`` as a float tensor (C, H, W) in [0, 1] (see ``load_image``)."""
    return torch.from_numpy(np.ascontiguousarray(load_image(path).transpose(2, 0, 1)))


def _rgb(im: Image.Image) -> Image.Image:
    if im.mode not in _HIGH_DEPTH:
        return im.convert("RGB")
    grey = np.round(_to_array(im)[..., 0] * 255).astype(np.uint8)  # (H, W)
    return Image.fromarray(grey).convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` as an 8-bit RGB PIL image (a loader for torchvision's ``ImageFolder``): 16-bit images
    are scaled to 8 bits, not clipped."""
    return _read(path, _rgb)
