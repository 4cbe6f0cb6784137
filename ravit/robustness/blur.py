"""Blur corruptions of ImageNet-C (Hendrycks & Dietterich, ICLR 2019, Sec. 3), batched in torch.

Parameters are the published ones as implemented by ``imagecorruptions`` (whose motion blur is a numpy port of
ImageMagick's, used here too). Each function maps a float tensor (B, C, H, W) in [0, 1] to the same shape, dtype and
range; randomness (glass blur's pixel moves, motion blur's angle) comes only from ``generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ravit.robustness._ops import (
    Generators,
    clipped_zoom,
    fft_filter,
    gaussian_filter,
    motion_taps,
    pad,
    rand,
    randint,
    shift_accumulate,
)

__all__ = ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur", "BLUR_PARAMS"]

BLUR_PARAMS = {
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),  # disk radius, anti-alias sigma
    "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),  # sigma, max move, iterations
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),  # radius, sigma; angle ~ U(-45, 45)
    "zoom_blur": ((12, 0.01), (16, 0.01), (11, 0.02), (13, 0.02), (11, 0.03)),  # zooms 1 + i * step, i < count
    "gaussian_blur": (1, 2, 3, 4, 6),  # sigma
}


def _disk(radius: int, alias_blur: float, device: torch.device) -> torch.Tensor:
    """The reference's anti-aliased disk: a normalised binary disk smoothed by OpenCV's 3x3 (5x5 if r > 8) Gaussian."""
    half = max(radius, 8)
    t = torch.arange(-half, half + 1, dtype=torch.float64, device=device)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).double()
    disk = disk / disk.sum()
    ksize = 3 if radius <= 8 else 5
    g = torch.exp(-((torch.arange(ksize, dtype=torch.float64, device=device) - ksize // 2) ** 2) / (2 * alias_blur**2))
    g = g / g.sum()
    r = ksize // 2
    out = F.conv2d(pad(disk[None, None], r, r, 0, 0, "mirror"), g.view(1, 1, -1, 1))
    out = F.conv2d(pad(out, 0, 0, r, r, "mirror"), g.view(1, 1, 1, -1))
    return out[0, 0]


def defocus_blur(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    radius, alias_blur = BLUR_PARAMS["defocus_blur"][severity - 1]
    kernel = _disk(radius, alias_blur, x.device)
    r = kernel.shape[-1] // 2
    xp = pad(x, r, r, r, r, "mirror")  # cv2.filter2D's default border
    return fft_filter(xp, kernel[None, None]).clamp(0, 1).to(x.dtype)


def _shuffle_once(img: torch.Tensor, delta: int, generator: Generators) -> torch.Tensor:
    """One pass of the reference's local pixel shuffle, in parallel.

    The reference visits (h, w) for h = H - delta .. delta + 1 and w = W - delta .. delta + 1 in reverse raster order
    and sets pixel (h, w) to the *current* value of (h + dy, w + dx), dx, dy ~ U{-delta, ..., delta - 1} (its
    "swap" assigns numpy views, so it copies). A source already visited carries its own new value, so the result is
    a chain of copies; we resolve every chain at once by pointer doubling (log of the longest chain gathers).
    """
    b, c, h, w = img.shape
    n = h * w
    dev = img.device
    moves = randint(-delta, delta, (b, 2, h, w), generator, dev)  # (B, 2, H, W): dy, dx
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    visited = (ys > delta) & (ys <= h - delta) & (xs > delta) & (xs <= w - delta)  # (1, H, W)
    src = (ys + moves[:, 0]) * w + (xs + moves[:, 1])  # (B, H, W) flat source index
    own = (ys * w + xs).expand(b, h, w)
    src = torch.where(visited, src, own).reshape(b, n)
    order = torch.arange(n, device=dev).expand(b, n)
    flat_visited = visited.reshape(1, n).expand(b, n)
    # Not done: the source was visited before this pixel (later in raster order), so read its final value.
    done = ~(flat_visited & torch.gather(flat_visited, 1, src) & (src > order))
    while not bool(done.all()):
        src_done = torch.gather(done, 1, src)
        src = torch.where(done, src, torch.gather(src, 1, src))
        done = done | src_done
    idx = src[:, None, :].expand(b, c, n)
    return torch.gather(img.reshape(b, c, n), 2, idx).reshape(b, c, h, w)


def glass_blur(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    sigma, delta, iterations = BLUR_PARAMS["glass_blur"][severity - 1]
    y = torch.floor(gaussian_filter(x, sigma) * 255) / 255  # the reference rounds down to uint8 here
    for _ in range(iterations):
        y = _shuffle_once(y, delta, generator)
    return gaussian_filter(y, sigma).clamp(0, 1)


def motion_blur(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    radius, sigma = BLUR_PARAMS["motion_blur"][severity - 1]
    angle = rand((x.shape[0],), generator, x.device) * 90 - 45  # (B,)
    offsets, weights = motion_taps(angle, radius, sigma, x.shape[-2:])
    return shift_accumulate(x, offsets, weights).clamp(0, 1)


def zoom_blur(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    count, step = BLUR_PARAMS["zoom_blur"][severity - 1]
    out = x.clone()
    for i in range(count):
        out += clipped_zoom(x, 1 + i * step)
    return (out / (count + 1)).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    sigma = BLUR_PARAMS["gaussian_blur"][severity - 1]
    return gaussian_filter(x, sigma).clamp(0, 1)
