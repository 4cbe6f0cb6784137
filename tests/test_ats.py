"""ATS plug-in: parity with the released code, batch independence, budgets, samplers, patching, gradients, errors."""

from __future__ import annotations

import pytest
import timm
import torch
from ats_helpers import peaky_vit
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

import ravit
from ravit.ats import UnsupportedModelError, apply_ats, has_ats, remove_ats, trace
from ravit.ats.sampling import class_attention_scores, topk_sampling
from ravit.bench.flops import count_gmacs
from ravit.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------------- parity


def _fixture_model(data, case) -> VisionTransformer:
    """The vit_ats case's ViT (manifest spec) with the fixture weights loaded strictly."""
    model = VisionTransformer(
        img_size=case["img_size"], patch_size=case["patch_size"], embed_dim=case["embed_dim"], depth=case["depth"],
        num_heads=case["num_heads"], num_classes=case["num_classes"], qkv_bias=case["qkv_bias"],
    )
    prefix = case["weights_prefix"]
    model.load_state_dict({k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def fixture_run(parity_dir, parity_manifest):
    """The vit_ats case run through ravit: (trace of the fixture input, fixture tensors)."""
    case = parity_manifest["vit_ats"]
    data = load_file(parity_dir / "vit_ats.safetensors")
    model = apply_ats(_fixture_model(data, case), blocks=case["ats_blocks"])
    return trace(model, data["input"], count_gmacs=False), data


def test_fixture_parity_all_stages(fixture_run):
    """Every ATS stage: the released code's kept tokens (each image alone) and its logits within 1e-5."""
    result, data = fixture_run
    assert torch.equal(result.kept_tokens, data["kept_tokens"].long())
    torch.testing.assert_close(result.logits, data["logits"], atol=1e-5, rtol=0)


def test_released_code_is_batch_dependent_and_ravit_is_not(fixture_run, parity_manifest):
    """The released code's counts for the same images change when batched; ravit's equal the per-image ones."""
    result, data = fixture_run
    assert not torch.equal(data["kept_tokens_batched"], data["kept_tokens"])
    model = apply_ats(_fixture_model(data, parity_manifest["vit_ats"]), blocks=parity_manifest["vit_ats"]["ats_blocks"])
    alone = torch.cat([trace(model, x[None], count_gmacs=False).kept_tokens for x in data["input"]])
    assert torch.equal(alone, result.kept_tokens)
    assert torch.equal(alone, data["kept_tokens"].long())


# ---------------------------------------------------------------------------------------- batch independence


@pytest.mark.parametrize("budget", [None, 0.5, 12])
@pytest.mark.parametrize("sampler", ["inverse_transform", "topk"])
def test_batch_independence(images, budget, sampler):
    model = apply_ats(peaky_vit(), blocks=[1, 2, 3], budget=budget, sampler=sampler)
    batched = trace(model, images, count_gmacs=False)
    if budget is None and sampler == "inverse_transform":
        assert len(set(batched.kept_tokens[:, -1].tolist())) > 1, "images should keep different token counts"
    for i in range(len(images)):
        alone = trace(model, images[i : i + 1], count_gmacs=False)
        assert torch.equal(alone.kept_tokens[0], batched.kept_tokens[i])
        for stage in range(len(model.ats_config.blocks)):
            assert torch.equal(alone.kept_indices[stage][0], batched.kept_indices[stage][i])
        # The dense timm ViT itself is not bitwise batch-invariant on CPU BLAS; rounding level is the bar.
        torch.testing.assert_close(alone.logits[0], batched.logits[i], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- patching


def test_state_dict_keys_and_weights_unchanged():
    model = peaky_vit()
    before = model.state_dict()
    apply_ats(model, blocks=[1, 3])
    after = model.state_dict()
    assert list(before) == list(after)
    assert all(before[k] is after[k] or torch.equal(before[k], after[k]) for k in before)
    model.load_state_dict(peaky_vit(seed=3).state_dict(), strict=True)  # weights load into a patched model


def test_remove_ats_round_trip(images):
    model = peaky_vit()
    host_class = type(model)
    dense = model(images)
    apply_ats(model, blocks=[1, 2, 3], budget=0.3)
    assert has_ats(model) and type(model) is not host_class
    assert not torch.allclose(model(images), dense)
    assert remove_ats(model) is model
    assert type(model) is host_class and not has_ats(model) and not hasattr(model, "ats_config")
    assert torch.equal(model(images), dense)
    apply_ats(model, blocks=[2])  # can be applied again after removal
    assert has_ats(model)


def test_forward_returns_what_it_did(images):
    model = peaky_vit()
    dense = model(images)
    apply_ats(model, blocks=[1, 2])
    out = model(images)
    assert out.shape == dense.shape and out.dtype == dense.dtype
    features = model.forward_features(images)
    assert features.shape[0] == len(images) and features.shape[2] == model.embed_dim


@pytest.mark.parametrize("sampler", ["topk", lambda scores, valid, n: valid])
def test_keep_everything_equals_plain_model(images, sampler):
    model = peaky_vit()
    dense = model(images)
    apply_ats(model, blocks=[0, 1, 2, 3], budget=None, sampler=sampler)
    result = trace(model, images, count_gmacs=False)
    assert (result.kept_tokens == 1 + 64).all()
    torch.testing.assert_close(result.logits, dense, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------- token counts


@pytest.mark.parametrize(
    "name,kwargs,prefix",
    [
        ("vit", {}, 1),
        ("deit_distilled", {}, 2),
        ("vit_registers", dict(reg_tokens=4, no_embed_class=True), 5),
    ],
)
def test_counts_never_grow_and_prefix_tokens_stay(images, name, kwargs, prefix):
    if name == "deit_distilled":
        torch.manual_seed(0)
        model = timm.create_model(
            "deit_tiny_distilled_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
            num_classes=5,
        ).eval()
    else:
        model = peaky_vit(**kwargs)
    assert model.num_prefix_tokens == prefix
    dense = model(images)
    apply_ats(model, blocks=[0, 1, 2, 3], budget=[None, 40, 0.9, 50])  # budgets need not be monotone
    result = trace(model, images, count_gmacs=False)
    assert result.logits.shape == dense.shape
    counts = result.kept_tokens
    assert (counts[:, 1:] <= counts[:, :-1]).all()
    assert (counts <= prefix + 64).all() and (counts > prefix).all()
    for stage, per_image in enumerate(result.kept_indices):
        for b, kept in enumerate(per_image):
            assert len(kept) == counts[b, stage] - prefix  # prefix tokens are always among the kept
            assert (kept[1:] > kept[:-1]).all() and kept.min() >= 0 and kept.max() < 64
            if stage:  # a token dropped earlier never comes back
                assert set(kept.tolist()) <= set(result.kept_indices[stage - 1][b].tolist())


@pytest.mark.parametrize("sampler", ["inverse_transform", "topk"])
def test_budget_below_token_count(images, sampler):
    """K < N: at most K patch tokens kept per block (K' <= K); top-K keeps exactly K."""
    model = apply_ats(peaky_vit(), blocks=[2], budget=10, sampler=sampler)
    single = trace(model, images, count_gmacs=False).kept_tokens[:, 0] - 1
    assert (single <= 10).all() and (single >= 1).all()
    if sampler == "topk":
        assert (single == 10).all()
    remove_ats(model)
    apply_ats(model, blocks=[1, 2, 3], budget=[0.5, 0.5, 4], sampler=sampler)  # multi-stage
    counts = trace(model, images, count_gmacs=False).kept_tokens - 1
    assert (counts[:, 0] <= 32).all()
    assert (counts[:, 1] <= torch.round(counts[:, 0] * 0.5)).all()
    assert (counts[:, 2] <= 4).all()
    if sampler == "topk":
        assert (counts[:, 0] == 32).all() and (counts[:, 1] == 16).all() and (counts[:, 2] == 4).all()


def test_topk_keeps_the_highest_scores(images):
    """Top-K inside the model keeps the tokens with the largest class-attention x value-norm scores."""
    model = peaky_vit()
    block = model.blocks[1]
    with torch.no_grad():
        x = model.blocks[0](model._pos_embed(model.patch_embed(images)))  # (B, N, C)
        B, N, C = x.shape
        qkv = block.attn.qkv(block.norm1(x)).reshape(B, N, 3, 3, 16).permute(2, 0, 3, 1, 4)
        scores = class_attention_scores(qkv[0][:, :, 0], qkv[1], qkv[2], block.attn.scale)[:, 1:]  # (B, 64)
    expected = topk_sampling(scores, torch.ones_like(scores, dtype=torch.bool), torch.full((B,), 7))
    apply_ats(model, blocks=[1], budget=7, sampler="topk")
    result = trace(model, images, count_gmacs=False)
    for b in range(B):
        assert torch.equal(result.kept_indices[0][b], expected[b].nonzero().flatten())
        assert scores[b, expected[b]].min() >= scores[b, ~expected[b]].max()


# -------------------------------------------------------------------------------------- GMACs and gradients


def test_gmacs_are_counted_per_image(images):
    model = peaky_vit()
    dense = count_gmacs(model, images[:1])
    apply_ats(model, blocks=[1, 2, 3], budget=0.5)
    result = trace(model, images[:3])
    assert result.gmacs.shape == (3,)
    assert (result.gmacs < dense).all()
    assert result.gmacs[1].item() == pytest.approx(count_gmacs(model, images[1:2]), rel=1e-9)


def test_dropped_tokens_leave_the_computation(images):
    """qkv runs on the tokens entering an ATS block, attention on kept queries x entering keys, the rest on kept."""
    from torch.utils.flop_counter import FlopCounterMode

    model = apply_ats(peaky_vit(), blocks=[1, 2], budget=20)
    image = images[:1]
    n1, n2 = trace(model, image, count_gmacs=False).kept_tokens[0].tolist()  # tokens leaving blocks 1, 2
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    by_module = counter.get_flop_counts().items()
    counts = {name.split(".", 1)[1]: sum(ops.values()) for name, ops in by_module if "." in name}
    C, hidden = 48, 192
    for block, n_in, n_out in [(1, 65, n1), (2, n1, n2), (3, n2, n2)]:
        assert counts[f"blocks.{block}.attn.qkv"] == 2 * n_in * C * 3 * C
        assert counts[f"blocks.{block}.attn.proj"] == 2 * n_out * C * C
        assert counts[f"blocks.{block}.mlp"] == 2 * 2 * n_out * C * hidden
    attention = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "attention" in str(op))
    pairs = 65 * 65 + n1 * 65 + n2 * n1 + n2 * n2  # (queries x keys) of blocks 0..3: kept queries only
    assert attention == 4 * C * pairs


def test_ragged_attention_strategies_agree():
    """Image-by-image (CPU) and padded-with-key-mask (other devices) attention give the same packed result."""
    from ravit.ats.block import _attention

    gen = torch.Generator().manual_seed(0)
    q_len, kv_len = torch.tensor([3, 5, 1]), torch.tensor([7, 5, 2])
    q = torch.randn(int(q_len.sum()), 2, 4, generator=gen)
    k, v = torch.randn(2, int(kv_len.sum()), 2, 4, generator=gen)
    loop = _attention(q, k, v, q_len, kv_len, 0.0, padded=False)
    padded = _attention(q, k, v, q_len, kv_len, 0.0, padded=True)
    assert loop.shape == (9, 8)
    torch.testing.assert_close(loop, padded)
    start = 3 + 5  # the last image alone
    alone = torch.nn.functional.scaled_dot_product_attention(
        q[8:].transpose(0, 1)[None], k[12:].transpose(0, 1)[None], v[12:].transpose(0, 1)[None]
    )[0].transpose(0, 1).flatten(1)
    torch.testing.assert_close(loop[start:], alone)


def test_fine_tuning_reaches_every_weight(images):
    model = peaky_vit(drop_path_rate=0.1).train()
    apply_ats(model, blocks=[1, 2, 3], budget=0.5)
    loss = torch.nn.functional.cross_entropy(model(images), torch.arange(len(images)) % 5)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_grad_checkpointing_matches(images):
    model = peaky_vit().train()
    apply_ats(model, blocks=[1, 3], budget=0.6)
    plain = model(images)
    model.set_grad_checkpointing(True)
    checkpointed = model(images)
    checkpointed.sum().backward()
    torch.testing.assert_close(plain, checkpointed)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(blocks=[4]), "block 4 is out of range"),
        (dict(blocks=[-1]), "out of range"),
        (dict(blocks=[]), "empty"),
        (dict(blocks=[1, 1]), "unique"),
        (dict(blocks=[1], budget=0), "out of range"),
        (dict(blocks=[1], budget=-3), "out of range"),
        (dict(blocks=[1], budget=65), "1..64"),
        (dict(blocks=[1], budget=0.0), r"\(0, 1\]"),
        (dict(blocks=[1], budget=1.5), r"\(0, 1\]"),
        (dict(blocks=[1], budget=True), "budget must be"),
        (dict(blocks=[1], budget="all"), "budget must be"),
        (dict(blocks=[1, 2], budget=[0.5]), "one per block"),
        (dict(blocks=[1], sampler="random"), "unknown sampler"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = peaky_vit()
    with pytest.raises(ValueError, match=match):
        apply_ats(model, **kwargs)
    assert not has_ats(model) and type(model) is VisionTransformer


def test_apply_twice_and_remove_without_ats():
    model = apply_ats(peaky_vit(), blocks=[1])
    with pytest.raises(ValueError, match="already applied"):
        apply_ats(model, blocks=[2])
    remove_ats(model)
    with pytest.raises(ValueError, match="no ATS applied"):
        remove_ats(model)
    with pytest.raises(ValueError, match="apply_ats"):
        trace(model, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: peaky_vit(class_token=False, global_pool="avg"), id="global-pool-vit"),
        pytest.param(lambda: peaky_vit(global_pool="avg"), id="avg-pool-with-cls"),
        pytest.param(lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), id="not-a-vit"),
    ],
)
def test_unsupported_models(model):
    with pytest.raises(UnsupportedModelError, match="ATS supports timm VisionTransformer"):
        apply_ats(model())


def test_unsupported_block_type():
    from timm.models.vision_transformer import ResPostBlock

    model = peaky_vit(block_fn=ResPostBlock)
    with pytest.raises(UnsupportedModelError, match="ResPostBlock"):
        apply_ats(model, blocks=[2])


def test_public_exports():
    assert ravit.apply_ats is apply_ats and ravit.remove_ats is remove_ats
    assert callable(ravit.ats.trace)


# ----------------------------------------------------------------------------- budget rule and hostile input


@pytest.mark.parametrize(
    "budget,expected",
    [(3.0, 3), (64.0, 64), (1.0, 1.0), (1, 1), (0.5, 0.5), ([None, 4.0, 0.5], (None, 4, 0.5))],
)
def test_budget_rule_whole_floats_count_tokens(budget, expected):
    """A float above 1 is a token count only when whole (3.0 -> 3); 1.0 stays the ratio 'all', 1 one token."""
    model = apply_ats(peaky_vit(), blocks=[1, 2, 3], budget=budget)
    expected = expected if isinstance(expected, tuple) else (expected,) * 3
    assert model.ats_config.budgets == expected
    assert [type(b) for b in model.ats_config.budgets] == [type(b) for b in expected]


@pytest.mark.parametrize(
    "budget,match",
    [
        (2.5, r"2\.5 is out of range.*token count \(an integer >= 1\) or a ratio in \(0, 1\]"),
        (64.5, "never rounded"),
        (float("nan"), "out of range"),
        (float("inf"), "out of range"),
        (0.005, "leaves no patch token"),  # round(64 x 0.005) = 0 tokens at the first ATS block
        ([0.5, 0.02, 0.5], "block 3 leaves no patch token"),  # 64 -> 32 -> 1 -> round(0.5) = 0
    ],
)
def test_budget_that_is_no_count_or_keeps_nothing_is_refused(budget, match):
    model = peaky_vit()
    with pytest.raises(InvalidArgumentError, match=match):
        apply_ats(model, blocks=[1, 2, 3], budget=budget)
    assert not has_ats(model)


def test_parse_budget():
    from ravit.ats import parse_budget
    assert parse_budget("none") is None and parse_budget("ALL") is None
    assert parse_budget("3") == 3 and isinstance(parse_budget("3"), int)
    assert parse_budget("1") == 1 and isinstance(parse_budget("1"), int)
    assert parse_budget("1.0") == 1.0 and isinstance(parse_budget("1.0"), float)
    assert parse_budget("2.5") == 2.5  # parsed as written; apply_ats refuses it
    for bad in ("lots", "nan", "inf", ""):
        with pytest.raises(InvalidArgumentError, match="a budget is"):
            parse_budget(bad)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_images_are_refused(images, dtype):
    """uint8 pixels must not run through an ATS model: a clear error that says to pass float images."""
    model = apply_ats(peaky_vit(), blocks=[1, 2, 3], budget=0.5)
    pixels = (images.clamp(0, 1) * 255).to(dtype)
    with pytest.raises(InvalidArgumentError, match="expected float images"):
        model(pixels)
    with pytest.raises(InvalidArgumentError, match="expected float images"):
        trace(model, pixels)


@pytest.mark.parametrize("shape,match", [((3, 32, 32), r"\(B, C, H, W\)"), ((2, 1, 32, 32), "3 input channels")])
def test_badly_shaped_images_are_refused(shape, match):
    model = apply_ats(peaky_vit(), blocks=[1])
    with pytest.raises(InvalidArgumentError, match=match):
        model(torch.randn(shape))


@pytest.mark.parametrize("budget", [None, 0.5, 3])
def test_empty_batch_gives_an_empty_result_like_the_dense_model(budget):
    model = peaky_vit()
    empty = torch.zeros(0, 3, 32, 32)
    with torch.no_grad():
        dense = model(empty)
        apply_ats(model, blocks=[1, 2, 3], budget=budget)
        out = model(empty)
    assert dense.shape == out.shape == (0, 5)
    result = trace(model, empty)
    assert result.logits.shape == (0, 5) and result.kept_tokens.shape == (0, 3) and result.gmacs.shape == (0,)
    assert result.kept_indices == [[], [], []]


def test_custom_sampler_must_keep_a_token(images):
    def keep_none(scores, valid, n_samples):
        return torch.zeros_like(valid)

    def not_a_mask(scores, valid, n_samples):
        return scores

    for sampler, match in ((keep_none, "kept no patch token"), (not_a_mask, "bool mask")):
        model = apply_ats(peaky_vit(), blocks=[1, 2], sampler=sampler)
        with pytest.raises(InvalidArgumentError, match=match):
            model(images)
    model = apply_ats(peaky_vit(), blocks=[1, 2], sampler=lambda s, v, n: topk_sampling(s, v, n))
    assert model(images).shape == (6, 5)
