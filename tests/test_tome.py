"""ToMe plug-in: parity with the released code, matching and merging, patching, GMACs, export, compile, gradients,
errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ravit
from ravit.ats import apply_ats
from ravit.ats.patch import UnsupportedModelError
from ravit.bench.flops import count_gmacs
from ravit.errors import InvalidArgumentError
from ravit.tome import (
    ToMeConfig,
    apply_tome,
    bipartite_soft_matching,
    has_tome,
    max_merges,
    merge_weighted,
    remove_tome,
)

FIXTURE = Path(__file__).parent / "fixtures" / "tome_released.json"


@pytest.fixture(scope="module")
def released() -> dict:
    """What ``scripts/tome_reference.py`` recorded from the released ToMe code."""
    return json.loads(FIXTURE.read_text())


def random_vit(seed: int = 0, std: float = 0.2, distilled: bool = False, **kwargs) -> VisionTransformer:
    """The fixture's random-ViT recipe: timm's init under ``seed``, then every matrix, token and position embedding
    redrawn from N(0, std) (large enough that merging changes the logits visibly)."""
    spec = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
    torch.manual_seed(seed)
    model = (VisionTransformerDistilled if distilled else VisionTransformer)(**{**spec, **kwargs})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 or "token" in name or "pos" in name:
                p.normal_(0, std)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


HOSTS = {  # name: (kwargs of random_vit, prefix tokens)
    "class_token": (dict(), 1),
    "global_avg_pool": (dict(class_token=False, global_pool="avg"), 0),
    "distilled": (dict(distilled=True), 2),
    "registers": (dict(reg_tokens=3), 4),
    "registers_avg_pool": (dict(class_token=False, reg_tokens=2, global_pool="avg"), 2),
}


def token_counts(n: int, r: list[int], protected: int) -> list[int]:
    """Tokens leaving each block: each merges min(r, (n - protected) // 2), written out here independently."""
    counts = []
    for r_block in r:
        n -= min(r_block, (n - protected) // 2)
        counts.append(n)
    return counts


# ---------------------------------------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def zoo_images(released):
    """The zoo slice the fixture was recorded on: first 1000 Fashion-MNIST test images, the zoo's eval pipeline."""
    from ravit.data import find_fashion_mnist
    from ravit.models.zoo import load_manifest
    from ravit.train.export import eval_loader

    try:
        find_fashion_mnist()
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")
    entry = load_manifest()["models"][released["zoo"]["model"]]
    loader = eval_loader(entry["dataset"], entry["input_size"][0], entry["input_size"][-1],
                         limit=released["zoo"]["images"])
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("r", [0, 2, 4, 6, 8, 10, 12])
def test_zoo_parity_with_released(released, zoo_images, r):
    """fmnist_deit_p4 on 1000 test images: the released code's predictions and top-1 exactly, logits within 1e-5."""
    images, labels = zoo_images
    run = released["zoo"]["runs"][str(r)]
    model = apply_tome(ravit.create_model(released["zoo"]["model"], pretrained=True).eval(), r)
    with torch.no_grad():
        logits = torch.cat([model(images[i : i + 250]) for i in range(0, len(images), 250)])
    preds = logits.argmax(dim=1)
    assert preds.tolist() == run["predictions"]
    assert 100.0 * float(preds.eq(labels).float().mean()) == pytest.approx(run["top1"], abs=1e-9)
    torch.testing.assert_close(logits[: len(run["logits"])], torch.tensor(run["logits"]), atol=1e-5, rtol=0)


def test_zoo_fixture_accuracy_falls_with_r(released):
    """The recorded run is a real sweep: merging more tokens costs accuracy on the zoo model."""
    top1 = [released["zoo"]["runs"][r]["top1"] for r in ("0", "12")]
    assert top1[0] > top1[1]


def test_random_vit_parity_with_released(released):
    """Random ViTs (class token, global average pooling, DeiT distilled) rebuilt from the recorded recipe: the
    released code's logits within 1e-5 for every recorded r, and merging changes them visibly."""
    spec = released["random_vits"]
    assert spec["spec"] == dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
    size = spec["spec"]["img_size"]
    x = torch.randn(spec["num_inputs"], 3, size, size, generator=torch.Generator().manual_seed(spec["input_seed"]))
    assert set(spec["cases"]) == {"class_token", "global_avg_pool", "distilled"}
    for name, case in spec["cases"].items():
        dense = torch.tensor(case["runs"]["0"])
        for r, logits in case["runs"].items():
            model = random_vit(spec["seed"], spec["weight_std"], case["distilled"], **case["kwargs"])
            with torch.no_grad():
                out = apply_tome(model, int(r))(x)
            torch.testing.assert_close(out, torch.tensor(logits), atol=1e-5, rtol=0, msg=f"{name} r={r}")
            assert r == "0" or (out - dense).abs().max() > 1e-2, f"{name} r={r} did not change the logits"


# -------------------------------------------------------------------------------------------- matching / merging


def _check_layout(metric: torch.Tensor, r: int, protected: int):
    matching = bipartite_soft_matching(metric, r, protected)
    B, N, _ = metric.shape
    r_eff = min(r, max_merges(N, protected))
    assert matching.num_out == N - r_eff and matching.slots.shape == (B, N)
    if r_eff == 0:  # nothing merges: every token keeps its place, as the dense block leaves it
        assert torch.equal(matching.slots, torch.arange(N).expand(B, N))
        return matching
    for slots in matching.slots.tolist():
        assert sorted(set(slots)) == list(range(N - r_eff))  # every output slot is used
        assert slots[:protected] == list(range(protected))  # prefix tokens stay where they were, alone
        assert all(slots.count(s) == 1 for s in slots[:protected])
        b_slots = slots[1::2]
        assert len(set(b_slots)) == len(b_slots)  # B tokens never merge with each other
        merged_a = [s for s in slots[::2] if slots.count(s) > 1]
        assert len(merged_a) == r_eff and all(s in b_slots for s in merged_a)  # r A tokens, each into a B token
        b_tail = [s for j, s in enumerate(b_slots) if 2 * j + 1 >= protected]
        assert b_tail == list(range(N - r_eff - len(b_tail), N - r_eff))  # then every B token, in order
        kept_a = [s for i, s in enumerate(slots[::2]) if 2 * i >= protected and s not in b_slots]
        if protected:
            assert kept_a == list(range(protected, protected + len(kept_a)))  # kept A tokens in position order
    return matching


@pytest.mark.parametrize(("N", "protected"), [(n, p) for n in (2, 7, 50, 65) for p in (0, 1, 2, 5) if p <= n])
@pytest.mark.parametrize("r", [0, 1, 3, 100])
def test_matching_layout(N, protected, r):
    """Slots cover the output exactly; prefix tokens never merge; r A tokens merge into B tokens; order is
    [prefix, kept A, B] (kept A in position order when something is protected)."""
    _check_layout(torch.randn(3, N, 8, generator=torch.Generator().manual_seed(N + r)), r, protected)


def test_matching_merges_the_most_similar_pairs():
    """A tokens with an exact copy in B (cosine 1) merge into that copy; the rest stay; the order by similarity
    picks them first."""
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(1, 12, 16, generator=g)  # A = 0, 2, ..., 10; B = 1, 3, ..., 11
    metric[0, 4] = 3 * metric[0, 7]  # token 4 (A) is parallel to token 7 (B)
    metric[0, 10] = metric[0, 1]  # token 10 (A) equals token 1 (B)
    matching = bipartite_soft_matching(metric, 2, num_protected=0)
    slots = matching.slots[0].tolist()
    assert slots[4] == slots[7] and slots[10] == slots[1]
    assert len(set(slots)) == 10


def test_matching_without_protection_keeps_similarity_order():
    """With no prefix token the kept A tokens are in descending best-match order, as the released code leaves them."""
    metric = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(3))
    matching = bipartite_soft_matching(metric, 3, num_protected=0)
    normed = torch.nn.functional.normalize(metric, dim=-1)
    best = (normed[:, ::2] @ normed[:, 1::2].transpose(1, 2)).amax(dim=-1)  # (B, 10)
    b_slots = set(matching.slots[:, 1::2].flatten().tolist())
    for b in range(2):
        kept = [i for i in range(10) if int(matching.slots[b, 2 * i]) not in b_slots]
        by_slot = sorted(kept, key=lambda i: int(matching.slots[b, 2 * i]))
        assert by_slot == sorted(kept, key=lambda i: -float(best[b, i]))


def test_merge_weighted_is_a_size_weighted_average():
    g = torch.Generator().manual_seed(0)
    x, size = torch.randn(2, 9, 4, generator=g), torch.randint(1, 5, (2, 9, 1), generator=g).float()
    matching = bipartite_soft_matching(torch.randn(2, 9, 3, generator=g), 3, num_protected=1)
    out, new_size = merge_weighted(x, size, matching)
    assert out.shape == (2, 6, 4) and new_size.shape == (2, 6, 1)
    for b in range(2):
        for s in range(6):
            members = (matching.slots[b] == s).nonzero().flatten()
            w = size[b, members]
            torch.testing.assert_close(new_size[b, s], w.sum(0))
            torch.testing.assert_close(out[b, s], (x[b, members] * w).sum(0) / w.sum())
    torch.testing.assert_close(new_size.sum(dim=1), size.sum(dim=1))  # every patch is counted once


def test_matching_takes_no_gradient_but_merging_does():
    metric = torch.randn(1, 10, 4, requires_grad=True)
    x = torch.randn(1, 10, 4, requires_grad=True)
    out, size = merge_weighted(x, torch.ones(1, 10, 1), bipartite_soft_matching(metric, 4, 1))
    (out * size).sum().backward()  # size x mean is the sum of a slot's tokens: d/dx = 1 for every token
    assert metric.grad is None
    torch.testing.assert_close(x.grad, torch.ones_like(x))


# ---------------------------------------------------------------------------------------------------- patching


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_r_zero_equals_dense(images, host):
    kwargs, _ = HOSTS[host]
    with torch.no_grad():
        dense = random_vit(**kwargs)(images)
        out = apply_tome(random_vit(**kwargs), 0)(images)
    torch.testing.assert_close(out, dense, atol=1e-6, rtol=0)


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_prefix_tokens_are_protected_and_tokens_fall(images, host):
    """forward_features returns (B, N', C) with N' from the clamped schedule, prefix tokens counted as protected;
    the prefix tokens after block 0 are the dense model's (nothing merged into them)."""
    kwargs, prefix = HOSTS[host]
    model = random_vit(**kwargs)
    assert model.num_prefix_tokens == prefix
    r = [5, 9, 40, 2]
    n = model.patch_embed.num_patches + prefix
    apply_tome(model, r)
    with torch.no_grad():
        feats = model.forward_features(images)
    assert feats.shape == (len(images), token_counts(n, r, prefix)[-1], model.embed_dim)

    first = random_vit(depth=1, **kwargs)
    with torch.no_grad():
        dense = first.forward_features(images)
        merged = apply_tome(first, 10).forward_features(images)
    assert merged.shape[1] == n - 10
    torch.testing.assert_close(merged[:, :prefix], dense[:, :prefix], atol=1e-6, rtol=0)


def test_too_large_r_is_clamped(images):
    """r beyond half of the mergeable tokens merges exactly that half, block by block."""
    model = random_vit()
    n = model.patch_embed.num_patches + 1
    counts = token_counts(n, [1000] * 4, 1)
    clamped = [n - counts[0]] + [a - b for a, b in zip(counts, counts[1:], strict=False)]
    assert clamped == [32, 16, 8, 4]
    with torch.no_grad():
        huge = apply_tome(random_vit(), 1000)
        out = huge(images)
        feats = huge.forward_features(images)
        exact = apply_tome(random_vit(), clamped)(images)
    assert feats.shape[1] == counts[-1] == 1 + 64 // 16
    torch.testing.assert_close(out, exact, atol=0, rtol=0)


def test_remove_restores_the_dense_model(images):
    model = random_vit()
    with torch.no_grad():
        dense = model(images)
        host = type(model)
        apply_tome(model, 8)
        assert has_tome(model) and model.tome_config == ToMeConfig(r=(8, 8, 8, 8), prop_attn=True)
        merged = model(images)
        assert remove_tome(model) is model
        restored = model(images)
    assert type(model) is host and not has_tome(model) and not hasattr(model, "tome_config")
    assert (merged - dense).abs().max() > 1e-2
    assert torch.equal(restored, dense)


def test_state_dict_keys_and_values_unchanged():
    model = random_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in (lambda m: apply_tome(m, [1, 2, 3, 4]), remove_tome):
        step(model)
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[k], before[k]) for k in before)


def test_weights_load_into_a_patched_model(images):
    source, target = random_vit(seed=0), apply_tome(random_vit(seed=5), 4)
    target.load_state_dict(source.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(target(images), apply_tome(source, 4)(images), atol=0, rtol=0)


@pytest.mark.parametrize("host", ["class_token", "global_avg_pool", "distilled"])
def test_batch_independence(images, host):
    model = apply_tome(random_vit(**HOSTS[host][0]), 6)
    with torch.no_grad():
        batched = model(images)
        alone = torch.cat([model(x[None]) for x in images])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_proportional_attention_changes_the_output(images):
    with torch.no_grad():
        on = apply_tome(random_vit(), 8)(images)
        off = apply_tome(random_vit(), 8, prop_attn=False)(images)
        off_r0 = apply_tome(random_vit(), 0, prop_attn=False)(images)
        dense = random_vit()(images)
    assert (on - off).abs().max() > 1e-3
    torch.testing.assert_close(off_r0, dense, atol=1e-6, rtol=0)  # sizes of 1 add nothing


def test_proportional_attention_is_log_size_on_the_keys():
    """A token of size s attends like s copies of one token: a ToMe block on [x, y] with size(y) = 2 equals timm's
    dense block on [x, y, y] for the first two tokens."""
    torch.manual_seed(0)
    block = Block(dim=16, num_heads=2, qkv_bias=True).eval()
    from ravit.tome.block import block_forward

    t = torch.randn(1, 3, 16)
    with torch.no_grad():
        out, size = block_forward(block, t[:, :2], torch.tensor([[[1.0], [2.0]]]), 0, 1)
        dense = block(torch.cat([t[:, :2], t[:, 1:2]], dim=1))
    torch.testing.assert_close(out, dense[:, :2], atol=1e-6, rtol=0)
    assert size.flatten().tolist() == [1.0, 2.0]


# -------------------------------------------------------------------------------------------------------- GMACs


def test_gmacs_fall_with_r(images):
    dense = count_gmacs(random_vit(), images)
    gmacs = [count_gmacs(apply_tome(random_vit(), r), images) for r in (0, 2, 4, 8, 16)]
    assert gmacs[0] == dense
    assert all(a > b for a, b in zip(gmacs, gmacs[1:], strict=False)), gmacs


def test_gmacs_count_attention_on_merged_tokens(images):
    """The attention the counter sees is 4·B·C·sum(N_i²) FLOPs over the blocks' reduced token counts."""
    model = apply_tome(random_vit(), 8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    sdpa = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" in str(op))
    n = model.patch_embed.num_patches + 1
    entering = [n, *token_counts(n, [8] * 4, 1)[:-1]]
    assert sdpa == 4 * len(images) * model.embed_dim * sum(k * k for k in entering)


# ----------------------------------------------------------------------------------------- export / compile / grad


def test_torch_export_matches_eager(images):
    model = apply_tome(random_vit(), 8)
    with torch.no_grad():
        eager = model(images)
    exported = torch.export.export(model, (images,))
    with torch.no_grad():
        out = exported.module()(images)
    assert (eager - random_vit()(images)).abs().max() > 1e-2
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=0)


def test_onnx_export_runs_in_onnxruntime(images, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = apply_tome(random_vit(), 8)
    with torch.no_grad():
        eager = model(images)
    path = tmp_path / "tome.onnx"
    torch.onnx.export(model, (images,), dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), eager, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_compile_fullgraph_matches_eager(images):
    torch._dynamo.reset()
    model = apply_tome(random_vit(), 8)
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(model, fullgraph=True)(images)  # fullgraph: a graph break raises
    explanation = torch._dynamo.explain(model)(images)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


def test_gradients_flow_in_training(images):
    model = apply_tome(random_vit(drop_path_rate=0.2), 8).train()
    torch.manual_seed(0)
    loss = model(images).logsumexp(dim=1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(images):
    grads = []
    for checkpointing in (False, True):
        model = apply_tome(random_vit(), 8).train()
        model.set_grad_checkpointing(checkpointing)
        model(images).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_empty_batch(images):
    model = apply_tome(random_vit(), 8)
    with torch.no_grad():
        assert model(images[:0]).shape == (0, 5)


# -------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("r", "match"),
    [
        (-1, r"r must be >= 0"),
        (2.0, r"r must be an int"),
        (True, r"r must be an int"),
        ("8", r"r must be an int"),
        (None, r"r must be an int"),
        ([1, 2, 3], r"got 3 values of r for a model of 4 blocks"),
        ([1, 2, 3, 4, 5], r"got 5 values of r for a model of 4 blocks"),
        ([1, 2, -3, 4], r"r\[2\] must be >= 0"),
        ([1, False, 3, 4], r"r\[1\] must be an int"),
        ([1, 2, 3.5, 4], r"r\[2\] must be an int"),
    ],
)
def test_bad_r(r, match):
    model = random_vit()
    with pytest.raises(InvalidArgumentError, match=match):
        apply_tome(model, r)
    assert not has_tome(model) and type(model) is VisionTransformer


def test_static_false_is_refused():
    with pytest.raises(InvalidArgumentError, match=r"static must be True.*static by nature"):
        apply_tome(random_vit(), 4, static=False)


def test_prop_attn_must_be_bool():
    with pytest.raises(InvalidArgumentError, match="prop_attn must be True or False"):
        apply_tome(random_vit(), 4, prop_attn=1)


def test_apply_twice_and_remove_without_apply():
    model = apply_tome(random_vit(), 4)
    with pytest.raises(InvalidArgumentError, match="already applied"):
        apply_tome(model, 2)
    assert model.tome_config.r == (4, 4, 4, 4)
    remove_tome(model)
    with pytest.raises(InvalidArgumentError, match="no ToMe applied"):
        remove_tome(model)
    with pytest.raises(InvalidArgumentError, match="no ToMe applied"):
        remove_tome(random_vit())


def test_ats_model_is_refused():
    model = apply_ats(random_vit(), blocks=[1])
    with pytest.raises(InvalidArgumentError, match="remove_ats"):
        apply_tome(model, 2)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.zeros(3, 32, 32), r"expected a batch of images \(B, C, H, W\)"),
        (torch.zeros(1, 1, 3, 32, 32), r"expected a batch of images \(B, C, H, W\)"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "expected float images"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.long), "expected float images"),
        (torch.zeros(2, 1, 32, 32), "expected 3 input channels"),
    ],
)
def test_bad_images(bad, match):
    model = apply_tome(random_vit(), 4)
    with pytest.raises(InvalidArgumentError, match=match):
        model(bad)


def test_masks_and_intermediates_are_refused(images):
    model = apply_tome(random_vit(), 4)
    with pytest.raises(InvalidArgumentError, match="attn_mask / is_causal"):
        model.forward_features(images, is_causal=True)
    with pytest.raises(NotImplementedError, match="remove_tome"):
        model.forward_intermediates(images)


class _MyAttention(Attention):
    pass


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()), "got Sequential"),
        (lambda: ravit.create_model("test_fan_swin"), "ToMe supports timm VisionTransformer"),
        (lambda: random_vit(block_fn=ResPostBlock), "block 0 is ResPostBlock"),
        (lambda: random_vit(attn_layer=_MyAttention), "block 0 is Block with _MyAttention"),
    ],
)
def test_unsupported_hosts(build, match):
    model = build()
    with pytest.raises(UnsupportedModelError, match=match) as err:
        apply_tome(model, 4)
    assert "ToMe supports timm VisionTransformer" in str(err.value)
    assert not has_tome(model)
