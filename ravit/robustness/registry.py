"""The 19 ImageNet-C corruptions by name, and ``corrupt``, the one entry point (Hendrycks & Dietterich, ICLR 2019).

``BENCHMARK_CORRUPTIONS`` are the 15 of the benchmark (and of mCE), in the published order; ``EXTRA_CORRUPTIONS``
the 4 held-out "extra" ones (speckle noise, Gaussian blur, spatter, saturate). Folder names of an ImageNet-C
download are these names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch

from ravit.errors import InvalidArgumentError
from ravit.robustness._ops import Generators
from ravit.robustness.blur import defocus_blur, gaussian_blur, glass_blur, motion_blur, zoom_blur
from ravit.robustness.digital import contrast, elastic_transform, jpeg_compression, pixelate, saturate
from ravit.robustness.noise import gaussian_noise, impulse_noise, shot_noise, speckle_noise
from ravit.robustness.weather import brightness, fog, frost, snow, spatter

__all__ = [
    "CORRUPTIONS",
    "BENCHMARK_CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "ALL_CORRUPTIONS",
    "CORRUPTION_FAMILIES",
    "SEVERITIES",
    "corrupt",
    "check_corruption",
    "resolve_corruptions",
    "image_generators",
]

Corruption = Callable[[torch.Tensor, int, Generators], torch.Tensor]

CORRUPTIONS: dict[str, Corruption] = {
    f.__name__: f
    for f in (
        gaussian_noise,
        shot_noise,
        impulse_noise,
        defocus_blur,
        glass_blur,
        motion_blur,
        zoom_blur,
        snow,
        frost,
        fog,
        brightness,
        contrast,
        elastic_transform,
        pixelate,
        jpeg_compression,
        speckle_noise,
        gaussian_blur,
        spatter,
        saturate,
    )
}
ALL_CORRUPTIONS: tuple[str, ...] = tuple(CORRUPTIONS)
BENCHMARK_CORRUPTIONS: tuple[str, ...] = ALL_CORRUPTIONS[:15]
EXTRA_CORRUPTIONS: tuple[str, ...] = ALL_CORRUPTIONS[15:]
CORRUPTION_FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("snow", "frost", "fog", "brightness", "spatter"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate"),
}
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


def check_corruption(name: str, severity: int) -> None:
    """Raise ``ValueError`` listing the valid choices if ``name`` or ``severity`` is not one of them."""
    if name not in CORRUPTIONS:
        raise InvalidArgumentError(f"unknown corruption {name!r}; valid names: {', '.join(ALL_CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise InvalidArgumentError(
            f"unknown severity {severity!r}; valid severities: {', '.join(map(str, SEVERITIES))}")


def resolve_corruptions(spec: str | list[str] | None) -> list[str]:
    """Names from a list or comma-separated string of names and groups: 'all' (19), 'benchmark' (15), 'extra' (4),
    or a family ('noise', 'blur', 'weather', 'digital'). ``None`` means all 19; a spec naming nothing (``''``,
    ``','``) is an error, never "all"."""
    if spec is None:
        return list(ALL_CORRUPTIONS)
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    groups = {"all": ALL_CORRUPTIONS, "benchmark": BENCHMARK_CORRUPTIONS, "extra": EXTRA_CORRUPTIONS}
    groups.update(CORRUPTION_FAMILIES)
    out: list[str] = []
    for item in (i.strip() for i in items if i.strip()):
        if item in groups:
            out += [n for n in groups[item] if n not in out]
        elif item in CORRUPTIONS:
            out += [item] if item not in out else []
        else:
            raise InvalidArgumentError(
                f"unknown corruption {item!r}; valid names: {', '.join(ALL_CORRUPTIONS)}; "
                f"groups: {', '.join(groups)}"
            )
    if not out:
        raise InvalidArgumentError(
            f"no corruption named in {spec!r}; give names or groups (all, benchmark, extra, noise, blur, weather, "
            "digital)"
        )
    return out


def image_generators(
    seed: int, indices: Iterable[int], name: str, severity: int, device: str | torch.device = "cpu"
) -> list[torch.Generator]:
    """One generator per image, seeded from (seed, image index in the dataset, corruption, severity).

    Passed to ``corrupt``, they make each image's corruption a function of the image, its index and the seed only:
    the same whatever the batch size, the batch the image falls in or the number of processes sharing the data.
    """
    out = []
    for i in indices:
        digest = hashlib.blake2b(repr((int(seed), int(i), name, int(severity))).encode(), digest_size=8).digest()
        out.append(torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1))
    return out


def corrupt(images: torch.Tensor, name: str, severity: int, generator: Generators = None) -> torch.Tensor:
    """Apply ImageNet-C corruption ``name`` at ``severity`` (1-5) to a batch.

    Args:
        images: float tensor (B, C, H, W) with C in {1, 3} and values in [0, 1], on any device; any H, W.
        name: one of ``ALL_CORRUPTIONS``.
        severity: 1 to 5, with the published ImageNet-C parameters.
        generator: the only source of randomness; the same seed gives the same output. One generator draws for the
            whole batch (so an image's result depends on its batch); a sequence of B generators, one per image (see
            ``image_generators``), draws each image's randomness from its own, batch-independent generator.

    Returns:
        The corrupted batch: same shape, dtype and device, values in [0, 1].
    """
    check_corruption(name, severity)
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise InvalidArgumentError(f"expected images of shape (B, C, H, W) with C = 1 or 3, got {shape}")
    if not images.is_floating_point():
        raise InvalidArgumentError(f"expected a float tensor in [0, 1], got dtype {images.dtype}")
    if images.numel() == 0:
        return images.clone()
    lo, hi = images.aminmax()
    if lo < 0 or hi > 1 or torch.isnan(lo) or torch.isnan(hi):
        raise InvalidArgumentError(f"images must lie in [0, 1], got values in [{lo.item():.4g}, {hi.item():.4g}]")
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    out = CORRUPTIONS[name](x, severity, generator)
    return out.to(images.dtype)
