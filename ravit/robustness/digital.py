"""Digital corruptions of ImageNet-C (Hendrycks & Dietterich, ICLR 2019, Sec. 3): contrast, elastic transform,
pixelate, JPEG compression and the extra ``saturate``, batched in torch.

Parameters are the published ones as implemented by ``imagecorruptions`` (its elastic transform is the smooth
random displacement field without the original's affine step, kept here). Each function maps a float tensor
(B, C, H, W) in [0, 1] to the same shape, dtype and range; randomness comes only from ``generator``.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ravit.robustness._ops import Generators, gaussian_filter, hsv_to_rgb, luma, rand, rgb_to_hsv

__all__ = ["contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate", "DIGITAL_PARAMS"]

DIGITAL_PARAMS = {
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # scale of the deviation from each channel's mean
    "elastic_transform": (12.5, 16.25, 21.25, 25.0, 30.0),  # alpha = 250 * (0.05, 0.065, 0.085, 0.1, 0.12)
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),  # down-sampling factor
    "jpeg_compression": (25, 18, 15, 10, 7),  # JPEG quality
    "saturate": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),  # HSV saturation * a + b
}


def contrast(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    c = DIGITAL_PARAMS["contrast"][severity - 1]
    mean = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
    return ((x - mean) * c + mean).clamp(0, 1)


def elastic_transform(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    alpha = DIGITAL_PARAMS["elastic_transform"][severity - 1]
    b, c, h, w = x.shape
    sigma = (h * 0.01, w * 0.01)
    max_d = h * 0.005  # the reference uses the height for both axes
    noise = (rand((b, 2, h, w), generator, x.device) * 2 - 1) * max_d  # (B, 2, H, W): dy, dx
    disp = gaussian_filter(noise, sigma, mode="reflect", truncate=3.0) * alpha
    ys = torch.arange(h, device=x.device, dtype=torch.float32).view(1, h, 1) + disp[:, 0]  # (B, H, W)
    xs = torch.arange(w, device=x.device, dtype=torch.float32).view(1, 1, w) + disp[:, 1]
    # scipy's map_coordinates(order=1, mode='reflect') is bilinear sampling with a half-sample symmetric border:
    # grid_sample with reflection padding about the image edges (align_corners=False).
    grid = torch.stack([(2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1], dim=-1)  # (B, H, W, 2) as (x, y)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.clamp(0, 1).to(x.dtype)


def _box_ranges(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's BOX down-sampling footprints: output i averages inputs [lo_i, hi_i), the pixels whose centres fall
    in ``(centre_i - scale / 2, centre_i + scale / 2]``."""
    scale = n_in / n_out
    centre = (torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * scale
    pos = torch.arange(n_in, device=device, dtype=torch.float64) + 0.5
    d = (pos[None, :] - centre[:, None]) / max(scale, 1.0)
    inside = (d > -0.5) & (d <= 0.5)  # (n_out, n_in), contiguous runs
    lo = inside.int().argmax(1)
    return lo, lo + inside.sum(1)


def pixelate(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    c = DIGITAL_PARAMS["pixelate"][severity - 1]
    h, w = x.shape[-2:]
    sh, sw = max(int(h * c), 1), max(int(w * c), 1)
    small = x.float()
    for dim, n_out in ((-2, sh), (-1, sw)):  # box sums from prefix sums, one axis at a time
        lo, hi = _box_ranges(small.shape[dim], n_out, x.device)
        prefix = F.pad(small.cumsum(dim), (1, 0) if dim == -1 else (0, 0, 1, 0))
        count = (hi - lo).float().view(-1, 1) if dim == -2 else (hi - lo).float()
        small = (prefix.index_select(dim, hi) - prefix.index_select(dim, lo)) / count  # (B, C, sh, ...)
    # Pillow's NEAREST up-sampling reads source pixel floor((i + 0.5) * small / big), as 'nearest-exact'.
    return F.interpolate(small, size=(h, w), mode="nearest-exact").clamp(0, 1).to(x.dtype)


def jpeg_compression(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    # A real codec rather than our own DCT: the reference saves with Pillow (libjpeg), so the same 8-bit output comes
    # from the same library, on every device: a CUDA batch makes the round trip through the CPU as uint8. nvJPEG
    # (torchvision's GPU codec) was measured 0.036 mean |delta| (9/255) away from Pillow at severity 3 on an H200, so
    # GPU results would not be comparable with ImageNet-C's; Pillow costs ~0.5 ms per 224^2 image.
    quality = DIGITAL_PARAMS["jpeg_compression"][severity - 1]
    arrays = torch.round(x * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (B, H, W, C)
    out = np.empty_like(arrays)
    for i, arr in enumerate(arrays):
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im).reshape(arr.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255


def saturate(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    scale, shift = DIGITAL_PARAMS["saturate"][severity - 1]
    rgb = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
    hsv = rgb_to_hsv(rgb)
    hsv = torch.cat([hsv[:, :1], (hsv[:, 1:2] * scale + shift).clamp(0, 1), hsv[:, 2:]], dim=1)
    out = hsv_to_rgb(hsv).clamp(0, 1)
    return (luma(out) if x.shape[1] == 1 else out).clamp(0, 1).to(x.dtype)
