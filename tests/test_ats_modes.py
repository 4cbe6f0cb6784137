"""ATS options beyond the paper (``ravit.ats.config``): ``schedule="linear"``, ``fuse="nearest"``, ``static=True``.

Checks the resolved budgets, static == ragged (same kept tokens and logits), static shapes, fusion against a
reference written from the definition, conserved token sizes, batch independence, ``stable_sort`` == torch's stable
sort, export (torch.export / ONNX / torch.compile), gradients and checkpointing, traces and GMACs, and ToMe refusal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ats_helpers import assert_batch_independent, peaky_vit
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer

import ravit
import ravit.ats.patch as ats_patch
from ravit.ats import apply_ats, has_ats, remove_ats, trace
from ravit.ats.padded import Slots, padded_block_forward
from ravit.ats.sampling import stable_sort, static_sampler, topk_sampling
from ravit.bench.flops import count_gmacs
from ravit.errors import InvalidArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on a busy 2-core box

BLOCKS = [1, 2, 3]
SAMPLER_NAMES = ["inverse_transform", "topk"]


def zoo_model() -> VisionTransformer:
    return ravit.create_model("fmnist_deit_p4", pretrained=True).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def zoo_images() -> torch.Tensor:
    """8 Fashion-MNIST test images normalised as the zoo model expects (random ones if the data set is absent)."""
    from ravit.data import load_fashion_mnist

    try:
        pixels, _ = load_fashion_mnist("test")
    except FileNotFoundError:
        return torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    return ((pixels[:8].float() / 255 - 0.286) / 0.353)[:, None]


def same_kept(a, b) -> bool:
    return torch.equal(a.kept_tokens, b.kept_tokens) and all(
        torch.equal(x, y) for sa, sb in zip(a.kept_indices, b.kept_indices, strict=True)
        for x, y in zip(sa, sb, strict=True))


# ------------------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    "blocks,budget,expected",
    [
        ([1, 2, 3], 12, (37, 24, 12)),  # 49 - 37/3 = 36.67, 49 - 74/3 = 24.33, 12
        ([1, 2, 3], 0.25, (37, 24, 12)),  # a ratio of the original 49: round(12.25) = 12
        ([1, 2, 3], 12.0, (37, 24, 12)),  # a whole float above 1 counts tokens
        ([0, 1, 2, 3], 1, (37, 25, 13, 1)),
        ([2], 30, (30,)),
        ([1, 2, 3], 1.0, (49, 49, 49)),
        ([1, 2, 3], 49, (49, 49, 49)),
    ],
)
def test_linear_schedule_resolves_to_int_budgets(blocks, budget, expected):
    model = apply_ats(peaky_vit(img_size=28), blocks=blocks, budget=budget, schedule="linear")
    assert model.patch_embed.num_patches == 49
    assert model.ats_config.budgets == expected
    assert all(type(b) is int for b in model.ats_config.budgets)
    assert model.ats_config.schedule == "linear"


def test_linear_ratio_is_of_the_original_count_not_compounded(images):
    """With "each" a ratio compounds block after block; with "linear" the final count is ratio x original."""
    each = apply_ats(peaky_vit(), blocks=BLOCKS, budget=0.25, sampler="topk")
    linear = apply_ats(peaky_vit(), blocks=BLOCKS, budget=0.25, sampler="topk", schedule="linear")
    assert linear.ats_config.budgets == (48, 32, 16)  # 64 patches, final round(64 x 0.25) = 16
    counts_each = trace(each, images, count_gmacs=False).kept_tokens - 1
    counts_linear = trace(linear, images, count_gmacs=False).kept_tokens - 1
    assert (counts_each == torch.tensor([16, 4, 1])).all()  # 64 x 0.25 = 16, x 0.25 = 4, x 0.25 = 1
    assert (counts_linear == torch.tensor([48, 32, 16])).all()


def test_linear_schedule_does_not_depend_on_the_order_blocks_are_given():
    model = apply_ats(peaky_vit(img_size=28), blocks=[3, 1, 2], budget=12, schedule="linear")
    assert model.ats_config.blocks == (1, 2, 3)
    assert model.ats_config.budgets == (37, 24, 12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(budget=None, schedule="linear"), "one budget"),
        (dict(budget=[30, 20, 10], schedule="linear"), "one budget"),
        (dict(budget=(30, 20, 10), schedule="linear"), "one budget"),
        (dict(budget=0.01, schedule="linear"), "leaves no patch token"),  # round(49 x 0.01) = 0
        (dict(budget=0, schedule="linear"), "out of range"),
        (dict(budget=50, schedule="linear"), "out of range"),
        (dict(budget=1.5, schedule="linear"), "out of range"),
        (dict(budget=12, schedule="exponential"), "unknown schedule"),
        (dict(budget=12, schedule=None), "unknown schedule"),
        (dict(budget=12, fuse="average"), "unknown fuse"),
        (dict(budget=12, fuse=None), "unknown fuse"),
        (dict(budget=12, static=1), "static must be True or False"),
        (dict(budget=12, static="yes"), "static must be True or False"),
        (dict(budget=12, static=None), "static must be True or False"),
        (dict(budget=0.5, static=True), "static=True needs"),  # a ratio of the entering tokens: not a fixed count
        (dict(budget=None, static=True), "static=True needs"),
        (dict(budget=[12, 0.5, 6], static=True), "static=True needs"),
    ],
)
def test_bad_mode_arguments_are_refused(kwargs, match):
    model = peaky_vit(img_size=28)
    with pytest.raises(InvalidArgumentError, match=match):
        apply_ats(model, blocks=BLOCKS, **kwargs)
    assert not has_ats(model) and type(model) is VisionTransformer


def test_static_accepts_linear_ratio_and_ints():
    assert apply_ats(peaky_vit(img_size=28), blocks=BLOCKS, budget=0.25, schedule="linear",
                     static=True).ats_config.budgets == (37, 24, 12)
    assert apply_ats(peaky_vit(img_size=28), blocks=BLOCKS, budget=[30, 20, 10.0],
                     static=True).ats_config.budgets == (30, 20, 10)


# ------------------------------------------------------------------------------------------- static == dynamic


@pytest.mark.parametrize("budget", [12, [40, 20, 8], [30, 30, 5]])
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_static_equals_ragged(images, sampler, budget):
    ragged = apply_ats(peaky_vit(), blocks=BLOCKS, budget=budget, sampler=sampler)
    static = apply_ats(peaky_vit(), blocks=BLOCKS, budget=budget, sampler=sampler, static=True)
    a, b = trace(ragged, images, count_gmacs=False), trace(static, images, count_gmacs=False)
    if sampler == "inverse_transform":  # the comparison covers images keeping different counts
        assert len({tuple(row) for row in a.kept_tokens.tolist()}) > 1
    assert same_kept(a, b)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(static(images), ragged(images), atol=1e-5, rtol=0)


def test_static_equals_ragged_when_a_budget_exceeds_the_tokens_left(images):
    ragged = apply_ats(peaky_vit(), blocks=[1, 2], budget=[10, 40])
    static = apply_ats(peaky_vit(), blocks=[1, 2], budget=[10, 40], static=True)
    a, b = trace(ragged, images, count_gmacs=False), trace(static, images, count_gmacs=False)
    assert same_kept(a, b)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)


def test_static_equals_ragged_on_the_zoo_model(zoo_images):
    for sampler in SAMPLER_NAMES:
        ragged = apply_ats(zoo_model(), blocks=BLOCKS, budget=0.25, sampler=sampler, schedule="linear")
        static = apply_ats(zoo_model(), blocks=BLOCKS, budget=0.25, sampler=sampler, schedule="linear", static=True)
        a, b = trace(ragged, zoo_images, count_gmacs=False), trace(static, zoo_images, count_gmacs=False)
        assert same_kept(a, b)
        torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget,schedule", [(12, "each"), (0.25, "linear"), ([40, 20, 8], "each")])
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_static_fused_equals_dynamic_fused(images, sampler, budget, schedule):
    kw = dict(blocks=BLOCKS, budget=budget, sampler=sampler, schedule=schedule, fuse="nearest")
    dynamic, static = apply_ats(peaky_vit(), **kw), apply_ats(peaky_vit(), static=True, **kw)
    a, b = trace(dynamic, images, count_gmacs=False), trace(static, images, count_gmacs=False)
    assert same_kept(a, b)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ static shapes


@pytest.mark.parametrize(
    "budget,width,prefix_kwargs,P",
    [
        (12, 12, {}, 1),
        ([40, 20, 8], 8, {}, 1),
        (12, 12, dict(reg_tokens=2, no_embed_class=True), 3),
        ([20, 40, 30], 20, {}, 1),  # a block cannot leave more slots than enter it
        ([30, 20, 25], 20, {}, 1),
    ],
)
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_static_shapes_depend_on_the_budget_only(sampler, budget, width, prefix_kwargs, P):
    """forward_features is (B, P + K, C) whatever the image; empty slots (K' < K) come last and are zero; the
    filled slots are the ragged path's tokens (growing budgets: own test)."""
    static = apply_ats(peaky_vit(**prefix_kwargs), blocks=BLOCKS, budget=budget, sampler=sampler, static=True)
    ragged = apply_ats(peaky_vit(**prefix_kwargs), blocks=BLOCKS, budget=budget, sampler=sampler)
    gen = torch.Generator().manual_seed(5)
    fewer = False
    for batch in (1, 6):
        x = torch.randn(batch, 3, 32, 32, generator=gen) * (1 + batch)
        with torch.no_grad():
            features = static.forward_features(x)
            dense = ragged.forward_features(x)  # (B, largest count, C), zero past each image's count
        assert features.shape == (batch, P + width, 48)
        counts = trace(static, x, count_gmacs=False).kept_tokens[:, -1]
        assert ((counts > P) & (counts <= P + width)).all()
        for b, n in enumerate(counts.tolist()):
            assert (features[b, n:] == 0).all()
            assert (features[b, :n].abs().sum(dim=-1) > 0).all()
        fewer |= bool((counts < P + width).any())
        if sampler == "topk" or isinstance(budget, int) or budget == sorted(budget, reverse=True):
            torch.testing.assert_close(features[:, : dense.shape[1]], dense, atol=1e-5, rtol=0)
            assert (features[:, dense.shape[1]:] == 0).all()
    if sampler == "topk":
        assert not fewer  # top-K always fills K slots
    elif budget == 12:
        assert fewer  # the inverse transform keeps K' < K unique tokens for some images: empty slots exercised


# --------------------------------------------------------------------------------------------------------- fuse


def reference_block(block, x, size, P, K, proportional, fuse):
    """ONE image through ONE ATS block, from the definition, on the filled slots only (the reference never sees an
    empty slot): class attention x value norm scores (log-size key bias if proportional), the top-K patch tokens kept
    in input order, their queries attend to all tokens, then (fuse) every dropped token's block input is averaged by
    size into the kept patch token whose head-averaged key is most cosine-similar, then the MLP.

    x (L, C), size (L,) with 0 for empty slots. Returns (tokens, sizes, kept positions among the filled slots).
    """
    filled = size > 0
    x, size = x[filled], size[filled]
    attn = block.attn
    n, H, D = x.shape[0], attn.num_heads, attn.head_dim
    q, k, v = F.linear(block.norm1(x), attn.qkv.weight, attn.qkv.bias).reshape(n, 3, H, D).unbind(1)  # (n, H, D)
    bias = size.log() if proportional else torch.zeros(n)
    weights = (torch.einsum("qhd,khd->hqk", q, k) * D ** -0.5 + bias).softmax(dim=-1)  # (H, n, n)
    scores = weights[:, 0].sum(dim=0) * v.reshape(n, H * D).norm(dim=-1)  # (n,)
    kept_patch = (scores[P:].topk(min(K, n - P)).indices + P).sort().values
    rows = torch.cat([torch.arange(P), kept_patch])
    out = torch.einsum("hqk,khd->qhd", weights[:, rows], v).reshape(len(rows), H * D)
    y = x[rows] + attn.proj(out)
    new_size = size[rows].clone()
    if fuse:
        key = F.normalize(k.mean(dim=1), dim=-1)  # (n, D)
        total = y * new_size[:, None]
        for j in range(P, n):
            if j in kept_patch:
                continue
            t = P + int((key[kept_patch] @ key[j]).argmax())  # never a prefix token
            total[t] += x[j] * size[j]
            new_size[t] += size[j]
        y = total / new_size[:, None]
    y = y + block.mlp(block.norm2(y))
    return y, new_size, rows


def _slots(gen, B, L, P, C, sizes):
    x = torch.randn(B, L, C, generator=gen)
    ids = torch.cat([torch.full((P,), -1), torch.arange(L - P)]).expand(B, L)
    return Slots(x, sizes, ids.masked_fill(sizes == 0, -1))


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("case", ["first_block", "sized_and_padded"])
def test_padded_block_matches_reference(case, static, fuse):
    block = peaky_vit().blocks[2]
    gen = torch.Generator().manual_seed(3)
    B, P, L, K = 3, 1, 1 + 16, 5
    if case == "first_block":  # sizes all 1, as entering the first ATS block
        sizes = torch.ones(B, L)
    else:  # later blocks: tokens holding several originals, and empty slots (one image has only 4 patches left)
        sizes = torch.randint(1, 5, (B, L), generator=gen).float()
        sizes[:, 0] = 1
        sizes[0, 12:] = 0
        sizes[1, 5:] = 0
    slots = _slots(gen, B, L, P, 48, sizes)
    seen = []

    def keep_fn(scores, valid):
        seen.append(scores)
        return static_sampler(topk_sampling, K)(scores, valid)

    with torch.no_grad():
        out = padded_block_forward(block, slots, P, proportional=fuse or case != "first_block", keep_fn=keep_fn,
                                   width=K if static else None, fuse=fuse)
        if static:
            assert out.x.shape == (B, P + K, 48)
        for b in range(B):
            x_ref, size_ref, rows = reference_block(block, slots.x[b], sizes[b], P, K,
                                                    proportional=fuse or case != "first_block", fuse=fuse)
            filled = out.size[b] > 0
            assert filled.sum() == len(rows) and filled[: len(rows)].all()  # kept first
            torch.testing.assert_close(out.x[b, filled], x_ref, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.size[b, filled], size_ref, atol=0, rtol=0)
            kept_ids = slots.ids[b][sizes[b] > 0][rows]
            assert torch.equal(out.ids[b, filled], kept_ids)
            if fuse:
                assert out.size[b].sum() == sizes[b].sum()  # nothing lost
            else:
                assert out.size[b].sum() == sizes[b][sizes[b] > 0][rows].sum()
    assert len(seen) == 1 and seen[0].shape == (B, L - P)


def test_fused_slot_is_the_size_weighted_average_of_its_inputs():
    """Spelled out by hand: a kept token of size 2 absorbs dropped ones of sizes 1 and 3 (the class token cannot), so
    it becomes (2 a + 1 x1 + 3 x2) / 6 with a its value after the attention residual and x1, x2 the block inputs."""
    import copy

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    block = copy.deepcopy(peaky_vit().blocks[1])
    block.mlp = Zero()  # the block output is then the value after the attention residual
    gen = torch.Generator().manual_seed(4)
    sizes = torch.tensor([[1.0, 2.0, 1.0, 3.0]])
    slots = _slots(gen, 1, 4, 1, 48, sizes)
    keep = lambda scores, valid: torch.tensor([[True, False, False]])  # noqa: E731 (keep patch 0 only)
    with torch.no_grad():
        fused = padded_block_forward(block, slots, 1, True, keep, 1, fuse=True)
        plain = padded_block_forward(block, slots, 1, True, keep, 1, fuse=False)
    assert fused.size.tolist() == [[1.0, 6.0]] and plain.size.tolist() == [[1.0, 2.0]]
    a = plain.x[0, 1]
    torch.testing.assert_close(fused.x[0, 1], (2 * a + slots.x[0, 2] + 3 * slots.x[0, 3]) / 6, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused.x[0, 0], plain.x[0, 0], atol=0, rtol=0)  # the class token is untouched
    assert fused.ids.tolist() == [[-1, 0]]


def test_class_token_never_absorbs():
    """Dropped tokens that are exact copies of the class token (cosine 1 with it) still go to a patch token."""
    block = peaky_vit().blocks[1]
    gen = torch.Generator().manual_seed(6)
    B, P, L, K = 2, 1, 17, 3
    slots = _slots(gen, B, L, P, 48, torch.ones(B, L))
    x = slots.x.clone()
    x[:, 1:11] = x[:, :1]  # ten patch tokens identical to the class token: same key
    slots = slots._replace(x=x)
    with torch.no_grad():
        for width in (K, None):
            out = padded_block_forward(block, slots, P, True, static_sampler(topk_sampling, K), width, fuse=True)
            assert (out.size[:, 0] == 1).all()
            assert (out.size.sum(dim=1) == L).all()
    # and through the zoo model, every block
    model = apply_ats(zoo_model(), blocks=BLOCKS, budget=0.1, schedule="linear", fuse="nearest", static=True)
    record = _record_slots(model, torch.randn(4, 1, 28, 28, generator=gen))
    assert all((s.size[:, 0] == 1).all() for s in record)


def _record_slots(model, images):
    """The slots leaving every padded block of a forward (the general executor's or static Top-K's lean route),
    recorded by wrapping ``padded_block_forward`` and ``filled_topk_forward``."""
    record = []
    reals = {name: getattr(ats_patch, name) for name in ("padded_block_forward", "filled_topk_forward")}

    def wrapper(real):
        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            record.append(out)
            return out

        return wrapped

    for name, real in reals.items():
        setattr(ats_patch, name, wrapper(real))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for name, real in reals.items():
            setattr(ats_patch, name, real)
    return record


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_fused_sizes_sum_to_the_original_token_count(zoo_images, sampler, static):
    model = apply_ats(zoo_model(), blocks=BLOCKS, budget=0.2, sampler=sampler, schedule="linear", fuse="nearest",
                      static=static)
    record = _record_slots(model, zoo_images)
    assert len(record) == 3  # blocks 1, 2, 3 run on slots
    for slots in record:
        assert torch.equal(slots.size.sum(dim=1), torch.full((len(zoo_images),), 50.0))  # 1 + 49 per image
        assert (slots.size[:, 0] == 1).all()
        filled = slots.size > 0
        assert ((slots.ids >= 0) == filled & (torch.arange(slots.size.shape[1]) > 0)).all()
    # the last block leaves K slots: the 49 patch tokens are held by at most K of them
    assert (record[-1].size[:, 1:] > 0).sum(dim=1).max() <= 10


def test_fusion_changes_the_output(images):
    plain = apply_ats(peaky_vit(), blocks=BLOCKS, budget=8, sampler="topk")
    fused = apply_ats(peaky_vit(), blocks=BLOCKS, budget=8, sampler="topk", fuse="nearest")
    a, b = trace(plain, images, count_gmacs=False), trace(fused, images, count_gmacs=False)
    assert torch.equal(a.kept_tokens[:, 0], b.kept_tokens[:, 0])  # the same count, different content
    assert (a.logits - b.logits).abs().max() > 1e-2
    dense = peaky_vit()(images)
    assert (b.logits - dense).abs().max() > 1e-2


def test_no_drop_and_no_fuse_is_the_dense_model(images):
    """K = all patches with top-K drops nothing: fused and static runs equal the dense model."""
    with torch.no_grad():
        dense = peaky_vit()(images)
        for kw in (dict(fuse="nearest"), dict(static=True), dict(fuse="nearest", static=True)):
            model = apply_ats(peaky_vit(), blocks=[0, 1, 2, 3], budget=64, sampler="topk", **kw)
            torch.testing.assert_close(model(images), dense, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- batch independence


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fuse="nearest"),
        dict(fuse="nearest", static=True),
        dict(fuse="nearest", sampler="topk"),
        dict(static=True, sampler="topk"),
        dict(static=True, sampler="inverse_transform"),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_batch_independence(images, kwargs):
    model = apply_ats(peaky_vit(), blocks=BLOCKS, budget=0.2, schedule="linear", **kwargs)
    assert_batch_independent(model, images)
    batched = trace(model, images, count_gmacs=False)
    with torch.no_grad():
        for i in range(len(images)):
            torch.testing.assert_close(model(images[i: i + 1])[0], batched.logits[i], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------- stable_sort


_tie_values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, float("inf"), float("-inf")])


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 4), n=st.integers(1, 40), descending=st.booleans(), data=st.data())
def test_stable_sort_equals_torch_stable_sort(rows, n, descending, data):
    values = data.draw(st.lists(st.lists(st.one_of(_tie_values, st.floats(-3, 3, width=32)), min_size=n, max_size=n),
                                min_size=rows, max_size=rows))
    t = torch.tensor(values, dtype=torch.float32)
    expected = torch.sort(t, dim=1, descending=descending, stable=True)
    got = stable_sort(t, descending=descending)
    assert torch.equal(got[1], expected.indices)
    assert torch.equal(got[0], expected.values)


@pytest.mark.parametrize("descending", [False, True])
def test_stable_sort_all_ties_and_integers(descending):
    for t in (torch.zeros(3, 50), torch.full((2, 7), float("inf")), torch.randint(0, 3, (5, 64)),
              torch.tensor([[float("-inf"), 1.0, float("inf"), 1.0, float("-inf"), float("inf")]])):
        expected = torch.sort(t, dim=1, descending=descending, stable=True)
        values, indices = stable_sort(t, descending=descending)
        assert torch.equal(indices, expected.indices) and torch.equal(values, expected.values)


# --------------------------------------------------------------------------------------------------------- export

EXPORT_CASES = {
    "topk": dict(budget=12, sampler="topk"),
    "inverse_transform": dict(budget=12, sampler="inverse_transform"),
    "inverse_transform-linear-fuse": dict(budget=0.25, sampler="inverse_transform", schedule="linear",
                                          fuse="nearest"),
    "topk-linear-fuse-redundancy": dict(budget=0.25, sampler="topk", schedule="linear", fuse="nearest",
                                        redundancy=6.0),
}


def _static_zoo(case):
    return apply_ats(zoo_model(), blocks=BLOCKS, static=True, **EXPORT_CASES[case])


def _inputs(zoo_images):
    x, y = zoo_images[:4], zoo_images[4:8]
    return x, y


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_torch_export_matches_eager_on_another_input(zoo_images, case):
    model = _static_zoo(case)
    x, y = _inputs(zoo_images)
    tx, ty = trace(model, x, count_gmacs=False), trace(model, y, count_gmacs=False)
    assert any(not torch.equal(a, b) for a, b in zip(tx.kept_indices[0], ty.kept_indices[0], strict=True))
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(y), model(y), atol=1e-5, rtol=0)
        torch.testing.assert_close(exported.module()(x), model(x), atol=1e-5, rtol=0)
        assert (model(y) - zoo_model()(y)).abs().max() > 1e-3  # ATS changed something


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_dynamic_ats_does_not_export(zoo_images, sampler):
    """The ragged default has data-dependent shapes: export stops with an error that says to use static=True."""
    model = apply_ats(zoo_model(), blocks=BLOCKS, budget=12, sampler=sampler)
    with pytest.raises(InvalidArgumentError, match="static=True"):
        torch.export.export(model, (zoo_images[:4],))
    with torch.no_grad():  # outside export the same model still runs, compiled with graph breaks or not
        torch.testing.assert_close(torch.compile(model)(zoo_images[:4]), model(zoo_images[:4]), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_onnx_export_runs_in_onnxruntime(zoo_images, case, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _static_zoo(case)
    x, y = _inputs(zoo_images)
    path = tmp_path / f"{case}.onnx"
    torch.onnx.export(model, (x,), dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: y.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(y), atol=1e-4, rtol=0)


@pytest.mark.slow  # 10-20 s per case on a busy CPU
@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_compile_fullgraph_matches_eager(zoo_images, case):
    torch._dynamo.reset()
    model = _static_zoo(case)
    x, y = _inputs(zoo_images)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break raises
    with torch.no_grad():
        compiled(x)
        torch.testing.assert_close(compiled(y), model(y), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------- gradients


def test_training_gradients_reach_every_later_block(images):
    model = apply_ats(peaky_vit(drop_path_rate=0.1), blocks=BLOCKS, budget=0.25, schedule="linear", fuse="nearest",
                      static=True).train()
    torch.manual_seed(0)
    loss = F.cross_entropy(model(images), torch.arange(len(images)) % 5)
    loss.backward()
    assert torch.isfinite(loss)
    first = BLOCKS[0]
    later = [(n, p) for n, p in model.named_parameters() if n.startswith("blocks.")
             and int(n.split(".")[1]) >= first]
    assert later
    bad = [n for n, p in later if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not bad, bad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_grad_checkpointing_gives_the_same_loss_and_gradients(images):
    results = []
    for checkpointing in (False, True):
        model = apply_ats(peaky_vit(), blocks=BLOCKS, budget=0.25, schedule="linear", fuse="nearest", static=True)
        model.set_grad_checkpointing(checkpointing)
        with torch.enable_grad():
            loss = F.cross_entropy(model(images[:3]), torch.arange(3))
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0, atol=1e-5, rtol=0)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=0, msg=name)


# --------------------------------------------------------------------------------------------------------- trace


@pytest.mark.parametrize(
    "kwargs",
    [dict(fuse="nearest"), dict(static=True), dict(fuse="nearest", static=True),
     dict(fuse="nearest", static=True, sampler="topk")],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_trace_on_padded_modes(zoo_images, kwargs):
    images = zoo_images[:3]
    dense = count_gmacs(zoo_model(), images[:1])
    model = apply_ats(zoo_model(), blocks=BLOCKS, budget=0.25, schedule="linear", **kwargs)
    result = trace(model, images)
    assert result.kept_tokens.shape == (3, 3) and result.kept_tokens.dtype == torch.int64
    assert (result.kept_tokens[:, 1:] <= result.kept_tokens[:, :-1]).all()
    assert (result.kept_tokens <= 1 + torch.tensor([37, 24, 12])).all() and (result.kept_tokens > 1).all()
    for s, per_image in enumerate(result.kept_indices):
        for b, kept in enumerate(per_image):
            assert len(kept) == result.kept_tokens[b, s] - 1
            assert (kept[1:] > kept[:-1]).all() and kept.min() >= 0 and kept.max() < 49
    assert result.gmacs.shape == (3,) and torch.isfinite(result.gmacs).all()
    assert (result.gmacs < dense).all() and (result.gmacs > 0).all()
    with torch.no_grad():
        torch.testing.assert_close(result.logits, model(images), atol=1e-6, rtol=0)


@pytest.mark.parametrize("static", [False, True])
def test_fused_linear_gmacs_fall_with_the_final_budget(zoo_images, static):
    image = zoo_images[:1]
    dense = count_gmacs(zoo_model(), image)
    gmacs = []
    for final in (36, 20, 4):
        model = apply_ats(zoo_model(), blocks=BLOCKS, budget=final, sampler="topk", schedule="linear",
                          fuse="nearest", static=static)
        gmacs.append(trace(model, image).gmacs.item())
    assert gmacs[0] < dense
    assert all(b < a for a, b in zip(gmacs[:-1], gmacs[1:], strict=True)), gmacs


# ----------------------------------------------------------------------------------------------------------- ToMe


def test_tome_on_an_ats_model_is_refused():
    from ravit.tome import apply_tome, has_tome

    for kw in (dict(fuse="nearest"), dict(static=True, budget=8), dict(budget=0.25, schedule="linear")):
        model = apply_ats(peaky_vit(), blocks=BLOCKS, **kw)
        with pytest.raises(InvalidArgumentError, match="remove_ats"):
            apply_tome(model, 2)
        assert not has_tome(model) and has_ats(model)


def test_ats_on_a_tome_model_is_refused():
    from ravit.tome import apply_tome, has_tome, remove_tome

    for kw in (dict(budget=8), dict(fuse="nearest", budget=8), dict(static=True, budget=8)):
        model = apply_tome(peaky_vit(), 2)
        with pytest.raises(InvalidArgumentError, match="ToMe"):
            apply_ats(model, blocks=BLOCKS, **kw)
        assert has_tome(model) and not has_ats(model)
        remove_tome(model)
        apply_ats(model, blocks=BLOCKS, **kw)  # fine once ToMe is removed
        remove_ats(model)


# ------------------------------------------------------------------------------------------------------- score


def _recording_topk(seen: list):
    """A Top-K sampler that records the scores it is given."""
    def sampler(scores, valid, n_samples):
        seen.append(scores.clone())
        return topk_sampling(scores, valid, n_samples)
    return sampler


@pytest.mark.parametrize("fuse", ["none", "nearest"])
def test_attention_score_is_the_class_attention_alone(images, fuse):
    """score='attention' hands the sampler the class token's attention over the patch tokens summed over heads,
    computed here from the block's own q and k; the default multiplies it by each token's value norm."""
    seen = {}
    for score in ("attention", "attention_value"):
        seen[score] = []
        model = apply_ats(peaky_vit(), blocks=[1], budget=12, sampler=_recording_topk(seen[score]), fuse=fuse,
                          score=score)
        with torch.no_grad():
            model(images)
    model = peaky_vit()
    with torch.no_grad():
        x = model.blocks[0](model._pos_embed(model.patch_embed(images)))  # (B, N, C) input of block 1
        attn = model.blocks[1].attn
        q, k, v = attn.qkv(model.blocks[1].norm1(x)).unflatten(-1, (3, attn.num_heads, -1)).unbind(2)
        cls_attn = ((q[:, :1].transpose(1, 2) @ k.permute(0, 2, 3, 1)) * attn.scale).softmax(-1).sum(1)[:, 0]
        v_norm = torch.linalg.vector_norm(v.flatten(2), dim=-1)
    torch.testing.assert_close(seen["attention"][0], cls_attn[:, 1:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(seen["attention_value"][0], (cls_attn * v_norm)[:, 1:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(budget=12), dict(budget=0.5, sampler="topk"), dict(budget=12, static=True)])
def test_attention_score_keeps_other_tokens_and_stays_batch_independent(images, kwargs):
    base = trace(apply_ats(peaky_vit(), blocks=BLOCKS, **kwargs), images, count_gmacs=False)
    model = apply_ats(peaky_vit(), blocks=BLOCKS, score="attention", **kwargs)
    assert not same_kept(trace(model, images, count_gmacs=False), base)
    assert_batch_independent(model, images)


@pytest.mark.parametrize("score", ["value", None, "attention_value_norm"])
def test_unknown_score_is_refused(score):
    with pytest.raises(InvalidArgumentError, match="unknown score"):
        apply_ats(peaky_vit(), blocks=BLOCKS, budget=12, score=score)


def _sqrt_inverse_transform(scores, valid, n_samples):
    return ravit.ats.inverse_transform_sampling(scores.clamp(min=0) ** 0.5, valid, n_samples)


@pytest.mark.parametrize("kwargs", [
    dict(budget=None),  # the ragged path
    dict(budget=12, schedule="linear", fuse="nearest"),  # the padded path
    dict(budget=[30, 20, 10], static=True),  # static shapes
])
def test_score_power_feeds_the_sampler_score_to_the_power(kwargs):
    """score_power=0.5 on every path equals inverse transform sampling of sqrt(scores), and keeps other tokens than
    the paper's power 1."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    powered = trace(apply_ats(peaky_vit(), blocks=BLOCKS, score_power=0.5, **kwargs), images, count_gmacs=False)
    by_hand = trace(apply_ats(peaky_vit(), blocks=BLOCKS, sampler=_sqrt_inverse_transform, **kwargs), images,
                    count_gmacs=False)
    paper = trace(apply_ats(peaky_vit(), blocks=BLOCKS, **kwargs), images, count_gmacs=False)
    assert torch.equal(powered.kept_tokens, by_hand.kept_tokens)
    torch.testing.assert_close(powered.logits, by_hand.logits, atol=1e-6, rtol=0)
    assert any(not torch.equal(a, b) for s in range(len(BLOCKS))
               for a, b in zip(powered.kept_indices[s], paper.kept_indices[s], strict=True))


def test_score_power_on_fan_equals_the_powered_sampler():
    import timm
    from ats_helpers import sharpen

    def fan():
        torch.manual_seed(0)
        return sharpen(timm.create_model("fan_tiny_12_p16_224", img_size=64, patch_size=8, embed_dim=32, depth=4,
                                         num_heads=2, num_classes=5))

    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    powered = trace(apply_ats(fan(), blocks=[1, 2, 3], score_power=0.5), images, count_gmacs=False)
    by_hand = trace(apply_ats(fan(), blocks=[1, 2, 3], sampler=_sqrt_inverse_transform), images, count_gmacs=False)
    assert torch.equal(powered.kept_tokens, by_hand.kept_tokens)
    torch.testing.assert_close(powered.logits, by_hand.logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("power,message", [
    (0, "score_power must be a finite number > 0"), (-1.0, "> 0"), (float("nan"), "> 0"), (float("inf"), "> 0"),
    (True, "score_power must be"), ("0.5", "score_power must be"),
])
def test_bad_score_power(power, message):
    with pytest.raises(InvalidArgumentError, match=message):
        apply_ats(peaky_vit(), blocks=BLOCKS, score_power=power)


def test_score_power_with_topk_is_refused():
    with pytest.raises(InvalidArgumentError, match="does nothing with sampler='topk'"):
        apply_ats(peaky_vit(), blocks=BLOCKS, budget=0.5, sampler="topk", score_power=0.5)
    assert apply_ats(peaky_vit(), blocks=BLOCKS, budget=0.5, sampler="topk", score_power=1).ats_config.score_power == 1


# -------------------------------------------------------------------------------------------------- redundancy


def test_redundancy_discount_by_hand():
    """Token i's score times (1 - its largest cosine similarity to a token ranked above it, clamped to [0, 1])^gamma:
    a copy of a higher token goes to 0, an orthogonal or opposite one keeps its score, ties rank the earlier token
    first, and padding neither ranks nor covers."""
    e = torch.eye(3)
    c = 2 ** -0.5  # cos 45 degrees
    # ranks: 0 (4), 1 (3), 2 (2, earlier of the tie), 4 (2), 3 (1); token 5 is padding with token 0's direction
    metric = torch.stack([e[0], e[0], e[1], -e[0], F.normalize(e[0] + e[1], dim=0), e[0]])[None]  # (1, 6, 3)
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 2.0, 9.0]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    got = ravit.ats.sampling.redundancy_discount(scores, metric, valid, 2.0)
    expected = torch.tensor([[
        4.0,  # the top token
        0.0,  # a copy of token 0
        2.0,  # orthogonal to tokens 0 and 1; token 4 (same score, later) ranks below it
        1.0,  # opposite to 0 and 1, orthogonal to 2, at -c to 4: nothing similar ranks above it
        2.0 * (1 - c) ** 2,  # at c to tokens 0, 1 and 2
    ]])
    torch.testing.assert_close(got[:, :5], expected)
    assert torch.equal(ravit.ats.sampling.redundancy_discount(scores, metric, valid, 0.0), scores)


def test_redundancy_discount_of_one_image_as_a_vector():
    """(N,) scores with (N, D) metric (the one-image route) give row 0 of the (1, N) call, bit for bit."""
    torch.manual_seed(0)
    metric = F.normalize(torch.randn(1, 50, 8), dim=-1)
    scores = torch.rand(1, 50).round(decimals=1)  # ties on purpose
    batched = ravit.ats.sampling.redundancy_discount(scores, metric, None, 6.0)
    assert torch.equal(ravit.ats.sampling.redundancy_discount(scores[0], metric[0], None, 6.0), batched[0])


def _keys_of_block(model, images, block):
    """(B, N, D) unit metric (keys averaged over heads) of ``block``'s tokens on the dense ``model``."""
    with torch.no_grad():
        x = model._pos_embed(model.patch_embed(images))
        for b in model.blocks[:block]:
            x = b(x)
        attn = model.blocks[block].attn
        k = attn.qkv(model.blocks[block].norm1(x)).unflatten(-1, (3, attn.num_heads, -1))[:, :, 1]  # (B, N, H, D)
        return F.normalize(k.mean(dim=2), dim=-1)


@pytest.mark.parametrize("kwargs", [dict(fuse="nearest"), dict(fuse="nearest", static=True), dict()])
def test_redundancy_feeds_the_sampler_discounted_scores(images, kwargs):
    """With redundancy=gamma the sampler of the first ATS block gets the paper's scores, each times (1 - the largest
    key similarity to a higher-scoring token)^gamma, computed here token by token; the kept tokens change."""
    seen = {}
    for gamma in (0.0, 3.0):
        seen[gamma] = []
        model = apply_ats(peaky_vit(), blocks=[1], budget=12, sampler=_recording_topk(seen[gamma]), redundancy=gamma,
                          **kwargs)
        with torch.no_grad():
            model(images)
    metric = _keys_of_block(peaky_vit(), images, 1)[:, 1:]  # (B, N, D) patch tokens
    plain, got = seen[0.0][0], seen[3.0][0]
    expected = plain.clone()
    for b in range(plain.shape[0]):
        for i in range(plain.shape[1]):
            above = [j for j in range(plain.shape[1]) if plain[b, j] > plain[b, i] or (plain[b, j] == plain[b, i]
                                                                                      and j < i)]
            c = max([float(metric[b, i] @ metric[b, j]) for j in above], default=0.0)
            expected[b, i] = plain[b, i] * (1 - min(max(c, 0.0), 1.0)) ** 3
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    paper = trace(apply_ats(peaky_vit(), blocks=BLOCKS, budget=12, sampler="topk", **kwargs), images,
                  count_gmacs=False)
    reduced = trace(apply_ats(peaky_vit(), blocks=BLOCKS, budget=12, sampler="topk", redundancy=3.0, **kwargs), images,
                    count_gmacs=False)
    assert not same_kept(paper, reduced)


@pytest.mark.parametrize("kwargs", [
    dict(sampler="topk", fuse="nearest", static=True), dict(sampler="inverse_transform", fuse="nearest"), dict()])
def test_redundancy_is_batch_independent(images, kwargs):
    model = apply_ats(peaky_vit(), blocks=BLOCKS, budget=0.2, schedule="linear", redundancy=6.0, **kwargs)
    assert_batch_independent(model, images)


def test_redundancy_on_fan_discounts_the_received_attention_scores():
    """On FAN the received-attention scores are discounted the same way: never raised, the top token of each image
    unchanged, some lowered; the kept tokens change and stay batch-independent."""
    import timm
    from ats_helpers import sharpen

    def fan():
        torch.manual_seed(0)
        return sharpen(timm.create_model("fan_tiny_12_p16_224", img_size=64, patch_size=8, embed_dim=32, depth=4,
                                         num_heads=2, num_classes=5))

    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    seen = {}
    for gamma in (0.0, 6.0):
        seen[gamma] = []
        with torch.no_grad():
            apply_ats(fan(), blocks=[1, 2, 3], budget=20, sampler=_recording_topk(seen[gamma]), redundancy=gamma)(
                images)
    plain, got = seen[0.0][0], seen[6.0][0]
    assert bool((got <= plain + 1e-7).all()) and bool((got < plain - 1e-4).any())
    top = plain.argmax(dim=1, keepdim=True)
    torch.testing.assert_close(got.gather(1, top), plain.gather(1, top))
    kwargs = dict(blocks=[1, 2, 3], budget=20, sampler="topk", fuse="nearest", static=True)
    model = apply_ats(fan(), redundancy=6.0, **kwargs)
    assert not same_kept(trace(model, images, count_gmacs=False), trace(apply_ats(fan(), **kwargs), images,
                                                                       count_gmacs=False))
    assert_batch_independent(model, images)


@pytest.mark.parametrize("gamma,message", [
    (-1.0, "redundancy must be a finite number >= 0"), (float("nan"), ">= 0"), (float("inf"), ">= 0"),
    (True, "redundancy must be"), ("6", "redundancy must be"),
])
def test_bad_redundancy(gamma, message):
    with pytest.raises(InvalidArgumentError, match=message):
        apply_ats(peaky_vit(), blocks=BLOCKS, redundancy=gamma)
