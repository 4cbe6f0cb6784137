"""``trace``: what ATS did to each image (Fayyaz et al., ECCV 2022, Sec. 4 "# tokens per stage", Fig. 5-6).

Logits, the token count and the kept patch indices after every ATS block, and the GMACs each image cost, counted
with ``FlopCounterMode`` on the image alone (GMACs = FLOPs / 2, the unit of ATS Sec. 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ravit.ats.patch import ats_forward_features, has_ats
from ravit.bench.flops import count_flops
from ravit.errors import InvalidArgumentError

__all__ = ["ATSTrace", "trace"]


@dataclass(frozen=True)
class ATSTrace:
    """Result of :func:`trace` for a batch of B images.

    logits: (B, num_classes) the model's output.
    kept_tokens: (B, S) int64 tokens leaving each of the S ATS blocks, prefix tokens included.
    kept_indices: ``kept_indices[s][b]``: int64 original patch indices (row-major on the patch grid) kept by image b
        at ATS block s, ascending.
    gmacs: (B,) float64 GMACs of each image, counted on the image alone; NaN when not counted.
    blocks: the ATS block indices, in order.
    """

    logits: torch.Tensor
    kept_tokens: torch.Tensor
    kept_indices: list[list[torch.Tensor]]
    gmacs: torch.Tensor
    blocks: tuple[int, ...]


@torch.no_grad()
def trace(model: nn.Module, images: torch.Tensor, count_gmacs: bool = True) -> ATSTrace:
    """Run an ATS model on ``images`` (B, C, H, W) and report, per image, what it kept and what it cost.

    Runs in the model's current mode (call ``model.eval()`` for inference). ``count_gmacs`` adds one batch-of-one
    forward under ``FlopCounterMode`` per distinct kept-token profile (images with equal profiles cost the same).
    An empty batch gives an empty trace, as the model gives empty logits.
    """
    if not has_ats(model):
        raise InvalidArgumentError("trace needs a model with ATS applied: call ravit.apply_ats(model, ...) first")
    record = []
    features = ats_forward_features(model, images, record)
    logits = model.forward_head(features)
    kept_tokens = torch.stack([tokens.lengths for tokens in record], dim=1).cpu()  # (B, S)
    kept_indices = []
    for tokens in record:
        rows = tokens.ids.cpu().split(tokens.lengths.tolist())  # one row of original ids per image
        kept_indices.append([row[row >= 0] for row in rows])  # drop the prefix tokens (id -1)
    if count_gmacs:
        # An image's FLOPs depend only on its token count at each ATS block: count each distinct profile once.
        counted = {}
        for image, profile in zip(images, kept_tokens.tolist(), strict=True):
            if tuple(profile) not in counted:
                counted[tuple(profile)] = count_flops(model, image[None]) / 2e9
        gmacs = torch.tensor([counted[tuple(p)] for p in kept_tokens.tolist()], dtype=torch.float64)
    else:
        gmacs = torch.full((images.shape[0],), float("nan"), dtype=torch.float64)
    return ATSTrace(logits, kept_tokens, kept_indices, gmacs, model.ats_config.blocks)
