"""The study's images: the first N Fashion-MNIST test images, the same for every part and both models."""

from __future__ import annotations

import torch
from torch import nn

from ravit.robustness.evaluate import ModelInput, image_dataset

__all__ = ["test_images"]


def test_images(model: nn.Module, limit: int) -> tuple[ModelInput, torch.Tensor, torch.Tensor]:
    """The first ``limit`` Fashion-MNIST test images at the model's input size: spec, (N, C, H, W) in [0, 1], labels."""
    spec = ModelInput.from_model(model)
    dataset = image_dataset("fashion-mnist", spec)
    n = min(limit, len(dataset))
    images, labels = zip(*(dataset[i] for i in range(n)), strict=True)
    return spec, torch.stack(images), torch.tensor(labels)
