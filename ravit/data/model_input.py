"""What a model expects as input: image size, channels, normalisation, resize-and-crop and interpolation.

Every tool that feeds images to a model (``ravit eval``, ``ats``, ``analyze``, ``robustness`` and the study) asks
:meth:`ModelInput.from_model`. The values start from timm's ``resolve_model_data_config`` (the model's pretrained
config), with ravit's rules on top:

- the model as built wins over its pretrained config: the channels are its first convolution's and the size is its
  patch embedding's, so ``img_size=28`` / ``in_chans=1`` overrides are honoured;
- weights that ``ravit train`` trained on a dataset (``trained_on``) were normalised with that dataset's statistics and
  crop, resized with timm's default (bilinear) interpolation, and seen at the dataset's native size when the model
  takes any size: the eval transform of ``ravit train``;
- statistics for another channel count are mapped to the model's (one value replicated, three averaged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data import create_transform as timm_create_transform
from timm.data import resolve_model_data_config
from torch import nn
from torchvision import transforms

from ravit.data.datasets import DatasetInfo
from ravit.data.transforms import create_transform, expand_stats

__all__ = ["ModelInput"]

# The interpolation of ``ravit train``'s eval transform: timm's ``create_transform`` default.
_TRAIN_RESIZE = "bilinear"


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _in_chans(model: nn.Module, cfg: dict) -> int:
    """Input channels of the model's first convolution: the one its pretrained config names, else the first one."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    try:
        conv = model.get_submodule(first) if isinstance(first, str) else None
    except AttributeError:
        conv = None
    if not isinstance(conv, nn.Conv2d):
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else int(cfg["input_size"][0])


def _size(model: nn.Module, cfg: dict, img_size, trained_on: DatasetInfo | None) -> tuple[int, int]:
    """Asked for, else the patch embedding's, else a fixed config size, else the training data's, else the config's."""
    if img_size is not None:
        return _pair(img_size)
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:
        return _pair(built)
    if not cfg.get("fixed_input_size") and trained_on is not None and trained_on.img_size is not None:
        return _pair(trained_on.img_size)
    return _pair(tuple(cfg["input_size"][-2:]))


@dataclass(frozen=True)
class ModelInput:
    """What the model expects: input size (H, W), channels, per-channel mean / std, the crop fraction of the resize
    before the centre crop, and the resize interpolation."""

    size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    @classmethod
    def from_model(
        cls, model: nn.Module, *, img_size: int | tuple[int, int] | None = None, trained_on: DatasetInfo | None = None
    ) -> ModelInput:
        """The input of ``model``: ``img_size`` forces a size; ``trained_on`` is the dataset its weights were trained on
        by ``ravit train`` (None: weights that follow the model's pretrained config). See the module docstring."""
        cfg = resolve_model_data_config(model)
        in_chans = _in_chans(model, cfg)
        if trained_on is not None:
            mean, std, crop_pct, interpolation = trained_on.mean, trained_on.std, trained_on.crop_pct, _TRAIN_RESIZE
        else:
            mean, std, crop_pct, interpolation = cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"]
        if interpolation == "random":  # a training-time choice; evaluation resizes one way
            interpolation = "bicubic"
        return cls(_size(model, cfg, img_size, trained_on), in_chans, expand_stats(mean, in_chans),
                   expand_stats(std, in_chans), float(crop_pct), interpolation)

    def transform(self):
        """PIL image -> normalised (in_chans, H, W) model input: channels converted, resized by ``crop_pct``,
        centre-cropped (``ravit.data.create_transform``, timm's eval pipeline)."""
        return create_transform(self.size, self.in_chans, self.mean, self.std, crop_pct=self.crop_pct,
                                interpolation=self.interpolation)

    def unit_transform(self):
        """PIL image -> (C, H, W) float in [0, 1] at the model's size, in the image's own channels (1 or 3): the resize
        and centre crop of ``transform`` without its normalisation (corruptions work in pixel space; ``normalize``
        finishes the job)."""
        pipeline = timm_create_transform(input_size=(self.in_chans, *self.size), is_training=False,
                                         crop_pct=self.crop_pct, interpolation=self.interpolation, normalize=False)
        # timm leaves uint8 when it does not normalise: / 255 as ToTensor does
        return transforms.Compose([*pipeline.transforms, transforms.ConvertImageDtype(torch.float32)])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, 1 or 3, H, W) -> normalised model input (B, in_chans, H, W); RGB becomes luminance
        (ITU-R 601-2) for a one-channel model, grey is replicated for a three-channel one."""
        if images.shape[1] != self.in_chans:
            if self.in_chans == 3:
                images = images.expand(-1, 3, -1, -1)  # (B, 3, H, W)
            else:
                w = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
                images = (images * w).sum(1, keepdim=True)  # (B, 1, H, W)
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
        return (images - mean) / std
