"""Batched torch building blocks shared by the corruption families.

The ImageNet-C reference (Hendrycks & Dietterich, ICLR 2019; the ``imagecorruptions`` package) is written with
scipy / scikit-image / OpenCV, whose border modes and kernel sizes differ from torch's defaults. The helpers here
reproduce those conventions on (B, C, H, W) tensors so each corruption reads like its definition:

- ``pad`` names borders as scipy does: ``nearest`` (aaa|abcd), ``reflect`` (cba|abcd, half-sample symmetric),
  ``mirror`` (dcb|abcd, OpenCV's BORDER_REFLECT_101);
- ``gaussian_filter`` is scipy's ``gaussian_filter`` (radius ``int(truncate * sigma + 0.5)``), which
  ``skimage.filters.gaussian`` calls;
- ``rand`` / ``randn`` / ``randint`` / ``poisson`` draw on the generator's device, so a CPU generator gives the same
  numbers for CPU and CUDA images. The generator may also be a sequence with one generator per image: each image's
  draws (the first dim of the shape) then come from its own generator, so an image's corruption does not depend on
  the batch it is in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ravit.errors import InvalidArgumentError

__all__ = [
    "pad",
    "gaussian_filter",
    "filter_matrix",
    "filter_axis",
    "fft_filter",
    "clipped_zoom",
    "shift_accumulate",
    "motion_taps",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "luma",
    "rand",
    "randn",
    "randint",
    "poisson",
    "Generators",
]

# One generator for the whole batch, or one per image (a sequence as long as the batch); None: torch's global one.
Generators = torch.Generator | Sequence[torch.Generator] | None


def _per_image(draw, shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """``draw(shape, gen, src_device)`` once for the batch, or once per image with each image's own generator."""
    if generator is None or isinstance(generator, torch.Generator):
        src = generator.device if generator is not None else device
        return draw(shape, generator, src).to(device)
    if len(generator) != shape[0]:
        raise InvalidArgumentError(f"got {len(generator)} generators for a batch of {shape[0]} images")
    return torch.stack([draw(shape[1:], g, g.device).to(device) for g in generator])


def rand(shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float32 samples drawn on the generator's device, returned on ``device``."""
    return _per_image(lambda s, g, d: torch.rand(s, generator=g, device=d), shape, generator, device)


def randn(shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """Standard normal float32 samples drawn on the generator's device, returned on ``device``."""
    return _per_image(lambda s, g, d: torch.randn(s, generator=g, device=d), shape, generator, device)


def randint(low: int, high: int, shape: tuple[int, ...], generator: Generators, device: torch.device) -> torch.Tensor:
    """Integers in [low, high) drawn on the generator's device, returned on ``device`` (int64)."""
    return _per_image(lambda s, g, d: torch.randint(low, high, s, generator=g, device=d), shape, generator, device)


def poisson(rate: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Poisson samples (B, ...) of float ``rate`` (B, ...), drawn on the generator's device, returned on the rate's."""
    if generator is None or isinstance(generator, torch.Generator):
        src = generator.device if generator is not None else rate.device
        return torch.poisson(rate.to(src), generator=generator).to(rate.device)
    if len(generator) != rate.shape[0]:
        raise InvalidArgumentError(f"got {len(generator)} generators for a batch of {rate.shape[0]} images")
    draws = [torch.poisson(r.to(g.device), generator=g).to(rate.device) for r, g in zip(rate, generator, strict=True)]
    return torch.stack(draws)


def _index(n: int, before: int, after: int, mode: str, device: torch.device) -> torch.Tensor:
    i = torch.arange(-before, n + after, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    if mode == "reflect":  # half-sample symmetric; period 2n
        i = i.remainder(2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    if mode == "mirror":  # whole-sample symmetric; period 2n - 2
        if n == 1:
            return torch.zeros_like(i)
        i = i.remainder(2 * n - 2)
        return torch.where(i >= n, 2 * n - 2 - i, i)
    raise InvalidArgumentError(f"unknown border mode {mode!r}; expected 'nearest', 'reflect' or 'mirror'")


def pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int, mode: str) -> torch.Tensor:
    """Pad the last two dims with scipy's border ``mode``; works for pads larger than the image (unlike F.pad)."""
    h, w = x.shape[-2:]
    rows = _index(h, top, bottom, mode, x.device)
    cols = _index(w, left, right, mode, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _gaussian_kernel1d(sigma: float, truncate: float, device: torch.device) -> torch.Tensor:
    radius = int(truncate * float(sigma) + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def filter_matrix(kernel: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """(n, n) matrix applying the odd 1-D ``kernel`` (correlation) along an axis of length n, border included.

    Blurs run as two matmuls with these banded matrices: on CPU that beats ``conv2d`` with a one-channel (k, 1)
    kernel by several times for the kernel sizes ImageNet-C uses (up to 49 taps), and borders cost nothing extra.
    """
    r = kernel.numel() // 2
    src = _index(n, r, r, mode, kernel.device)  # padded position -> source index
    out = torch.arange(n, device=kernel.device)[:, None] + torch.arange(2 * r + 1, device=kernel.device)[None]
    m = torch.zeros(n, n, dtype=kernel.dtype, device=kernel.device)
    rows = torch.arange(n, device=kernel.device)[:, None].expand(n, 2 * r + 1)
    m.index_put_((rows, src[out]), kernel.expand(n, -1), accumulate=True)
    return m


def gaussian_filter(
    x: torch.Tensor, sigma: float | tuple[float, float], mode: str = "nearest", truncate: float = 4.0
) -> torch.Tensor:
    """Separable Gaussian blur of (..., H, W) over H and W, as ``scipy.ndimage.gaussian_filter``."""
    sy, sx = (sigma, sigma) if isinstance(sigma, (int, float)) else sigma
    out = x
    for dim, s in ((-2, sy), (-1, sx)):
        if s > 0:
            out = filter_axis(out, _gaussian_kernel1d(s, truncate, x.device), dim, mode)
    return out


def filter_axis(x: torch.Tensor, kernel: torch.Tensor, dim: int, mode: str) -> torch.Tensor:
    """Correlate the last-two-dims axis ``dim`` (-2 or -1) of ``x`` with an odd 1-D ``kernel``, border ``mode``.

    Short kernels are a sum of shifted slices of the padded tensor; long ones (> 17 taps) a matmul with a banded
    matrix (``filter_matrix``), which on CPU beats ``conv2d`` with a one-channel kernel by several times.
    """
    n = x.shape[dim]
    k = kernel.to(x.dtype)
    r = k.numel() // 2
    if k.numel() > 17:
        m = filter_matrix(kernel, n, mode).to(x.dtype)
        return m @ x if dim == -2 else x @ m.T
    xp = x.index_select(dim, _index(n, r, r, mode, x.device))
    out = k[0] * xp.narrow(dim, 0, n)
    for i in range(1, k.numel()):
        out = out + k[i] * xp.narrow(dim, i, n)
    return out


def _fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (pocketfft is fastest on such sizes)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def fft_filter(xp: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Valid convolution of padded images (B, C, Hp, Wp) with kernels (B or 1, 1, k, k), computed by FFT.

    Returns (B, C, Hp - k + 1, Wp - k + 1) with ``out[y, x] = sum_ij kernel[i, j] xp[y + k - 1 - i, x + k - 1 - j]``
    (for symmetric kernels, the same as correlation). Large kernels (defocus up to 21 x 21, motion up to 81 x 81)
    cost a fixed few FFTs instead of k^2 multiply-adds per pixel.
    """
    hp, wp = xp.shape[-2:]
    k = kernel.shape[-1]
    fh, fw = _fft_size(hp), _fft_size(wp)
    # One image at a time: a batched FFT rounds differently from a single one (SIMD over the batch), and an image's
    # result must not depend on its batch. On CPU this is no slower.
    shared = torch.fft.rfft2(kernel.float(), s=(fh, fw)) if kernel.shape[0] == 1 else None  # (1, 1, fh, fw/2+1)
    out = []
    for i in range(xp.shape[0]):
        kernel_f = shared if shared is not None else torch.fft.rfft2(kernel[i : i + 1].float(), s=(fh, fw))
        spec = torch.fft.rfft2(xp[i : i + 1].float(), s=(fh, fw)) * kernel_f
        out.append(torch.fft.irfft2(spec, s=(fh, fw))[..., k - 1 : hp, k - 1 : wp])
    return torch.cat(out).to(xp.dtype)


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Zoom into the centre of (B, C, H, W) by ``zoom`` and crop back to H x W.

    Same geometry as the reference's ``clipped_zoom``: crop the central ``ceil(H / zoom)`` rows (top at
    ``(H - ch) // 2``), resize with ``scipy.ndimage.zoom(order=1)`` to ``round(ch * zoom)`` (corner-aligned linear
    interpolation, i.e. ``align_corners=True``), keep the first H x W. If the zoomed crop is smaller than the image
    (tiny images only) it is zero-padded at the bottom/right, as the reference's fallback does.
    """
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top : top + ch, left : left + cw]
    oh, ow = int(round(ch * zoom)), int(round(cw * zoom))
    out = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=True)[..., :h, :w]
    if out.shape[-2:] != (h, w):
        out = F.pad(out, (0, w - out.shape[-1], 0, h - out.shape[-2]))
    return out


def motion_taps(
    angle_deg: torch.Tensor, radius: int, sigma: float, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets (B, T, 2) as (dy, dx) and weights (B, T) of the reference's numpy motion blur (a Wand port).

    Tap i has Gaussian weight ``exp(-i^2 / 2 sigma^2)`` (normalised over ``2 radius + 1`` taps) and moves
    ``-ceil(i * (sin, cos)(angle) - 0.5)`` pixels. Like the reference, taps from the first one that leaves the
    image onwards are dropped without renormalising.
    """
    width = 2 * radius + 1
    i = torch.arange(width, dtype=torch.float64, device=angle_deg.device)
    k = torch.exp(-(i**2) / (2 * sigma**2))
    k = k / k.sum()
    rad = torch.deg2rad(angle_deg.double())[:, None]  # (B, 1)
    dy = -torch.ceil(i * torch.sin(rad) - 0.5)  # (B, T)
    dx = -torch.ceil(i * torch.cos(rad) - 0.5)
    outside = (dy.abs() >= size[0]) | (dx.abs() >= size[1])
    keep = torch.cumsum(outside.int(), dim=1) == 0
    weights = k[None] * keep
    return torch.stack([dy, dx], dim=-1).long(), weights.float()


def shift_accumulate(x: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_t weights[b, t] * x[b]`` shifted by ``offsets[b, t] = (dy, dx)`` with edge replication.

    The per-image sparse kernel is applied as an FFT convolution of each edge-padded image: the taps differ per
    image, so a dense ``conv2d`` would need one (up to 81 x 81) kernel per image.
    """
    b, t = offsets.shape[:2]
    # Pad by the largest shift any image could get (T - 1 taps away, less than the image), not the largest drawn in
    # this batch: the FFT size, hence each image's rounding, must not depend on the other images of the batch.
    p = min(t - 1, max(x.shape[-2:]) - 1) if t else 0
    size = 2 * p + 1
    kernel = torch.zeros(b, size * size, dtype=torch.float32, device=x.device)
    off = offsets.clamp(-p, p)  # taps shifted out of the image carry weight 0 (see ``motion_taps``)
    flat = (off[..., 0] + p) * size + (off[..., 1] + p)  # (B, T)
    kernel.scatter_add_(1, flat, weights)
    # Convolution kernel: weight of shift d at (p + d); output (y, x) reads xp[y + p - dy, x + p - dx] = x[y - d].
    return fft_filter(pad(x, p, p, p, p, "nearest"), kernel.view(b, 1, size, size)).to(x.dtype)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) in [0, 1] to HSV, as ``skimage.color.rgb2hsv`` (hue in [0, 1), blue wins ties)."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    delta = v - x.amin(1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(delta > 0, delta / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    h = (g - b) / safe
    h = torch.where(g == v, 2.0 + (b - r) / safe, h)
    h = torch.where(b == v, 4.0 + (r - g) / safe, h)
    h = torch.where(delta > 0, (h / 6.0).remainder(1.0), torch.zeros_like(h))
    return torch.stack([h, s, v], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV (B, 3, H, W) to RGB, as ``skimage.color.hsv2rgb`` (closed form of the six-sector table)."""
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hsv.dtype, device=hsv.device).view(1, 3, 1, 1)
    k = (n + h * 6.0).remainder(6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (B, 1, H, W) of RGB (B, 3, H, W), as OpenCV's RGB2GRAY."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)
