"""Noise corruptions of ImageNet-C (Hendrycks & Dietterich, ICLR 2019, Sec. 3), batched in torch.

Severity parameters are the published ones (``imagecorruptions`` / ``make_imagenet_c.py``). Every function takes
a float tensor (B, C, H, W) in [0, 1] and returns one of the same shape, dtype and range. Noise is drawn
independently per pixel and channel, as the reference does on an H x W x 3 array.
"""

from __future__ import annotations

import torch

from ravit.robustness._ops import Generators, poisson, rand, randn

__all__ = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "NOISE_PARAMS"]

NOISE_PARAMS = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # std of additive N(0, c)
    "shot_noise": (60, 25, 12, 5, 3),  # photons per unit intensity: Poisson(x c) / c
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),  # salt-and-pepper fraction, half salt
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),  # std of multiplicative N(0, c)
}


def gaussian_noise(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    c = NOISE_PARAMS["gaussian_noise"][severity - 1]
    return (x + c * randn(x.shape, generator, x.device).to(x.dtype)).clamp(0, 1)


def shot_noise(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    c = NOISE_PARAMS["shot_noise"][severity - 1]
    return (poisson(x.float() * c, generator).to(x.dtype) / c).clamp(0, 1)


def impulse_noise(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    # skimage.util.random_noise(mode='s&p'): a fraction c of the values flips, each to 1 or 0 with equal odds.
    c = NOISE_PARAMS["impulse_noise"][severity - 1]
    flip = rand(x.shape, generator, x.device) < c
    salt = rand(x.shape, generator, x.device) < 0.5
    return torch.where(flip, salt.to(x.dtype), x)


def speckle_noise(x: torch.Tensor, severity: int = 1, generator: Generators = None) -> torch.Tensor:
    c = NOISE_PARAMS["speckle_noise"][severity - 1]
    return (x + x * c * randn(x.shape, generator, x.device).to(x.dtype)).clamp(0, 1)
