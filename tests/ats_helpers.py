"""Helpers shared by the ATS test files: random models peaked enough that images keep different tokens, and the
batch-independence check."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from ravit.ats import trace


def sharpen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw ``model``'s matrices, tokens and position embeddings with std 0.2 (BEiT's relative-position tables,
    zero at init, with std 1) so attention is peaked and positions matter; returns it in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 1.0)
            elif p.ndim > 1 or "token" in name or "pos" in name:
                p.normal_(0, 0.2)
    return model.eval()


def peaky_vit(seed: int = 0, **kwargs) -> VisionTransformer:
    """A tiny ViT whose random weights are large enough that images keep different numbers of tokens."""
    cfg = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5, qkv_bias=True)
    torch.manual_seed(seed)
    return sharpen(VisionTransformer(**{**cfg, **kwargs}), seed)


def assert_batch_independent(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Each image alone keeps the same tokens at every ATS block and gets the same logits (<= 1e-5) as in the batch."""
    batched = trace(model, images, count_gmacs=False)
    for i in range(len(images)):
        alone = trace(model, images[i : i + 1], count_gmacs=False)
        assert torch.equal(alone.kept_tokens[0], batched.kept_tokens[i])
        for stage in range(len(batched.kept_indices)):
            assert torch.equal(alone.kept_indices[stage][0], batched.kept_indices[stage][i])
        torch.testing.assert_close(alone.logits[0], batched.logits[i], atol=1e-5, rtol=0)
