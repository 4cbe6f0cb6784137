"""A timm ViT block with Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, Sec. 3).

ToMe sits between the attention and the MLP of each block: after the attention residual add, r tokens merge into
their most similar partners (:mod:`ravit.tome.matching`), so the MLP and every later block run on fewer tokens.
The similarity metric is the block's attention keys averaged over heads (Sec. 3, "Token Similarity"). Attention is
proportional (Sec. 3, "Tracking Token Size", Eq. 1): a key that stands for s patches gets log(s) added to its logits,
as if it were s copies of itself.

The block's own children do the work (``norm1``, ``attn.qkv``, ``attn.q_norm``/``k_norm``, ``attn.norm``,
``attn.gate``, ``attn.proj``, ``attn.proj_drop``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``);
nothing is copied or registered. Token sizes are passed from block to block by the caller, never stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ravit.tome.matching import bipartite_soft_matching, max_merges, merge_weighted

__all__ = ["block_forward"]


def block_forward(
    block: nn.Module, x: torch.Tensor, size: torch.Tensor | None, r: int, num_protected: int, prop_attn: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pre-norm timm ``Block`` (with ``timm.layers.Attention``) that merges ``r`` tokens.

    Args:
        block: a ``timm.models.vision_transformer.Block``.
        x: (B, N, C) tokens.
        size: (B, N, 1) how many patches each token stands for; None while every size is 1 (before any merge).
        r: tokens to merge in this block (clamped to half of the mergeable ones, ``max_merges``).
        num_protected: prefix tokens (class, distillation, register) that never merge.
        prop_attn: add log(size) of the key to the attention logits.

    Returns:
        (B, N - r', C) tokens and their (B, N - r', 1) sizes (None when nothing has merged yet).
    """
    attn = block.attn
    B, N, _ = x.shape
    H, D = attn.num_heads, attn.head_dim

    h = block.norm1(x)  # (B, N, C)
    q, k, v = attn.qkv(h).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None
    if prop_attn and size is not None:
        bias = size.log().to(q.dtype).transpose(1, 2)[:, None]  # (B, 1, 1, N) log(size) of each key
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)  # (B, H, N, D)
    o = attn.norm(o.transpose(1, 2).reshape(B, N, H * D))  # (B, N, A)
    if attn.gate is not None:
        o = o * attn.gate(h).sigmoid()
    o = attn.proj_drop(attn.proj(o))  # (B, N, C)
    x = x + block.drop_path1(block.ls1(o))

    r = min(r, max_merges(N, num_protected))
    if r > 0:
        matching = bipartite_soft_matching(k.mean(dim=1), r, num_protected)  # metric: (B, N, D) keys over heads
        x, size = merge_weighted(x, x.new_ones(B, N, 1) if size is None else size, matching)  # (B, N - r, C)

    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size
