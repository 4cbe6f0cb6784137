"""ATS on timm's Eva (rotary position embedding) and Beit (relative position bias) hosts: dense parity when nothing is
dropped, a by-hand reference when tokens are dropped, batch independence, static shapes and export, trace, fusion,
patching, gradients, and the hosts (and ToMe on them) that are refused."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from ats_helpers import assert_batch_independent, sharpen
from timm.models.beit import Beit
from timm.models.eva import Eva

from ravit.ats import SUPPORTED, UnsupportedModelError, apply_ats, has_ats, remove_ats, trace
from ravit.ats.sampling import topk_sampling
from ravit.bench.flops import count_gmacs

SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
NUM_PATCHES = 64


def _eva(**kwargs) -> Eva:
    return Eva(**{**SMALL, "use_rot_pos_emb": True, "global_pool": "token", **kwargs})


def _beit(**kwargs) -> Beit:
    return Beit(**{**SMALL, "global_pool": "token", **kwargs})


BUILDERS = {  # name: (factory, its settings)
    # timm's registered EVA-02 recipe (SwiGLU, scale norm in the MLP, rotary 'cat' embedding), made small
    "eva02": (lambda **kw: timm.create_model("eva02_tiny_patch14_224", pretrained=False, **kw),
              dict(SMALL, global_pool="token")),
    "eva_reg_layerscale_unfused": (_eva, dict(num_reg_tokens=2, init_values=0.5, qkv_fused=False,
                                              scale_attn_inner=True)),
    "eva_rope_mixed": (_eva, dict(rope_type="mixed")),
    "beit": (_beit, dict(use_rel_pos_bias=True)),
    "beit_shared": (_beit, dict(use_shared_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1)),
    "beit_both": (_beit, dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=True)),
}
MAIN = ["eva02", "beit", "beit_shared"]


def peaky(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A small random host (``BUILDERS[name]``, ``kwargs`` on top) whose weights are large enough (as ``peaky_vit``
    in tests/test_ats.py) that images keep different tokens; BEiT's relative-position tables (zero at init) are
    drawn too, so positions matter."""
    factory, settings = BUILDERS[name]
    torch.manual_seed(seed)
    return sharpen(factory(**{**settings, **kwargs}), seed)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_positions_matter_in_the_test_models(images):
    """Guard for the parity tests below: without its rotary embedding / relative bias a test model's output moves."""
    for name in BUILDERS:
        model = peaky(name)
        with torch.no_grad():
            dense = model(images)
            blind = copy.deepcopy(model)
            if isinstance(blind, Eva):
                blind.rope = None
            else:
                for p_name, p in blind.named_parameters():
                    if "relative_position_bias_table" in p_name:
                        p.zero_()
            assert (blind(images) - dense).abs().max() > 1e-2, name


# ------------------------------------------------------------------------------------------- dense parity


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("sampler", ["topk", lambda scores, valid, n: valid])
def test_keep_everything_equals_the_dense_host(images, name, sampler):
    model = peaky(name)
    with torch.no_grad():
        dense = model(images)
        apply_ats(model, blocks=[0, 1, 2, 3], budget=NUM_PATCHES, sampler=sampler)
        result = trace(model, images, count_gmacs=False)
    assert (result.kept_tokens == model.num_prefix_tokens + NUM_PATCHES).all()
    torch.testing.assert_close(result.logits, dense, atol=1e-5, rtol=0)


def test_keep_everything_with_patch_dropout_in_training_equals_the_dense_host(images):
    """Eva's patch dropout hands the blocks a per-image rotary table (B, 1, N', E); ATS gathers from it by id."""
    model = peaky("eva02", patch_drop_rate=0.5).train()
    torch.manual_seed(7)
    dense = model(images)
    apply_ats(model, blocks=[1, 2, 3], budget=NUM_PATCHES, sampler="topk")
    torch.manual_seed(7)
    torch.testing.assert_close(model(images), dense, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- reference with dropping


def _capture_class_scores(model: torch.nn.Module, block: torch.nn.Module, run) -> torch.Tensor:
    """Class-attention x value-norm scores (ATS Eq. 3) of ``block`` as the host computes them: the attention
    probabilities are read from timm's own unfused attention (what it hands its ``attn_drop``), the values recomputed
    from the block's weights."""
    attn = block.attn
    probs, values = [], []
    hooks = [
        attn.attn_drop.register_forward_hook(lambda m, args, out: probs.append(out)),
        block.norm1.register_forward_hook(lambda m, args, out: values.append(_values(attn, out))),
    ]
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        run()
    finally:
        attn.fused_attn = fused
        for hook in hooks:
            hook.remove()
    return probs[0][:, :, 0, :].sum(dim=1) * values[0].norm(dim=-1)  # (B, N)


def _values(attn: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """(B, N, A) values of a timm Eva / BEiT attention (the heads side by side)."""
    if getattr(attn, "v_proj", None) is not None:
        return attn.v_proj(h)
    A = attn.qkv.weight.shape[0] // 3
    return F.linear(h, attn.qkv.weight[2 * A:], attn.v_bias)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_dropping_equals_a_reference_on_the_kept_tokens(images, name, static):
    """Top-K at block 2 of 4: the kept ids are the K highest class-attention x value-norm scores of that block, and
    the logits equal the host's own blocks run on the kept tokens at their original positions. Eva: the last block
    runs on the kept tokens alone with their rows of the rotary table; BEiT: the last block runs with the dropped
    keys masked out, every token at its own position (its bias table covers the full grid only)."""
    K = 10
    model = peaky(name)
    P = model.num_prefix_tokens
    with torch.no_grad():
        dense = model(images)
        if isinstance(model, Eva):
            x, rope = model._pos_embed(model.patch_embed(images))
            x = model.norm_pre(x)

            def kwargs(i):
                return dict(rope=rope[i] if model.rope_mixed else rope)
        else:
            x = torch.cat([model.cls_token.expand(len(images), -1, -1), model.patch_embed(images)], dim=1)
            x = x if model.pos_embed is None else x + model.pos_embed
            shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None

            def kwargs(i):
                return dict(shared_rel_pos_bias=shared)
        for i in range(2):
            x = model.blocks[i](x, **kwargs(i))
        block = model.blocks[2]
        scores = _capture_class_scores(model, block, lambda: block(x, **kwargs(2)))[:, P:]  # (B, 64)
        kept = topk_sampling(scores, torch.ones_like(scores, dtype=torch.bool), torch.full((len(images),), K))
        x = block(x, **kwargs(2))  # each row attends to every key: the kept rows are what ATS computes
        if isinstance(model, Eva):
            ids = [row.nonzero().flatten() for row in kept]  # (K,) each, ascending
            x = torch.stack([torch.cat([x[b, :P], x[b, P + ids[b]]]) for b in range(len(images))])  # (B, P + K, C)
            table = kwargs(3)["rope"]  # (N, E) or (H, N, E)
            rows = torch.stack([table[..., ids[b], :] for b in range(len(images))])  # (B, [H,] K, E)
            x = model.blocks[3](x, rope=rows if rows.ndim == 4 else rows[:, None])
        else:
            mask = torch.zeros(len(images), 1, 1, P + NUM_PATCHES)
            mask[:, 0, 0, P:] = torch.where(kept, 0.0, float("-inf"))
            x = model.blocks[3](x, shared_rel_pos_bias=mask if shared is None else shared + mask)
        reference = model.forward_head(model.norm(x))

        apply_ats(model, blocks=[2], budget=K, sampler="topk", static=static)
        result = trace(model, images, count_gmacs=False)
    for b in range(len(images)):
        assert torch.equal(result.kept_indices[0][b], kept[b].nonzero().flatten())
    torch.testing.assert_close(result.logits, reference, atol=1e-5, rtol=0)
    assert (result.logits - dense).abs().max() > 1e-3  # dropping tokens changed the logits


# ---------------------------------------------------------------------------------------- batch independence


@pytest.mark.parametrize("name", MAIN)
@pytest.mark.parametrize("budget,static,redundancy", [(None, False, 0.0), (0.5, False, 0.0), (12, True, 0.0),
                                                      (12, True, 6.0)])
def test_batch_independence(images, name, budget, static, redundancy):
    model = apply_ats(peaky(name), blocks=[1, 2, 3], budget=budget, static=static, redundancy=redundancy)
    if budget is None:
        kept = trace(model, images, count_gmacs=False).kept_tokens[:, -1]
        assert len(set(kept.tolist())) > 1, "images should keep different token counts"
    assert_batch_independent(model, images)


# ---------------------------------------------------------------------------------------- static and export


@pytest.mark.parametrize("name", MAIN)
def test_static_shapes_depend_on_the_budget_only(images, name):
    model = apply_ats(peaky(name), blocks=[1, 3], budget=[20, 7], static=True, sampler="inverse_transform")
    P = model.num_prefix_tokens
    with torch.no_grad():
        for batch in (images[:1], images):
            assert model.forward_features(batch).shape == (len(batch), P + 7, 48)
    counts = trace(model, images, count_gmacs=False).kept_tokens
    assert (counts <= P + torch.tensor([20, 7])).all() and (counts > P).all()


@pytest.mark.parametrize("name", ["eva02", "eva_rope_mixed", "beit_both"])
def test_static_model_exports(images, name):
    model = apply_ats(peaky(name), blocks=[1, 2], budget=[24, 9], static=True)
    exported = torch.export.export(model, (images[:2],))
    other = images[3:5]
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(other), model(other), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ trace, fusion, patching


@pytest.mark.parametrize("name", MAIN)
def test_trace_counts_tokens_and_gmacs(images, name):
    model = peaky(name)
    dense = count_gmacs(model, images[:1])
    apply_ats(model, blocks=[1, 2, 3], budget=0.5)
    result = trace(model, images[:3])
    counts = result.kept_tokens
    assert counts.shape == (3, 3) and (counts[:, 1:] <= counts[:, :-1]).all()
    assert (counts - model.num_prefix_tokens <= torch.tensor([32, 16, 8])).all()
    for stage, per_image in enumerate(result.kept_indices):
        for b, kept in enumerate(per_image):
            assert len(kept) == counts[b, stage] - model.num_prefix_tokens
            assert (kept[1:] > kept[:-1]).all() and kept.min() >= 0 and kept.max() < NUM_PATCHES
    assert (result.gmacs < dense).all()


@pytest.mark.parametrize("name", MAIN)
@pytest.mark.parametrize("static", [False, True])
def test_fuse_nearest_runs(images, name, static):
    model = apply_ats(peaky(name), blocks=[1, 2], budget=[30, 10] if static else 0.5, fuse="nearest", static=static)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (6, 5) and torch.isfinite(out).all()
    alone = torch.cat([model(images[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(alone, out[:2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MAIN)
def test_remove_ats_restores_the_dense_host_and_state_dict_is_unchanged(images, name):
    model = peaky(name)
    host_class = type(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(images)
        apply_ats(model, blocks=[1, 2, 3], budget=0.3)
        after = model.state_dict()
        assert list(before) == list(after)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert has_ats(model) and not torch.allclose(model(images), dense)
        model.load_state_dict(peaky(name, seed=3).state_dict(), strict=True)
        model.load_state_dict(before, strict=True)
        assert remove_ats(model) is model
        assert type(model) is host_class and not has_ats(model)
        assert torch.equal(model(images), dense)


@pytest.mark.parametrize("name", MAIN)
def test_fine_tuning_reaches_every_weight_and_checkpointing_matches(images, name):
    model = peaky(name).train()
    apply_ats(model, blocks=[1, 2, 3], budget=0.5)
    plain = model(images)
    model.set_grad_checkpointing(True)
    checkpointed = model(images)
    torch.testing.assert_close(plain, checkpointed)
    F.cross_entropy(checkpointed, torch.arange(len(images)) % 5).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


# ------------------------------------------------------------------------------------------------ refused


def _names_every_host(message: str) -> None:
    assert message.startswith("ATS supports timm VisionTransformer")
    for host in ("VisionTransformer", "Eva", "Beit"):
        assert host in message


@pytest.mark.parametrize(
    "build,match",
    [
        pytest.param(lambda: Eva(**SMALL, class_token=False, use_rot_pos_emb=True), "has no class token",
                     id="eva-no-class-token"),
        pytest.param(lambda: Eva(**SMALL, use_rot_pos_emb=True), "pools with 'avg'", id="eva-avg-pool"),
        pytest.param(lambda: Eva(**SMALL, global_pool="map"), "pools with 'map'", id="eva-attention-pool"),
        pytest.param(lambda: Beit(**SMALL, use_rel_pos_bias=True), "pools with 'avg'", id="beit-avg-pool"),
        pytest.param(lambda: Eva(**SMALL, global_pool="token", use_post_norm=True), "EvaBlockPostNorm",
                     id="eva-post-norm"),
        pytest.param(lambda: Eva(**SMALL, global_pool="token", attn_type="rope"), "EvaBlock with AttentionRope",
                     id="eva-attention-rope"),
        pytest.param(lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), "got Sequential", id="not-a-host"),
    ],
)
def test_unsupported_hosts_name_every_supported_host(build, match):
    model = build()
    with pytest.raises(UnsupportedModelError, match=match) as err:
        apply_ats(model, blocks=[1])
    _names_every_host(str(err.value))
    assert not has_ats(model)


def test_supported_text_names_every_host():
    _names_every_host(SUPPORTED)


@pytest.mark.parametrize("name,position", [("eva02", "rotary position embedding"),
                                           ("beit", "relative position bias")])
def test_tome_refuses_eva_and_beit_with_the_reason(name, position):
    from ravit.tome import apply_tome, has_tome

    model = peaky(name)
    with pytest.raises(UnsupportedModelError, match=position) as err:
        apply_tome(model, r=4)
    assert "merged token" in str(err.value) and not has_tome(model)
