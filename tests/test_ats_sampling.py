"""Property tests of ATS's pure sampling functions (uniform scores, zeros, ties, tiny N, padding)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ravit.ats.sampling import class_attention_scores, inverse_transform_sampling, samples_per_image, topk_sampling

SAMPLERS = [inverse_transform_sampling, topk_sampling]


def reference_row(scores: torch.Tensor, n_grid: int) -> set[int]:
    """One image, the released algorithm step by step (ATS Sec. 3.2, as released), with torch.linspace for the grid."""
    s = scores / scores.sum()
    sorted_s, order = torch.sort(s, stable=True)
    cdf = torch.cumsum(sorted_s, 0)
    ncdf = (cdf - cdf.min()) / (cdf.max() - cdf.min())
    start = torch.where(ncdf == 0, 1e8, ncdf).min()
    steps = torch.arange(n_grid, dtype=torch.float32)
    ys = start + (torch.linspace(0, 1, n_grid) * (n_grid - 1) - start * steps) / (n_grid - 1)
    picks = (ys[:, None] - ncdf[None]).abs().argmin(dim=1)
    return {int(order[p]) for p in picks}


# Scores drawn from a small set of values make ties and zeros common.
score_values = st.sampled_from([0.0, 0.0, 1e-3, 0.1, 0.25, 0.5, 1.0, 2.0, 7.5])
rows = st.lists(st.one_of(score_values, st.floats(0.0, 10.0, width=32)), min_size=1, max_size=40)


def _run(fn, row, k):
    scores = torch.tensor([row], dtype=torch.float32)
    return fn(scores, torch.ones_like(scores, dtype=torch.bool), torch.tensor([k]))[0]


@settings(max_examples=150, deadline=None)
@given(row=rows, k=st.integers(1, 50), extra=st.integers(0, 5), data=st.data())
def test_invariants_and_padding_independence(row, k, extra, data):
    """Kept tokens: a non-empty subset of the valid ones, at most K; unchanged by padding and batch neighbours."""
    n = len(row)
    for fn in SAMPLERS:
        keep = _run(fn, row, k)
        assert 1 <= int(keep.sum()) <= min(k, n)
        # The same row padded with garbage and stacked with another random row: same answer.
        other = data.draw(rows)
        width = max(n, len(other)) + extra
        scores = torch.full((2, width), 123.0)
        valid = torch.zeros(2, width, dtype=torch.bool)
        scores[1, :n], valid[1, :n] = torch.tensor(row), True
        scores[0, : len(other)], valid[0, : len(other)] = torch.tensor(other), True
        batched = fn(scores, valid, torch.tensor([data.draw(st.integers(1, 50)), k]))
        assert not (batched & ~valid).any()
        assert torch.equal(batched[1, :n], keep)


@settings(max_examples=100, deadline=None)
@given(row=st.lists(st.floats(0.001953125, 10.0, width=32), min_size=2, max_size=60))
def test_inverse_transform_matches_step_by_step_reference(row):
    """Budget = all tokens (K = N grid points): the vectorised sampler equals a literal one-image run."""
    scores = torch.tensor(row)
    keep = _run(inverse_transform_sampling, row, len(row))
    assert set(keep.nonzero().flatten().tolist()) == reference_row(scores, len(row))


@settings(max_examples=100, deadline=None)
@given(row=st.lists(st.floats(0.001953125, 10.0, width=32), min_size=2, max_size=60), data=st.data())
def test_inverse_transform_reference_any_k(row, data):
    k = data.draw(st.integers(2, 80))
    keep = _run(inverse_transform_sampling, row, k)
    assert set(keep.nonzero().flatten().tolist()) == reference_row(torch.tensor(row), k)


@pytest.mark.parametrize("n", [2, 3, 10, 196, 300])
def test_uniform_scores(n):
    """Uniform scores: the released quirk drops the lowest (first) token; K < N points keep K distinct tokens."""
    row = [1.0] * n
    keep = _run(inverse_transform_sampling, row, n)
    assert int(keep.sum()) == n - 1 and not keep[0]
    for k in sorted({1, 2, n // 2, n - 1} & set(range(1, n))):
        assert int(_run(inverse_transform_sampling, row, k).sum()) == k
        assert int(_run(topk_sampling, row, k).sum()) == k
    assert _run(topk_sampling, row, 1).nonzero().flatten().tolist() == [0]  # ties go to the earlier token


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 30), k=st.integers(1, 40), data=st.data())
def test_full_rows_fast_path_equals_padded_path(n, k, data):
    """Rows with no padding and one K take a shorter code path; it must equal the general (padded) one row by row."""
    batch = torch.tensor([data.draw(st.lists(st.one_of(score_values, st.floats(0.0, 10.0, width=32)),
                                             min_size=n, max_size=n)) for _ in range(3)])
    fast = inverse_transform_sampling(batch, torch.ones_like(batch, dtype=torch.bool), torch.full((3,), k))
    padded = torch.cat([batch, torch.zeros(3, 1)], dim=1)
    valid = torch.ones_like(padded, dtype=torch.bool)
    valid[:, -1] = False
    assert torch.equal(fast, inverse_transform_sampling(padded, valid, torch.full((3,), k))[:, :n])


@pytest.mark.parametrize("fn", SAMPLERS)
def test_all_zero_scores_behave_as_uniform(fn):
    assert torch.equal(_run(fn, [0.0] * 12, 12), _run(fn, [1.0] * 12, 12))


def test_tiny_n():
    assert _run(inverse_transform_sampling, [0.3], 5).tolist() == [True]
    assert _run(topk_sampling, [0.3], 5).tolist() == [True]
    # Two tokens: the grid collapses on y = 1 and keeps the top token (the released code's dedup loses it).
    assert _run(inverse_transform_sampling, [0.7, 0.2], 2).tolist() == [True, False]
    empty = inverse_transform_sampling(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool), torch.tensor([3]))
    assert not empty.any()


@settings(max_examples=100, deadline=None)
@given(row=rows, k=st.integers(1, 50))
def test_top_token_always_kept(row, k):
    """y = 1 is always on the grid, so a highest-scoring token is always kept (by both samplers)."""
    scores = torch.tensor(row)
    if scores.sum() == 0:
        return
    for fn in SAMPLERS:
        keep = _run(fn, row, k)
        assert scores[keep].max() == scores.max()


@settings(max_examples=100, deadline=None)
@given(row=rows, k=st.integers(1, 50))
def test_topk_keeps_the_k_best(row, k):
    scores = torch.tensor(row)
    keep = _run(topk_sampling, row, k)
    assert int(keep.sum()) == min(k, len(row))
    if (~keep).any():
        assert scores[keep].min() >= scores[~keep].max()


def test_samples_per_image():
    n_valid = torch.tensor([10, 7, 1])
    assert samples_per_image(None, n_valid, 64).tolist() == [64, 64, 64]
    assert samples_per_image(5, n_valid, 64).tolist() == [5, 5, 5]
    assert samples_per_image(0.5, n_valid, 64).tolist() == [5, 4, 1]


def test_class_attention_scores_match_explicit_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)  # (B, H, N, D)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False
    scores = class_attention_scores(q[:, :, 0], k, v, 8**-0.5, valid)
    for b, n in enumerate([9, 6]):
        attn = ((q[b, :, :1] @ k[b, :, :n].transpose(-2, -1)) * 8**-0.5).softmax(-1)[:, 0]  # (H, n)
        norms = v[b, :, :n].transpose(0, 1).reshape(n, -1).norm(dim=-1)
        torch.testing.assert_close(scores[b, :n], attn.sum(0) * norms)
    assert (scores[1, 6:] == 0).all()
