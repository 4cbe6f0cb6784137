"""ATS and ToMe on FAN-ViT and FAN-Hybrid (ravit.ats.fan, ravit.tome.fan): dense parity when nothing is dropped or
merged, a by-hand reference where dropped tokens are grid rows (their positions then held by the nearest kept
token), batch independence, static shapes, merging bookkeeping, GMACs, and the FAN models that are refused."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from ats_helpers import assert_batch_independent, sharpen

from ravit.ats import UnsupportedModelError, apply_ats, remove_ats, trace
from ravit.ats.fan import _grid_mlp, dense_slots, mixing_forward
from ravit.ats.sampling import topk_sampling
from ravit.bench.flops import count_gmacs
from ravit.errors import InvalidArgumentError
from ravit.layers.channel_processing import channel_attention_gate
from ravit.tome import apply_tome, remove_tome
from ravit.tome.fan import merge_slots
from ravit.tome.matching import Matching

GRID = (8, 8)  # 64×64 images, stride 8
SMALL = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)


def _fan_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return sharpen(timm.create_model("fan_tiny_12_p16_224", **SMALL))


def _fan_hybrid() -> torch.nn.Module:
    torch.manual_seed(0)
    return sharpen(timm.create_model("test_fan_hybrid", num_classes=5))


def _keep_all(scores, valid, n_samples):
    return valid.clone()


BUILDERS = {"fan_vit": _fan_vit, "fan_hybrid": _fan_hybrid}


@pytest.mark.parametrize("name", BUILDERS)
def test_keeping_every_token_is_the_dense_model(name):
    model = BUILDERS[name]()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        dense = model(x)
        apply_ats(model, blocks=range(1, len(model.blocks)), sampler=_keep_all)
        torch.testing.assert_close(model(x), dense, atol=1e-5, rtol=0)
        remove_ats(model)
        apply_tome(model, 0)
        torch.testing.assert_close(model(x), dense, atol=1e-5, rtol=0)


def _rows_sampler(rows_kept: list[int]):
    """Keeps, for image b, the first ``rows_kept[b]`` grid rows (and nothing else)."""
    def keep(scores, valid, n_samples):
        out = torch.zeros_like(valid)
        for b, rows in enumerate(rows_kept):
            out[b, : rows * GRID[1]] = True
        return out & valid
    return keep


def _channel_processing_filled(blk, x, rows):
    """Channel processing of the first ``rows`` grid rows when the rows below were dropped, by hand: the depthwise
    convs see the full grid with each dropped position holding the kept token above it in the last kept row (its
    nearest kept token: replicate padding downwards), and that token's conv output is the mean over its column."""
    H, W = GRID
    cp = blk.mlp
    mlp = cp.mlp_v
    z = blk.norm2(x)  # (1, rows·W, C)
    gate = channel_attention_gate(cp.q(z), z, cp.temperature)  # over the kept tokens only
    h = mlp.fc1(z)  # (1, rows·W, E)
    grid = F.pad(h.transpose(1, 2).reshape(1, -1, rows, W), (0, 0, 0, H - rows), mode="replicate")  # (1, E, H, W)
    y = mlp.dwconv(grid.flatten(2).transpose(1, 2), GRID, out_scale=mlp.gamma)  # (1, H·W, E)
    y = y.view(1, H, W, -1)
    y = torch.cat([y[:, : rows - 1], y[:, rows - 1 :].mean(dim=1, keepdim=True)], dim=1).flatten(1, 2)
    v = cp.norm_v(mlp.fc2(y + h))
    return x + blk.gamma2 * v * gate


def _reference(model, image, block, rows):
    """FAN with ATS at ``block`` keeping the first ``rows`` grid rows, by hand: dense up to that block's token mixing
    (all queries), then only those rows through token mixing, channel processing as above and class attention."""
    x, hw = model._embed(image)
    for blk in model.blocks[:block]:
        x, hw = blk(x, hw)
    blk = model.blocks[block]
    x = (x + blk.gamma1 * blk.attn(blk.norm1(x)))[:, : rows * GRID[1]]
    x = _channel_processing_filled(blk, x, rows)
    for blk in model.blocks[block + 1 :]:
        x = _channel_processing_filled(blk, x + blk.gamma1 * blk.attn(blk.norm1(x)), rows)
    return model.forward_head(model.norm(model._class_attention(x)))


@pytest.mark.parametrize("block", [1, 3])
def test_dropped_positions_are_held_by_the_nearest_kept_token(block):
    model = _fan_vit()
    x = torch.randn(2, 3, 64, 64)
    rows = [5, 3]  # different counts: image 1's slots are padded in the batch
    with torch.no_grad():
        apply_ats(model, blocks=[block], sampler=_rows_sampler(rows))
        out = model(x)
        remove_ats(model)
        for b in range(2):
            torch.testing.assert_close(out[b : b + 1], _reference(model, x[b : b + 1], block, rows[b]), atol=1e-5,
                                       rtol=0)


@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize("sampler", ["inverse_transform", "topk"])
def test_batch_independent_and_images_differ(name, sampler):
    model = BUILDERS[name]()
    apply_ats(model, blocks=range(1, len(model.blocks)), budget=0.7 if sampler == "topk" else None, sampler=sampler)
    x = torch.randn(4, 3, 64, 64) * torch.tensor([0.5, 1.0, 2.0, 4.0])[:, None, None, None]
    assert_batch_independent(model, x)
    if sampler == "inverse_transform":  # adaptive: the images keep different numbers of tokens
        assert len(set(trace(model, x, count_gmacs=False).kept_tokens[:, -1].tolist())) > 1


def test_trace_counts_fewer_gmacs_and_kept_ids_are_grid_positions():
    model = _fan_vit()
    x = torch.randn(2, 3, 64, 64)
    dense = count_gmacs(model, x[:1])
    apply_ats(model, blocks=[1, 2, 3], budget=0.5, sampler="topk")
    t = trace(model, x)
    assert t.kept_tokens.tolist() == [[32, 16, 8]] * 2
    assert all(0 < g < 0.8 * dense for g in t.gmacs.tolist())
    for stage in range(3):
        for ids in t.kept_indices[stage]:
            assert ids.min() >= 0 and ids.max() < 64 and len(ids.unique()) == len(ids)
        if stage:  # a later stage keeps a subset of the earlier one
            for earlier, later in zip(t.kept_indices[stage - 1], t.kept_indices[stage], strict=True):
                assert set(later.tolist()) <= set(earlier.tolist())


def test_static_shapes_keep_exactly_k_slots():
    model = _fan_vit()
    x = torch.randn(3, 3, 64, 64)
    apply_ats(model, blocks=[1, 2], budget=[40, 20], static=True)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (3, 1 + 20, 32)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(alone, model(x), atol=1e-5, rtol=0)


def test_score_option_changes_the_choice():
    model = _fan_vit()
    x = torch.randn(2, 3, 64, 64)
    apply_ats(model, blocks=[1], budget=16, sampler="topk")
    value = trace(model, x, count_gmacs=False).kept_indices[0]
    remove_ats(model)
    apply_ats(model, blocks=[1], budget=16, sampler="topk", score="attention")
    alone = trace(model, x, count_gmacs=False).kept_indices[0]
    assert any(not torch.equal(a, b) for a, b in zip(value, alone, strict=True))


def test_tome_on_fan_merges_batch_independently_and_leaves_weights():
    model = _fan_vit()
    keys = copy.deepcopy(model.state_dict())
    x = torch.randn(3, 3, 64, 64)
    dense_gmacs = count_gmacs(model, x[:1])
    with torch.no_grad():
        dense = model(x)
        apply_tome(model, 8)
        assert model.forward_features(x).shape == (3, 1 + 64 - 4 * 8, 32)
        out = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, out, atol=1e-5, rtol=0)
    assert not torch.allclose(out, dense, atol=1e-3)
    assert count_gmacs(model, x[:1]) < 0.85 * dense_gmacs  # the conv stem is a large share here
    remove_tome(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in keys.items())


@pytest.mark.parametrize("fuse", [False, True])
def test_sampling_hands_every_position_to_a_kept_token(fuse):
    """After an ATS step every grid position is held by a filled slot; with fusion a slot's size is the number of
    positions it holds (sizes add up to the grid), without it every kept token still counts once."""
    model = _fan_vit()
    x, hw = model._embed(torch.randn(3, 3, 64, 64))
    keep_fn = _rows_sampler([5, 3, 8]) if not fuse else (lambda scores, valid: topk_sampling(
        scores, valid, torch.tensor([20, 7, 64])))
    with torch.no_grad():
        slots, _ = mixing_forward(model.blocks[1], dense_slots(x), hw, keep_fn if fuse else
                                  (lambda scores, valid: keep_fn(scores, valid, None)), fuse=fuse)
    filled = slots.size > 0
    assert (slots.owner >= 0).all() and filled.gather(1, slots.owner).all()
    held = torch.zeros_like(slots.size).scatter_add(1, slots.owner, torch.ones_like(slots.owner, dtype=torch.float))
    if fuse:
        assert torch.equal(held, slots.size) and slots.size.sum(dim=1).tolist() == [64.0] * 3
    else:
        assert torch.equal(slots.size, filled.float()) and filled.sum(dim=1).tolist() == [40, 24, 64]


def test_fused_ats_on_fan_is_batch_independent():
    model = _fan_vit()
    apply_ats(model, blocks=[1, 2, 3], budget=16, schedule="linear", sampler="topk", fuse="nearest")
    x = torch.randn(3, 3, 64, 64)
    assert_batch_independent(model, x)
    with torch.no_grad():
        assert model.forward_features(x).shape == (3, 1 + 16, 32)


def test_merged_slots_hold_every_position_of_their_tokens():
    x = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 2).clone()  # tokens 0..3, values = their index
    slots = dense_slots(x)
    matching = Matching(torch.tensor([[0, 1, 1, 2]]), 3)  # tokens 1 and 2 merge into slot 1
    merged = merge_slots(slots, matching)
    assert merged.owner.tolist() == [[0, 1, 1, 2]]
    assert merged.size.tolist() == [[1.0, 2.0, 1.0]]
    assert merged.x[0, :, 0].tolist() == [0.0, 1.5, 3.0]
    again = merge_slots(merged, Matching(torch.tensor([[0, 0, 1]]), 2))  # slot 0 absorbs slot 1 (size 2)
    assert again.owner.tolist() == [[0, 0, 0, 1]]
    assert again.size.tolist() == [[3.0, 1.0]]
    torch.testing.assert_close(again.x[0, 0, 0], torch.tensor(1.0))  # (0·1 + 1.5·2) / 3


def test_merged_token_reads_its_value_at_all_its_positions():
    """Two equal tokens merged: the depthwise conv still sees the dense grid (the merged token's value at both of
    its positions), and the merged token's MLP output is the mean of the two dense outputs; every other token's
    output is unchanged."""
    model = _fan_vit()
    mlp = model.blocks[1].mlp.mlp_v
    torch.manual_seed(2)
    z = torch.randn(1, 64, 32)
    z[:, 9] = z[:, 10]  # grid positions (1, 1) and (1, 2) hold equal tokens
    with torch.no_grad():
        dense = _grid_mlp(mlp, z, GRID, dense_slots(z))  # (1, 64, 32)
        torch.testing.assert_close(dense, mlp(z, GRID), atol=1e-5, rtol=0)
        slots = torch.arange(64).clone()
        slots[10:] -= 1  # token 10 joins token 9's slot; later tokens shift down one slot
        merged = merge_slots(dense_slots(z), Matching(slots[None], 63))
        out = _grid_mlp(mlp, merged.x, GRID, merged)  # (1, 63, 32)
    torch.testing.assert_close(out[0, 9], (dense[0, 9] + dense[0, 10]) / 2, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, :9], dense[0, :9], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 10:], dense[0, 11:], atol=1e-5, rtol=0)


def test_refused_fan_models_and_options():
    torch.manual_seed(0)
    se = timm.create_model("fan_small_12_p16_224_se_attn", **SMALL)
    with pytest.raises(UnsupportedModelError, match="SE-MLP"):
        apply_ats(se, blocks=[1])
    with pytest.raises(UnsupportedModelError, match="SE-MLP"):
        apply_tome(se, 2)
    down = timm.create_model("test_fan_vit_downsample")
    with pytest.raises(UnsupportedModelError, match="downsamples"):
        apply_ats(down, blocks=[0, 2])
    apply_ats(down, blocks=[2])  # after the last downsampling block it runs
    with torch.no_grad():
        assert down(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    pooled = timm.create_model("fan_tiny_12_p16_224", global_pool="avg", **SMALL)
    with pytest.raises(UnsupportedModelError, match="global_pool"):
        apply_ats(pooled, blocks=[1])
    swin = timm.create_model("test_fan_swin")
    with pytest.raises(UnsupportedModelError):
        apply_ats(swin, blocks=[1])
    with pytest.raises(UnsupportedModelError):
        apply_tome(swin, 2)
    with pytest.raises(InvalidArgumentError, match="ToMe is applied"):
        apply_ats(apply_tome(_fan_vit(), 2), blocks=[1])
