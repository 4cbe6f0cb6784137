"""Pure token-sampling functions of Adaptive Token Sampling (Fayyaz et al., ECCV 2022, arXiv 2111.15667, Sec. 3).

Everything here works on padded batches: row ``b`` of a ``(B, N)`` tensor holds image ``b``'s candidate (patch)
tokens, ``valid`` marks which entries are real. Each row is computed on its own, so an image's result never depends
on the other rows (the released code's does: adaptivetokensampling/ATS 9271257, ``ats_block.py``).

Default selection (:func:`inverse_transform_sampling`) follows the released code run on one image (ATS
Sec. 3.2), quirks included: scores sorted ascending before the cumulative sum, the CDF min-max normalised, the
y-grid starting at the smallest *positive* normalised CDF value (so the lowest-scoring token is never kept), the
nearest CDF value picked (first index on ties), duplicates merged. The budget is the paper's: ``K`` points on the
y-axis, ``K' <= K`` unique tokens kept.
"""

from __future__ import annotations

import torch

__all__ = [
    "as_dtype", "class_attention_scores", "inverse_transform_sampling", "redundancy_discount", "samples_per_image",
    "stable_sort", "static_sampler", "topk_sampling",
]


def class_attention_scores(
    q_cls: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, key_valid: torch.Tensor | None = None,
    value_norm: bool = True,
) -> torch.Tensor:
    """Significance score of every token: class-token attention summed over heads times the value norm (Eq. 3).

    Only the class token's attention row is computed, O(N) per head, never the N x N matrix.
    As in the released code the norm is taken over the concatenated heads (all channels), not per head.

    Args:
        q_cls: class-token queries, (B, H, D).
        k: keys, (B, H, N, D).
        v: values, (B, H, N, D).
        scale: attention scale (1/sqrt(D) for timm attention).
        key_valid: (B, N) bool, False for padding keys; None when nothing is padded.
        value_norm: False scores by the class attention alone (the ablation of ATS Sec. 4.3).

    Returns:
        (B, N) non-negative scores for all N tokens, prefix tokens included, 0 for padding.
    """
    B, H, N, D = k.shape
    logits = (q_cls.unsqueeze(2) @ k.transpose(-2, -1)).squeeze(2) * scale  # (B, H, N)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, :], float("-inf"))
    attn = logits.float().softmax(dim=-1).sum(dim=1)  # (B, N)
    if not value_norm:
        return attn
    v_norm = torch.linalg.vector_norm(v.transpose(1, 2).reshape(B, N, H * D).float(), dim=-1)  # (B, N)
    return attn * v_norm


def redundancy_discount(scores: torch.Tensor, metric: torch.Tensor, valid: torch.Tensor | None, gamma: float
                        ) -> torch.Tensor:
    """Scores with redundant tokens discounted (ravit's ``redundancy`` option, a soft non-maximum suppression).

    Token i's score is multiplied by (1 - c_i)^gamma, where c_i is the largest cosine similarity of its metric to
    any valid token that ranks above it (a higher score; on ties an earlier token), clamped to [0, 1]. A token that
    a more important token already represents then ranks low: it is dropped first and, with fusion, averaged into
    that token. This is ToMe's observation (Bolya et al., ICLR 2023, Sec. 3: merging the most similar tokens costs
    little) inside ATS's importance ranking (Eq. 3); the top token of each image keeps its score.

    Args:
        scores: (B, N) non-negative scores of the candidate tokens, or (N,) those of one image.
        metric: (B, N, D) unit vectors (the keys averaged over heads, as fusion uses), or (N, D) with (N,) scores.
        valid: (B, N) bool, the real candidates; None when every one is (no mask to apply).
        gamma: the exponent (> 0; larger suppresses near-duplicates harder).

    Returns:
        Discounted scores, <= ``scores``, shaped as ``scores``.
    """
    # rank order: valid tokens by falling score, ties to the earlier token (a stable sort), padding last
    ranking = as_dtype(scores, torch.float32)
    ranking = ranking if valid is None else ranking.masked_fill(~valid, float("-inf"))
    if ranking.ndim == 1:  # one image given as (N,) (the one-image route, which export never takes)
        order = torch.sort(ranking, descending=True, stable=True)[1]  # (N,)
        ranked = metric.index_select(0, order)  # (N, D) metric in rank order
    else:
        order = _export_sort()(ranking, descending=True)[1]  # (B, N)
        if order.shape[0] == 1:  # one image: whole rows by index_select, no index expanded over the row
            ranked = metric.index_select(1, order[0])  # (1, N, D)
        else:
            ranked = metric.gather(1, order[..., None].expand(-1, -1, metric.shape[-1]))  # (B, N, D)
    # row r keeps the similarities to the tokens ranked above it (columns < r); zeros elsewhere, which the clamp
    # below would give anyway
    sim = torch.tril(ranked @ ranked.transpose(-2, -1), diagonal=-1)  # (B, N, N) or (N, N)
    covered = as_dtype(sim, torch.float32).amax(dim=-1).clamp(0.0, 1.0)  # in rank order; padding covers nobody
    discount = torch.empty_like(covered).scatter_(-1, order, (1.0 - covered) ** gamma)  # in token order
    return scores * discount


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call when ``t`` has that dtype: at batch 1 every dispatched op costs time, no-op
    casts included (the one-image ATS route runs ~60 ops per block beyond the dense block's)."""
    return t if t.dtype == dtype else t.to(dtype)


def samples_per_image(budget: int | float | None, n_valid: torch.Tensor, n_ref: int) -> torch.Tensor:
    """Number of y-axis samples K for each image at one ATS block.

    Args:
        budget: None -> ``n_ref`` at every block (the released default, "all tokens": its y-grid always has one
            point per original patch token); int -> that count; float in (0, 1] -> that fraction of the image's
            patch tokens entering this block, rounded, at least 1.
        n_valid: (B,) number of candidate tokens of each image.
        n_ref: the original patch-token count of the model input.

    Returns:
        (B,) int64 sample counts, >= 1.
    """
    if budget is None:
        return torch.full_like(n_valid, n_ref)
    if isinstance(budget, float):
        return torch.round(n_valid.double() * budget).long().clamp(min=1)
    return torch.full_like(n_valid, int(budget))


def _unit_grid(n_samples: torch.Tensor, width: int) -> torch.Tensor:
    """Row b: ``torch.linspace(0, 1, n_samples[b])`` bit for bit (then zeros), for a different count per row.

    Written out because linspace takes one count; this reproduces its arithmetic (float32 step, symmetric fill from
    both ends, evaluated in float64) so one image gets the released code's grid whether or not it shares a batch.
    """
    steps = n_samples.clamp(min=2)[:, None]  # (B, 1)
    step = (1.0 / (steps - 1).float()).double()  # (B, 1) float32 step, as linspace computes it
    i = torch.arange(width, device=n_samples.device, dtype=torch.float64)[None]  # (1, W)
    grid = torch.where(i < steps // 2, i * step, 1.0 - step * (steps - 1 - i))
    return grid.float()  # (B, W)


def inverse_transform_sampling(
    scores: torch.Tensor, valid: torch.Tensor, n_samples: torch.Tensor
) -> torch.Tensor:
    """Inverse transform sampling of tokens from their significance scores (Sec. 3.2, Fig. 2).

    Args:
        scores: (B, N) non-negative scores of the candidate tokens (any value where ``valid`` is False).
        valid: (B, N) bool, the real candidates of each row.
        n_samples: (B,) int, K: number of points sampled on the y-axis (>= 1).

    Returns:
        (B, N) bool: the kept tokens, a subset of ``valid``; K' = row sum <= min(K, number valid).

    Rows whose valid scores are all zero are sampled as if uniform (the released code divides by zero there).
    K = 1 samples y = 1, the top token (linspace would put its single point at the grid start).
    """
    B = scores.shape[0]
    if B and bool(valid.all()) and (B == 1 or bool((n_samples == n_samples[0]).all())):
        return _sample_full_rows(scores, int(n_samples[0]))
    return _sample_masked(scores, valid, n_samples, int(n_samples.max()) if B else 1)


def _torch_sort(values: torch.Tensor, descending: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sort(values, dim=1, descending=descending, stable=True)


def stable_sort(values: torch.Tensor, descending: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(values, dim=1, descending=descending, stable=True)`` of a (B, N) tensor, from pairwise comparisons.

    Written out because ONNX has no stable sort (the exporter cannot translate ``aten.sort.stable``) and the samplers'
    results depend on the order of equal scores. Entry i lands at the count of entries that come before it: strictly
    smaller (larger when descending), or equal and earlier. O(N^2) per row, which at ViT token counts (N <= 1k)
    costs less than the attention.
    """
    B, N = values.shape
    here, other = values[:, :, None], values[:, None, :]  # (B, N, 1), (B, 1, N)
    earlier = torch.arange(N, device=values.device)
    before = (other > here) if descending else (other < here)  # (B, N, N)
    before = before | ((other == here) & (earlier[None, :] < earlier[:, None])[None])
    rank = before.sum(dim=2)  # (B, N): the sorted position of each entry
    order = torch.zeros_like(rank).scatter(1, rank, earlier.expand(B, N))  # (B, N)
    return values.gather(1, order), order


def _sample_masked(scores: torch.Tensor, valid: torch.Tensor, n_samples: torch.Tensor, width: int,
                   sort=None) -> torch.Tensor:
    """:func:`inverse_transform_sampling` for any ``valid`` and per-row K, with ``width`` >= max K grid columns given
    and the (ascending, stable) ``sort``: no data-dependent shape or branch, so with :func:`stable_sort` this is the
    static, exportable path."""
    B, N = scores.shape
    sort = sort or _torch_sort
    n_valid = valid.sum(dim=1)  # (B,)
    scores = scores.float().masked_fill(~valid, 0.0)
    total = scores.sum(dim=1, keepdim=True)  # (B, 1)
    degenerate = total <= 0
    scores = torch.where(degenerate, valid.float(), scores)
    total = torch.where(degenerate, n_valid[:, None].float().clamp(min=1), total)
    scores = scores / total

    # Sort ascending, padding last; stable so equal scores keep their token order.
    sorted_scores, order = sort(scores.masked_fill(~valid, float("inf")))  # (B, N)
    sorted_valid = torch.arange(N, device=scores.device)[None] < n_valid[:, None]  # (B, N)
    cdf = torch.cumsum(sorted_scores.masked_fill(~sorted_valid, 0.0), dim=1)  # (B, N)
    lo = cdf[:, :1]
    hi = cdf.gather(1, (n_valid - 1).clamp(min=0)[:, None])
    ncdf = (cdf - lo) / (hi - lo)  # (B, N) in [0, 1]; NaN only for rows with < 2 valid tokens, handled below

    # y-grid: K points from the smallest positive CDF value to 1 (the released code's create_ys).
    ys_start = torch.where(ncdf == 0, 1e8, ncdf).masked_fill(~sorted_valid, 1e8).amin(dim=1, keepdim=True)  # (B, 1)
    k_minus_1 = (n_samples.clamp(min=2) - 1).float()[:, None]  # (B, 1)
    steps = torch.arange(width, device=scores.device, dtype=torch.float32)[None]  # (1, W)
    ys = ys_start + (_unit_grid(n_samples, width) * k_minus_1 - ys_start * steps) / k_minus_1  # (B, W)
    ys = torch.where(n_samples[:, None] == 1, 1.0, ys)
    grid_valid = steps < n_samples[:, None]  # (B, W)

    # Nearest normalised-CDF value for each y (first index on ties), as an argmin over |y - cdf|.
    ncdf = ncdf.masked_fill(~sorted_valid, float("inf"))
    picks = (ys[:, :, None] - ncdf[:, None, :]).abs().argmin(dim=2)  # (B, W)
    picks = torch.where(grid_valid, picks, N)  # unused grid points go to a spare column

    kept_sorted = torch.zeros(B, N + 1, dtype=torch.bool, device=scores.device)
    kept_sorted.scatter_(1, picks, True)  # duplicates merge here: K' <= K
    kept_sorted = kept_sorted[:, :N] & sorted_valid
    kept_sorted |= (n_valid == 1)[:, None] & sorted_valid  # a single candidate is kept
    kept = torch.zeros_like(kept_sorted).scatter_(1, order, kept_sorted)
    return kept & valid


def _sample_full_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`inverse_transform_sampling` when every entry is valid and every row takes the same K: the same
    arithmetic, op for op, without the masks, gathers and per-row grids that padding and ragged K need.

    Written separately because at batch 1 (always this case) the sampler's cost is its op count, about 4 µs per
    op on CPU, not its arithmetic; the padded test in tests/test_ats_sampling.py checks both paths agree.
    """
    B, N = scores.shape
    if N == 1:
        return torch.ones_like(scores, dtype=torch.bool)
    scores = scores.float()
    total = scores.sum(dim=1, keepdim=True)  # (B, 1)
    degenerate = total <= 0
    if bool(degenerate.any()):  # all-zero rows sample as if uniform
        scores = torch.where(degenerate, 1.0, scores)
        total = torch.where(degenerate, float(N), total)
    sorted_scores, order = torch.sort(scores / total, dim=1, stable=True)  # (B, N)
    cdf = torch.cumsum(sorted_scores, dim=1)
    lo = cdf[:, :1]
    ncdf = (cdf - lo) / (cdf[:, -1:] - lo)  # (B, N)
    if k == 1:
        ys = scores.new_ones(B, 1)
    else:
        ys_start = torch.where(ncdf == 0, 1e8, ncdf).amin(dim=1, keepdim=True)  # (B, 1)
        steps = torch.arange(k, device=scores.device, dtype=torch.float32)
        grid = torch.linspace(0, 1, k, device=scores.device)  # what _unit_grid computes for one K
        ys = ys_start + (grid * (k - 1) - ys_start * steps) / (k - 1)  # (B, K)
    picks = (ys[:, :, None] - ncdf[:, None, :]).abs().argmin(dim=2)  # (B, K)
    kept_sorted = torch.zeros(B, N, dtype=torch.bool, device=scores.device).scatter_(1, picks, True)
    return torch.zeros_like(kept_sorted).scatter_(1, order, kept_sorted)


def topk_sampling(scores: torch.Tensor, valid: torch.Tensor, n_samples: torch.Tensor,
                  sort=None) -> torch.Tensor:
    """Keep the K highest-scoring tokens of each row (the paper's Top-K baseline, Sec. 4.2 ablation).

    Same arguments and result as :func:`inverse_transform_sampling`; ties go to the earlier token. ``sort`` is a
    stable sort of (B, N) rows taking ``descending`` (None: ``torch.sort``; :func:`stable_sort` for export).
    """
    B, N = scores.shape
    order = (sort or _torch_sort)(scores.float().masked_fill(~valid, float("-inf")), descending=True)[1]
    n_keep = torch.minimum(n_samples, valid.sum(dim=1))  # (B,)
    kept_sorted = torch.arange(N, device=scores.device)[None] < n_keep[:, None]  # (B, N)
    return torch.zeros_like(kept_sorted).scatter_(1, order, kept_sorted) & valid


def static_sampler(sampler, k: int):
    """``keep(scores, valid)`` taking K = ``k`` samples per row with no data-dependent shape or branch (for
    ``static=True``): the built-in samplers on their masked path, a user's callable as it is."""
    if sampler is inverse_transform_sampling:
        return lambda scores, valid: _sample_masked(scores, valid, _full_k(valid, k), max(k, 1), sort=_export_sort())
    if sampler is topk_sampling:
        return lambda scores, valid: topk_sampling(scores, valid, _full_k(valid, k), sort=_export_sort())
    return lambda scores, valid: sampler(scores, valid, _full_k(valid, k))


def _export_sort():
    """:func:`stable_sort` while a graph is captured (export, ONNX, ``torch.compile``), ``torch.sort`` in eager mode:
    the same order either way, the O(N log N) kernel where nothing needs to translate it."""
    return stable_sort if torch.compiler.is_compiling() else _torch_sort


def _full_k(valid: torch.Tensor, k: int) -> torch.Tensor:
    return torch.full((valid.shape[0],), k, dtype=torch.long, device=valid.device)  # (B,)
