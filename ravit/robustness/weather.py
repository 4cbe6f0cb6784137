"""Weather corruptions of ImageNet-C (Hendrycks & Dietterich, ICLR 2019, Sec. 3): snow, frost, fog, brightness and
the extra ``spatter``, batched in torch.

Parameters are the published ones as implemented by ``imagecorruptions``. Each function maps a float tensor
(B, C, H, W) in [0, 1] to the same shape, dtype and range; randomness comes only from ``generator``. Colour effects
(snow's greying, spatter's colours) are computed on RGB; a one-channel image is treated as R = G = B and its
result is the luma of the RGB result.

Frost overlays photographs of frost. ImageNet-C picks one of five (``frost1.png`` ... ``frost5.jpg``; the sixth is
never used there). We read them at run time from an installed ``imagecorruptions`` or ``imagecorruptions-imaug``
package (found without importing it) or from ``$RAVIT_FROST_DIR``; without either, we synthesise five frost-like
textures (see ``synthetic_frost``) and say so once with a warning, so results are then not comparable to
ImageNet-C's frost.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ravit.errors import InvalidArgumentError
from ravit.robustness._ops import (
    Generators,
    clipped_zoom,
    gaussian_filter,
    luma,
    motion_taps,
    pad,
    rand,
    randint,
    randn,
    shift_accumulate,
)

__all__ = ["snow", "frost", "fog", "brightness", "spatter", "plasma_fractal", "frost_textures", "WEATHER_PARAMS"]

WEATHER_PARAMS = {
    # snow layer ~ N(mean, std), zoom, threshold, motion radius, motion sigma, weight kept by the greyed image
    "snow": (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ),
    "frost": ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),  # image weight, frost weight
    "fog": ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),  # fog strength, plasma wibble decay
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # added to HSV value
    # liquid ~ N(mean, std), blur sigma, threshold, intensity (water) or mask blur sigma (mud), 0 water / 1 mud
    "spatter": (
        (0.65, 0.3, 4, 0.69, 0.6, 0),
        (0.65, 0.3, 3, 0.68, 0.6, 0),
        (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1),
        (0.67, 0.4, 1, 0.65, 1.5, 1),
    ),
}

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
_WATER = (175 / 255, 238 / 255, 238 / 255)  # pale turquoise, in the image's channel order as in the reference
_MUD = (63 / 255, 42 / 255, 20 / 255)


def _as_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _like(rgb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return luma(rgb) if x.shape[1] == 1 else rgb


def plasma_fractal(
    batch: int, mapsize: int, wibbledecay: float, generator: Generators, device: torch.device
) -> torch.Tensor:
    """(B, mapsize, mapsize) diamond-square height maps in [0, 1], as the reference's ``plasma_fractal``.

    ``mapsize`` must be a power of two. Each level adds U(-w, w) * w to the mean of its neighbours (periodic), with
    w = 100 divided by ``wibbledecay`` per level; the loop runs over the log2(mapsize) levels, not over pixels.
    """
    if mapsize & (mapsize - 1):
        raise InvalidArgumentError(f"mapsize must be a power of two, got {mapsize}")
    a = torch.zeros(batch, mapsize, mapsize, dtype=torch.float32, device=device)
    step, wibble = mapsize, 100.0

    def wibbled(t: torch.Tensor) -> torch.Tensor:
        return t / 4 + wibble * (rand(t.shape, generator, device) * 2 - 1) * wibble

    while step >= 2:
        half = step // 2
        corners = a[:, 0::step, 0::step]
        squares = corners + corners.roll(-1, 1)
        squares = squares + squares.roll(-1, 2)
        a[:, half::step, half::step] = wibbled(squares)
        centres = a[:, half::step, half::step]
        corners = a[:, 0::step, 0::step]
        a[:, 0::step, half::step] = wibbled(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        a[:, half::step, 0::step] = wibbled(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step //= 2
        wibble /= wibbledecay
    a = a - a.amin((1, 2), keepdim=True)
    return a / a.amax((1, 2), keepdim=True).clamp(min=1e-12)  # a constant map (mapsize 1) is all zeros, not NaN


def snow(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    mean, std, zoom, threshold, radius, sigma, keep = WEATHER_PARAMS["snow"][severity - 1]
    b, _, h, w = x.shape
    layer = randn((b, 1, h, w), generator, x.device) * std + mean  # (B, 1, H, W)
    layer = clipped_zoom(layer, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer).clamp(0, 1)
    angle = rand((b,), generator, x.device) * 90 - 135
    offsets, weights = motion_taps(angle, radius, sigma, (h, w))
    layer = torch.round(shift_accumulate(layer, offsets, weights) * 255) / 255
    rgb = _as_rgb(x.float())
    grey = luma(rgb) if x.shape[1] == 3 else x.float()
    rgb = keep * rgb + (1 - keep) * torch.maximum(rgb, grey * 1.5 + 0.5)
    out = rgb + layer + layer.flip(-2, -1)
    return _like(out.clamp(0, 1), x).clamp(0, 1).to(x.dtype)


def _frost_dir() -> Path | None:
    env = os.environ.get("RAVIT_FROST_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "frost"
    return folder if all((folder / f).is_file() for f in FROST_FILES) else None


# Mean and standard deviation of the five ImageNet-C frost photographs (RGB in [0, 1]), for the stand-ins.
_FROST_STATS = ((0.51, 0.17), (0.81, 0.09), (0.81, 0.09), (0.60, 0.12), (0.48, 0.17))


def synthetic_frost(index: int) -> torch.Tensor:
    """A deterministic frost-like RGB texture (3, 512, 768) in [0, 1], a stand-in for photograph ``index``.

    Ice crystals: a plasma-fractal haze plus bright streaks (motion-blurred sparse seeds at four angles), tinted
    slightly blue and scaled to the mean and contrast of the photograph it replaces.
    """
    gen = torch.Generator().manual_seed(1000 + index)
    haze = plasma_fractal(1, 1024, 1.6, gen, torch.device("cpu"))[:, None, :512, :768]  # (1, 1, 512, 768)
    seeds = (torch.rand(1, 1, 512, 768, generator=gen) < 0.004).float()
    streaks = torch.zeros_like(seeds)
    for angle in torch.rand(4, generator=gen) * 180:
        offsets, weights = motion_taps(angle.view(1), 12, 6.0, (512, 768))
        streaks = streaks + shift_accumulate(seeds, offsets, weights)
    streaks = (streaks.clamp(min=0) / streaks.amax()).sqrt()
    grey = 0.6 * haze + streaks
    mean, std = _FROST_STATS[index]
    grey = (grey - grey.mean()) / grey.std() * std + mean
    tint = torch.tensor([0.96, 0.99, 1.03]).view(1, 3, 1, 1)
    return (grey * tint).clamp(0, 1)[0]


@functools.lru_cache(maxsize=4)
def frost_textures() -> tuple[torch.Tensor, ...]:
    """The five ImageNet-C frost textures as float RGB (3, h, w) in [0, 1] (synthetic ones if not installed)."""
    folder = _frost_dir()
    if folder is None:
        warnings.warn(
            "frost photographs not found (pip install imagecorruptions-imaug, or set RAVIT_FROST_DIR): using "
            "synthetic frost textures, not comparable to ImageNet-C",
            stacklevel=2,
        )
        return tuple(synthetic_frost(i) for i in range(len(FROST_FILES)))
    out = []
    for name in FROST_FILES:
        with Image.open(folder / name) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        out.append(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _scaled_texture(index: int, h: int, w: int) -> torch.Tensor:
    # The reference scales the texture so it covers the image (if needed), then by 1.1, with bicubic resampling.
    tex = frost_textures()[index]
    th, tw = tex.shape[-2:]
    scale = max(h / th, w / tw, 1.0) * 1.1
    size = (math.ceil(th * scale), math.ceil(tw * scale))
    return F.interpolate(tex[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)


def frost(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    image_weight, frost_weight = WEATHER_PARAMS["frost"][severity - 1]
    b, _, h, w = x.shape
    which = randint(0, len(FROST_FILES), (b,), generator, x.device)
    u = rand((b, 2), generator, x.device)
    layer = torch.empty(b, 3, h, w, dtype=torch.float32, device=x.device)
    for i in range(len(FROST_FILES)):
        sel = (which == i).nonzero().flatten()
        if sel.numel() == 0:
            continue
        tex = _scaled_texture(i, h, w).to(x.device)
        top = (u[sel, 0] * (tex.shape[1] - h)).long()  # crop corner ~ U{0, ..., size - image - 1}
        left = (u[sel, 1] * (tex.shape[2] - w)).long()
        rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (n, 1, H, 1)
        cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (n, 1, 1, W)
        layer[sel] = tex[torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
    out = image_weight * x.float() + frost_weight * _like(layer, x)
    return out.clamp(0, 1).to(x.dtype)


def fog(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    strength, decay = WEATHER_PARAMS["fog"][severity - 1]
    b, _, h, w = x.shape
    mapsize = 1 << (max(h, w, 2) - 1).bit_length()  # at least 2 x 2, so a 1 x 1 image gets random fog too
    haze = plasma_fractal(b, mapsize, decay, generator, x.device)[:, None, :h, :w]  # (B, 1, H, W)
    peak = x.float().amax((1, 2, 3), keepdim=True)
    out = (x.float() + strength * haze) * peak / (peak + strength)
    return out.clamp(0, 1).to(x.dtype)


def brightness(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    # Adding c to HSV value keeps hue and saturation: every channel scales by v' / v (a black pixel becomes grey v').
    c = WEATHER_PARAMS["brightness"][severity - 1]
    v = x.amax(1, keepdim=True)
    v_new = (v + c).clamp(0, 1)
    scaled = x * (v_new / torch.where(v > 0, v, torch.ones_like(v)))
    return torch.where(v > 0, scaled, v_new.expand_as(x)).clamp(0, 1)


def _conv3x3(t: torch.Tensor, kernel: tuple[tuple[float, ...], ...], mode: str) -> torch.Tensor:
    """3x3 correlation of (B, 1, H, W) with a constant kernel as a sum of shifted slices (a one-channel ``conv2d``
    on CPU is several times slower), border by ``mode`` (see ``pad``)."""
    h, w = t.shape[-2:]
    tp = pad(t, 1, 1, 1, 1, mode)
    out = torch.zeros_like(t)
    for i, row in enumerate(kernel):
        for j, k in enumerate(row):
            if k:
                out = out + k * tp[..., i : i + h, j : j + w]
    return out


def _box3(t: torch.Tensor) -> torch.Tensor:
    return _conv3x3(t, ((1, 1, 1),) * 3, "mirror") / 9  # cv2.blur((3, 3)), BORDER_REFLECT_101


def _equalize_hist(t: torch.Tensor) -> torch.Tensor:
    """OpenCV's ``equalizeHist`` per image on integer-valued (B, 1, H, W) in [0, 255]."""
    b = t.shape[0]
    flat = t.reshape(b, -1).long()
    hist = torch.zeros(b, 256, dtype=torch.float32, device=t.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    cdf = hist.cumsum(1)
    first = torch.gather(hist, 1, (hist > 0).float().argmax(1, keepdim=True))  # count of the lowest value
    total = cdf[:, -1:]
    lut = torch.round((cdf - first) * 255 / (total - first).clamp(min=1)).clamp(0, 255)
    return torch.gather(lut, 1, flat).reshape(t.shape)


def _shifted(t: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """``out[y, x] = t[y + dy, x + dx]``, ``fill`` outside the image."""
    h, w = t.shape[-2:]
    p = max(abs(dy), abs(dx))
    tp = F.pad(t, (p, p, p, p), value=fill)
    return tp[..., p + dy : p + dy + h, p + dx : p + dx + w]


def _canny(img: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """OpenCV's ``Canny`` (3x3 Sobel, L1 magnitude) on (B, 1, H, W) 8-bit values: bool edge map.

    Written here because neither torch nor timm has it: Sobel gradients (replicated border), non-maximum
    suppression along the gradient direction quantised to 0/45/90/135 degrees with OpenCV's tie rules, then
    hysteresis (weak edges kept when 8-connected to a strong one).
    """
    gx = _conv3x3(img, ((-1, 0, 1), (-2, 0, 2), (-1, 0, 1)), "nearest")
    gy = _conv3x3(img, ((-1, -2, -1), (0, 0, 0), (1, 2, 1)), "nearest")
    mag = gx.abs() + gy.abs()
    ax, ay = gx.abs(), gy.abs()
    tan22 = ax * 0.41421356237309503
    horizontal = ay < tan22
    vertical = ay > tan22 + 2 * ax
    s = torch.where(gx * gy < 0, -1, 1)
    keep_h = (mag > _shifted(mag, 0, -1, 0)) & (mag >= _shifted(mag, 0, 1, 0))
    keep_v = (mag > _shifted(mag, -1, 0, 0)) & (mag >= _shifted(mag, 1, 0, 0))
    keep_d = torch.where(
        s > 0,
        (mag > _shifted(mag, -1, -1, 0)) & (mag > _shifted(mag, 1, 1, 0)),
        (mag > _shifted(mag, -1, 1, 0)) & (mag > _shifted(mag, 1, -1, 0)),
    )
    keep = torch.where(horizontal, keep_h, torch.where(vertical, keep_v, keep_d))
    candidate = (mag > low) & keep
    edges = candidate & (mag > high)
    while True:
        grown = candidate & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if bool((grown == edges).all()):
            return edges
        edges = grown


def _distance_to(edges: torch.Tensor, cap: float) -> torch.Tensor:
    """OpenCV's ``distanceTransform(DIST_L2, 5)`` to the nearest edge, capped at ``cap``: the 5x5 chamfer metric
    (steps 1, 1.4, 2.1969) relaxed in parallel until stable instead of OpenCV's two sequential raster passes."""
    cost = {1: 1.0, 2: 1.4, 5: 2.1969}  # squared step length -> chamfer cost
    steps = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if dy * dy + dx * dx in cost]
    dist = torch.where(edges, 0.0, float(cap))  # relaxing from the cap gives min(distance, cap) directly
    h, w = dist.shape[-2:]
    while True:
        padded = F.pad(dist, (2, 2, 2, 2), value=float("inf"))
        best = dist
        for dy, dx in steps:
            best = torch.minimum(best, padded[..., 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w] + cost[dy * dy + dx * dx])
        if bool((best == dist).all()):
            return dist
        dist = best


def _water_texture(liquid: torch.Tensor) -> torch.Tensor:
    """The reference's water-drop shading (B, 1, H, W) -> (B, 1, H, W), in [0, 255].

    As the reference: Canny edges of the 8-bit liquid layer, distance to them capped at 20, 3x3 blur to 8 bits,
    histogram equalisation, an emboss filter saturated to 8 bits, another 3x3 blur.
    """
    dist = _distance_to(_canny(torch.floor(liquid * 255), 50, 150), 20)
    dist = torch.floor(_box3(dist))
    dist = _equalize_hist(dist)
    dist = torch.round(_conv3x3(dist, ((-2, -1, 0), (-1, 1, 1), (0, 1, 2)), "mirror")).clamp(0, 255)
    return torch.round(_box3(dist))


def spatter(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    mean, std, sigma, threshold, intensity, mud = WEATHER_PARAMS["spatter"][severity - 1]
    b, _, h, w = x.shape
    liquid = gaussian_filter(randn((b, 1, h, w), generator, x.device) * std + mean, sigma)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)  # (B, 1, H, W)
    rgb = _as_rgb(x.float())
    if not mud:
        layer = torch.floor(liquid * 255) * _water_texture(liquid)
        layer = layer / layer.amax((2, 3), keepdim=True).clamp(min=1e-12) * intensity
        color = torch.tensor(_WATER, device=x.device).view(1, 3, 1, 1)
        out = rgb + layer * color
    else:
        m = gaussian_filter((liquid > threshold).float(), intensity)
        m = torch.where(m < 0.8, torch.zeros_like(m), m)
        color = torch.tensor(_MUD, device=x.device).view(1, 3, 1, 1)
        out = rgb * (1 - m) + color * m
    return _like(out.clamp(0, 1), x).clamp(0, 1).to(x.dtype)
