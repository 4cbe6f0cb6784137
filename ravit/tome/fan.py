"""Token Merging (Bolya et al., ICLR 2023) on FAN-ViT and FAN-Hybrid, on the slot executor of :mod:`ravit.ats.fan`.

As in a ViT block (:mod:`ravit.tome.block`), r tokens merge between token mixing and channel processing, matched by
the keys averaged over heads, with proportional attention. What FAN adds is handled by the executor: a merged token
holds every grid position of the tokens it absorbed, so channel processing's depthwise conv reads its value at each
of them and averages its output back over them; channel attention's softmax over tokens counts a merged token as
many times as the tokens it holds (as proportional attention does for keys), and so does the class-attention head.
"""

from __future__ import annotations

import torch

from ravit.ats.fan import GridSlots, channel_forward, class_attention, dense_slots, mixing_forward
from ravit.models.fan import FAN
from ravit.tome.matching import Matching, bipartite_soft_matching, max_merges, merge_weighted

__all__ = ["fan_tome_features", "merge_slots"]


def merge_slots(slots: GridSlots, matching: Matching) -> GridSlots:
    """Slots after ``matching``: size-weighted averages, summed sizes, each grid position owned by its token's new
    slot; a merged slot's own id is the largest grid index it holds (ids serve reports only)."""
    x, size = merge_weighted(slots.x, slots.size[..., None].to(slots.x.dtype), matching)  # (B, L', C), (B, L', 1)
    B = x.shape[0]
    ids = torch.full((B, matching.num_out), -1, dtype=torch.long, device=x.device)
    ids = ids.scatter_reduce(1, matching.slots, slots.ids, reduce="amax")  # (B, L')
    return GridSlots(x, size[..., 0].to(slots.size.dtype), ids, matching.slots.gather(1, slots.owner))


def fan_tome_features(model: FAN, images: torch.Tensor) -> torch.Tensor:
    """``forward_features`` of a FAN with ToMe: (B, 1 + L', C), the class token first."""
    cfg = model.tome_config
    x, hw = model._embed(images)  # (B, G, C) on an (H, W) grid; FAN checks the images
    slots = dense_slots(x)
    for block, r in zip(model.blocks, cfg.r, strict=True):
        slots, k = mixing_forward(block, slots, hw, proportional=cfg.prop_attn)  # k: (B, H, L, D)
        r = min(r, max_merges(slots.x.shape[1]))
        if r > 0:
            slots = merge_slots(slots, bipartite_soft_matching(k.mean(dim=1), r))
        slots = channel_forward(block, slots, hw, proportional=cfg.prop_attn)
    return class_attention(model, slots, proportional=cfg.prop_attn)
