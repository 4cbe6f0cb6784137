"""ravit.analysis and ``ravit analyze``: grouping spectra, perturbation, clustering, attention maps, ATS masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import ravit
from ravit.analysis import (
    attention_maps,
    block_outputs,
    block_perturbation,
    capture_outputs,
    cls_attention,
    cluster_masks,
    count_significant,
    grouping_spectra,
    kept_token_histogram,
    kept_token_masks,
    kmeans,
    labels_to_mask,
    perturbation_profile,
    recording_attention,
    relative_change,
    significant_eigenvalues,
    spectral_clustering,
    token_attention,
)
from ravit.cli import main

TINY_VIT = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2, num_classes=10)
TINY_ARGS = ["test_vit", "--model-kwargs", "img_size=28", "patch_size=4", "in_chans=1", "depth=3", "num_classes=10"]


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{**TINY_VIT, **kwargs}).eval()


def images(batch: int = 3, size: int = 28, channels: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def clustered_tokens(k: int, n: int = 96, dim: int = 48, noise: float = 0.1, seed: int = 0):
    """(n, dim) tokens around k orthogonal centres of norm 3, and each token's cluster id (cycling through 0..k-1)."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.linalg.qr(torch.randn(dim, k, generator=g)).Q.T  # (k, dim), orthonormal rows
    ids = torch.arange(n) % k
    return centres[ids] + noise * torch.randn(n, dim, generator=g), ids


def no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- spectra ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("kind", ["gaussian", "cosine"])
def test_k_separated_clusters_give_k_significant_eigenvalues(k, kind):
    tokens, _ = clustered_tokens(k, seed=k)
    assert int(significant_eigenvalues(tokens, kind=kind)) == k


def test_unrelated_tokens_are_not_grouped():
    tokens = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))  # nearly orthogonal directions
    assert int(significant_eigenvalues(tokens)) == 64


def test_eigenvalue_count_batched_and_threshold():
    batch = torch.stack([clustered_tokens(k, seed=k)[0] for k in (2, 4)])
    assert significant_eigenvalues(batch).tolist() == [2, 4]
    eigenvalues = torch.tensor([[1.0, 0.8, 0.3, 0.1]])
    assert count_significant(eigenvalues, 0.5).tolist() == [2]
    assert count_significant(eigenvalues, 0.25).tolist() == [3]
    with pytest.raises(ValueError, match="threshold"):
        count_significant(eigenvalues, 0.0)


def test_grouping_spectra_per_block_and_image():
    model = tiny_vit()
    counts = grouping_spectra(model, [images(2), images(3)])
    assert list(counts) == ["blocks.0", "blocks.1", "blocks.2"]
    for values in counts.values():
        assert values.shape == (5,) and values.min() >= 1 and values.max() <= 49


# --- block outputs and hooks ------------------------------------------------------------------------------------------
def test_hooks_leave_outputs_unchanged_and_are_removed():
    model = tiny_vit()
    x = images()
    before = model(x)
    with capture_outputs(model, ["blocks.0", "blocks.2"]) as captured:
        during = model(x)
        assert not no_hooks(model)
    after = model(x)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert no_hooks(model)
    assert captured["blocks.2"].shape == (3, 50, 32)


def test_hooks_removed_when_forward_fails():
    model = tiny_vit()
    with pytest.raises(RuntimeError), capture_outputs(model, ["blocks.1"]):
        model(images(channels=3))
    assert no_hooks(model)


def test_block_outputs_intermediates_equal_hooks():
    model = tiny_vit()
    x = images()
    a = block_outputs(model, x, method="intermediates")
    b = block_outputs(model, x, method="hooks")
    assert a.names == b.names == ["blocks.0", "blocks.1", "blocks.2"]
    assert a.grids == b.grids == [(7, 7)] * 3
    for ta, tb in zip(a.tokens, b.tokens, strict=True):
        assert ta.shape == (3, 49, 32)
        torch.testing.assert_close(ta, tb)
    assert no_hooks(model)
    last = block_outputs(model, x, indices=[-1])
    torch.testing.assert_close(last.tokens[0], a.tokens[2])


def test_block_outputs_of_named_layers_of_a_cnn():
    model = timm.create_model("resnet10t", num_classes=10).eval()
    out = block_outputs(model, images(2, 32, 3), names=["layer1", "layer3"])
    assert out.grids == [(8, 8), (2, 2)]
    assert out.tokens[0].shape[:2] == (2, 64)


def test_bad_inputs_raise_clear_errors():
    model = tiny_vit()
    with pytest.raises(ValueError, match="28x28"):
        block_outputs(model, images(size=32))
    with pytest.raises(ValueError, match="1-channel"):
        block_outputs(model, images(channels=3))
    with pytest.raises(ValueError, match="out of range"):
        block_outputs(model, images(), indices=[3])
    with pytest.raises(ValueError, match="blocks"):
        block_outputs(timm.create_model("resnet10t").eval(), images(1, 32, 3))


# --- perturbation -----------------------------------------------------------------------------------------------------
def test_perturbation_is_zero_without_noise_and_grows_with_it():
    model = tiny_vit()
    x = images()
    zero = block_perturbation(model, x, torch.zeros_like(x))
    assert all(torch.equal(v, torch.zeros(3)) for v in zero.values())
    profiles = [perturbation_profile(model, [x], std) for std in (0.01, 0.1, 0.5, 2.0)]
    for name in ["input", "blocks.0", "blocks.1", "blocks.2"]:
        means = [float(p[name].mean()) for p in profiles]
        assert all(a < b for a, b in zip(means, means[1:], strict=False)), (name, means)
        assert means[0] > 0


def test_relative_change():
    clean = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert relative_change(clean, clean + torch.tensor([[0.0, 5.0], [0.0, 0.0]])).tolist() == [1.0, 0.0]


# --- clustering -------------------------------------------------------------------------------------------------------
def test_spectral_clustering_recovers_planted_clusters():
    tokens, ids = clustered_tokens(3, n=60)
    labels = spectral_clustering(tokens[None], k=3)[0]
    # same partition up to renaming: a bijection between planted ids and found labels
    pairs = {(int(a), int(b)) for a, b in zip(ids, labels, strict=True)}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3 and len({b for _, b in pairs}) == 3


def test_cluster_mask_follows_the_image_layout():
    # left half of a 4x4 grid one direction, right half another: the mask splits the image down the middle
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(2, 16, generator=g)
    grid = torch.stack([left if c < 2 else right for r in range(4) for c in range(4)])
    tokens = (grid + 0.05 * torch.randn(16, 16, generator=g))[None]
    mask = labels_to_mask(spectral_clustering(tokens, k=2), (4, 4), (8, 8))[0]
    assert mask.shape == (8, 8)
    assert (mask[:, :4] == mask[0, 0]).all() and (mask[:, 4:] == mask[0, 7]).all() and mask[0, 0] != mask[0, 7]


def test_kmeans_and_model_cluster_masks():
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [5.0, 5.1]])
    labels = kmeans(points, 2)
    assert labels[0] == labels[1] != labels[2] == labels[3] == labels[4]
    masks = cluster_masks(tiny_vit(), images(2), block=-1, k=2)
    assert masks.shape == (2, 28, 28) and set(masks.unique().tolist()) <= {0, 1}


# --- attention --------------------------------------------------------------------------------------------------------
def _manual_attention(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    attn = block.attn
    B, N, C = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, heads, N, N)


def test_recorded_attention_is_the_models_attention_and_model_is_restored():
    model = tiny_vit()
    x = images()
    before = model(x)
    maps = attention_maps(model, x)
    assert list(maps) == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(blk.attn.fused_attn for blk in model.blocks) and no_hooks(model)
    torch.testing.assert_close(model(x), before)
    tokens_in = model._pos_embed(model.patch_embed(x))
    tokens_in = model.blocks[0](tokens_in)
    torch.testing.assert_close(maps["blocks.1"], _manual_attention(model.blocks[1], tokens_in))
    with pytest.raises(RuntimeError), recording_attention(model, ["blocks.0"]):
        model(images(channels=3))
    assert model.blocks[0].attn.fused_attn and no_hooks(model)


def test_cls_and_token_attention_maps():
    model = tiny_vit()
    x = images()
    maps = attention_maps(model, x, [-1])["blocks.2"]
    cls = cls_attention(model, x)
    assert cls.shape == (3, 2, 7, 7)
    torch.testing.assert_close(cls.flatten(2), maps[:, :, 0, 1:])
    received = token_attention(model, x)
    torch.testing.assert_close(received.flatten(2), maps[:, :, 1:, 1:].mean(2))
    torch.testing.assert_close(token_attention(model, x, query=5).flatten(2), maps[:, :, 6, 1:])


def test_cls_attention_needs_a_class_token():
    model = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        cls_attention(model, images())
    assert token_attention(model, images()).shape == (3, 2, 7, 7)  # still fine without one


def test_attention_needs_timm_style_blocks():
    model = timm.create_model("resnet10t").eval()
    with pytest.raises(ValueError, match="blocks"):
        attention_maps(model, images(1, 32, 3))


def test_fan_maps_and_intermediates():
    fan = pytest.importorskip("ravit.models.fan")
    assert fan  # registers FAN models
    torch.manual_seed(0)
    model = timm.create_model("test_fan_vit", in_chans=1, num_classes=10).eval()
    x = images(2, 64)
    cls = cls_attention(model, x)
    assert cls.shape == (2, 2, 4, 4)
    last = model.get_attention_maps(x)["cls_attn_blocks.1"]
    torch.testing.assert_close(cls.flatten(2), last[:, :, 0, 1:])
    assert token_attention(model, x).shape == (2, 2, 4, 4)
    a, b = block_outputs(model, x), block_outputs(model, x, method="hooks")
    for ta, tb in zip(a.tokens, b.tokens, strict=True):
        torch.testing.assert_close(ta, tb)
    assert no_hooks(model)


# --- ATS --------------------------------------------------------------------------------------------------------------
def test_kept_token_masks_and_histogram():
    kept = [[torch.tensor([0, 3]), torch.tensor([1])], [torch.tensor([3]), torch.tensor([], dtype=torch.long)]]
    masks = kept_token_masks(kept, (2, 2))
    assert masks.shape == (2, 2, 2, 2)
    assert masks[0, 0].tolist() == [[True, False], [False, True]]
    assert masks[1, 1].sum() == 0
    with pytest.raises(ValueError, match="grid"):
        kept_token_masks([[torch.tensor([4])]], (2, 2))
    hist = kept_token_histogram(torch.tensor([[5, 3], [5, 4], [4, 4]]), 5)
    assert hist.tolist() == [[0, 0, 0, 0, 1, 2], [0, 0, 0, 1, 2, 0]]


def test_ats_masks_match_kept_tokens():
    ats = pytest.importorskip("ravit.ats")
    from ravit.analysis import ats_statistics, ats_token_masks

    model = ravit.apply_ats(tiny_vit(), blocks=[1, 2])
    x = images(2)
    labels, masks = ats_token_masks(model, x)
    result = ats.trace(model, x, count_gmacs=False)
    assert labels == ["blocks.1", "blocks.2"] and masks.shape == (2, 2, 7, 7)
    assert masks.sum((-1, -2)).T.tolist() == (result.kept_tokens - 1).tolist()  # minus the class token
    stats = ats_statistics(model, [x, x[:1]])
    assert stats.kept_tokens.shape == (3, 2) and stats.gmacs.shape == (3,) and (stats.gmacs > 0).all()


# --- CLI --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


CLI_CASES = {
    "spectra": (["--blocks", "0", "2"], ["spectra.png"], "blocks"),
    "perturbation": (["--noise-std", "0.1", "0.3"], ["perturbation.png"], "noise"),
    "clusters": (["--k", "3", "--limit", "2"], ["clusters.png"], "blocks"),
    "attention": (["--indices", "1,4"], ["attention.png"], "maps"),
    "ats": (["--blocks", "1-2", "--mask-images", "2"], ["ats_masks.png", "ats_tokens.png", "ats_gmacs.png"],
            "kept_tokens"),
}


@pytest.mark.parametrize("analysis", list(CLI_CASES))
def test_cli_writes_png_and_json(analysis, image_folder, tmp_path):
    extra, pngs, key = CLI_CASES[analysis]
    code = main(["analyze", analysis, *TINY_ARGS, "--data", str(image_folder), "--limit", "4",
                 "--output", str(tmp_path), *extra])
    assert code == 0
    for png in pngs:
        data = (tmp_path / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    record = json.loads((tmp_path / f"{analysis}.json").read_text())
    assert record["analysis"] == analysis and record[key]


def test_cli_on_fashion_mnist(tmp_path):
    try:
        ravit.data.find_fashion_mnist()
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")
    assert main(["analyze", "spectra", *TINY_ARGS, "--data", "fashion_mnist", "--limit", "8", "--output",
                 str(tmp_path)]) == 0
    record = json.loads((tmp_path / "spectra.json").read_text())
    assert record["num_images"] == 8 and len(record["blocks"]) == 3
    assert (tmp_path / "spectra.csv").read_text().startswith("block,mean,std")


def test_cli_user_errors_exit_2(tmp_path, capsys, image_folder):
    common = ["--data", str(image_folder), "--output", str(tmp_path)]
    no_cls = [*TINY_ARGS, "class_token=false", "global_pool=avg"]
    assert main(["analyze", "attention", *no_cls, "--kind", "cls", *common]) == 2
    assert "class token" in capsys.readouterr().err
    assert main(["analyze", "spectra", *TINY_ARGS, "--data", str(tmp_path / "missing")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert main(["analyze", "spectra", *TINY_ARGS, "--checkpoint", str(tmp_path / "none.pth"), *common]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "analysis,extra,message",
    [
        ("spectra", ["--device", "banana"], "--device 'banana' is not a device"),
        ("spectra", ["--limit", "0"], "--limit must be >= 1"),
        ("perturbation", ["--batch-size", "0"], "--batch-size must be >= 1"),
        ("perturbation", ["--noise-std", "0.1,nan"], "--noise-std: must be finite"),
        ("clusters", ["--k", "0"], "--k must be >= 1"),
        ("ats", ["--mask-images", "0"], "--mask-images must be >= 1"),
        ("ats", ["--budget", "lots"], "--budget: a budget is"),
    ],
)
def test_cli_bad_arguments_fail_before_any_work(tmp_path, capsys, monkeypatch, analysis, extra, message):
    """One clear line, and no model built, no image read, no folder made."""
    monkeypatch.setattr(ravit, "create_model", lambda *a, **k: pytest.fail("the model was built"))
    out = tmp_path / "out"
    assert main(["analyze", analysis, *TINY_ARGS, "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ravit analyze: error:") and message in err and "\n" not in err
    assert not out.exists()


def test_cli_output_under_a_file_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ravit, "create_model", lambda *a, **k: pytest.fail("the model was built"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["analyze", "spectra", *TINY_ARGS, "--output", str(blocker / "sub")]) == 2
    assert "which is a file" in capsys.readouterr().err


def test_cli_ats_budget_is_never_truncated(tmp_path, capsys, image_folder):
    """--budget 2.5 ran as 2 tokens; now it is the same error as ravit.apply_ats(budget=2.5), before any image."""
    argv = ["analyze", "ats", *TINY_ARGS, "--data", str(image_folder), "--output", str(tmp_path / "out"),
            "--blocks", "1", "2", "--budget", "2.5"]
    assert main(argv) == 2
    assert "never rounded" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
