"""Bipartite soft matching and size-weighted merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023,
Sec. 3, "Bipartite Soft Matching" and "Tracking Token Size").

Pure functions on (B, N, ...) tensors. Every shape depends on N, r and the number of protected tokens only (Python
ints), never on the data: no ``.item()``, no boolean indexing, so a block that merges tokens traces as one static graph
for ``torch.export``, ONNX and ``torch.compile(fullgraph=True)``.

A matching is a map from each of the N input tokens to one of the N - r output slots; tokens sharing a slot merge.
The output layout is the released code's: the protected prefix tokens first in their order, then the unmerged tokens
of set A (position order when there are protected tokens, else best-match order), then every token of set B.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Matching", "bipartite_soft_matching", "max_merges", "merge_weighted"]


class Matching(NamedTuple):
    """Where each token of one block goes.

    slots: (B, N) int64, the output slot of each input token, in [0, num_out).
    num_out: N - r, the number of output tokens (a Python int).
    """

    slots: torch.Tensor
    num_out: int


def max_merges(num_tokens: int, num_protected: int = 0) -> int:
    """The largest r one block can merge: half of the tokens that may merge (Sec. 3, "Bipartite Soft Matching":
    each A token merges at most once, into B, so r <= 50% of the tokens)."""
    return max(num_tokens - num_protected, 0) // 2


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int = 0) -> Matching:
    """Match the r most similar token pairs between the two alternating halves of the tokens (Sec. 3, "Bipartite Soft
    Matching").

    1. Split the tokens by position into set A (even) and set B (odd).
    2. Score every A token against every B token with the cosine similarity of their metric.
    3. Keep each A token's best B match; the r A tokens with the highest best score merge into their match.

    Protected tokens (the first ``num_protected``: class, distillation, register tokens) neither merge nor receive a
    merge. No gradient flows through the choice: the metric is detached.

    Args:
        metric: (B, N, D) per-token features to compare, e.g. the attention keys averaged over heads.
        r: how many tokens to remove; clamped to :func:`max_merges` of N.
        num_protected: number of prefix tokens that never merge.

    Returns:
        A :class:`Matching` of N - r output slots.
    """
    B, N, _ = metric.shape
    r = min(max(r, 0), max_merges(N, num_protected))
    if r == 0:
        return Matching(torch.arange(N, device=metric.device).expand(B, N), N)
    n_a, n_b = (N + 1) // 2, N // 2
    protected_a, protected_b = (num_protected + 1) // 2, num_protected // 2

    metric = F.normalize(metric.detach(), dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, n_a, n_b) cosine similarity
    scores[:, :protected_a] = -math.inf
    scores[:, :, :protected_b] = -math.inf
    best, match = scores.max(dim=-1)  # (B, n_a) each A token's best B score and its B index
    order = best.argsort(dim=-1, descending=True)  # (B, n_a) A indices, most similar first
    src, kept = order[:, :r], order[:, r:]  # (B, r) A tokens that merge, (B, n_a - r) A tokens that stay
    if num_protected > 0:
        kept = kept.sort(dim=-1).values  # position order: the protected ones (lowest indices) first

    # Output slots (static): prefix tokens keep their positions (A token i < protected_a is token 2i, B token
    # j < protected_b is token 2j + 1), then the kept A tokens, then the B tokens.
    kept_a = n_a - r
    k = torch.arange(kept_a, device=metric.device)
    kept_slot = torch.where(k < protected_a, 2 * k, k + protected_b)  # (n_a - r,)
    j = torch.arange(n_b, device=metric.device)
    b_slot = torch.where(j < protected_b, 2 * j + 1, kept_a + j)  # (n_b,)

    a_slot = torch.empty(B, n_a, dtype=torch.long, device=metric.device)
    a_slot.scatter_(1, kept, kept_slot.expand(B, -1))
    a_slot.scatter_(1, src, b_slot[match.gather(1, src)])  # merged A tokens land in their B match's slot
    slots = torch.empty(B, N, dtype=torch.long, device=metric.device)
    slots[:, ::2] = a_slot
    slots[:, 1::2] = b_slot
    return Matching(slots, N - r)


def merge_weighted(x: torch.Tensor, size: torch.Tensor, matching: Matching) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens by their size-weighted average (Sec. 3, "Tracking Token Size"): each output token is
    sum(x * size) / sum(size) over the tokens of its slot, and its size is sum(size).

    Args:
        x: (B, N, C) tokens.
        size: (B, N, 1) how many input patches each token stands for (1 before any merge).
        matching: from :func:`bipartite_soft_matching` on the same N tokens.

    Returns:
        (B, N - r, C) merged tokens and their (B, N - r, 1) sizes.
    """
    B, _, C = x.shape
    index = matching.slots[..., None]  # (B, N, 1)
    total = x.new_zeros(B, matching.num_out, C).scatter_add(1, index.expand(-1, -1, C), x * size)  # (B, N', C)
    new_size = size.new_zeros(B, matching.num_out, 1).scatter_add(1, index, size)  # (B, N', 1)
    return total / new_size, new_size
