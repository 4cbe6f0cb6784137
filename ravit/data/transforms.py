"""Image transforms: timm's train/eval pipelines behind a channel adapter (1 <-> 3 channels).

timm's ``create_transform`` expects PIL images of the mode the model wants; Fashion-MNIST is grayscale ('L') and most
ImageFolders are RGB, so every pipeline starts by converting the PIL image to the mode that ``in_chans`` asks for
(a grayscale image is replicated to RGB; an RGB image becomes luminance, ITU-R 601-2, as PIL does it).
"""

from __future__ import annotations

from timm.data import create_transform as timm_create_transform
from torchvision import transforms

from ravit.errors import InvalidArgumentError

__all__ = ["ToChannels", "create_transform", "expand_stats"]

_MODES = {1: "L", 3: "RGB"}


class ToChannels:
    """Convert a PIL image to 1 ('L') or 3 ('RGB') channels."""

    def __init__(self, in_chans: int):
        if in_chans not in _MODES:
            raise InvalidArgumentError(f"in_chans must be 1 or 3 for image data, got {in_chans}")
        self.mode = _MODES[in_chans]

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def expand_stats(stats: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """Per-channel mean/std for ``in_chans`` channels: one value is replicated, three are averaged to one."""
    stats = tuple(float(s) for s in stats)
    if len(stats) == in_chans:
        return stats
    if len(stats) == 1:
        return stats * in_chans
    if in_chans == 1:
        return (sum(stats) / len(stats),)
    raise InvalidArgumentError(f"cannot map {len(stats)}-channel statistics to {in_chans} channels")


def create_transform(
    img_size: int | tuple[int, int],
    in_chans: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    is_training: bool = False,
    **timm_kwargs,
):
    """``ToChannels(in_chans)`` followed by ``timm.data.create_transform`` (same keyword arguments).

    ``mean``/``std`` may be given for the dataset's own channel count; they are mapped to ``in_chans``.
    """
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    pipeline = timm_create_transform(
        input_size=(in_chans, *size),
        is_training=is_training,
        mean=expand_stats(mean, in_chans),
        std=expand_stats(std, in_chans),
        **timm_kwargs,
    )
    return transforms.Compose([ToChannels(in_chans), *pipeline.transforms])
