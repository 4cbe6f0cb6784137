"""Issue 12 (trustworthy results), robustness and data side: each case answers with the right number or a clear
error. Class folders are scored by name, corrupted copies keep their settings and every image, corruptions are
seeded per image, mCE says what it covers and never divides by zero, and a user's mistake is one line."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ravit.data import CLASSES, check_same_classes, create_dataset, folder_name, label_map, load_rgb, read_idx
from ravit.errors import DataError, InvalidArgumentError
from ravit.robustness import ALL_CORRUPTIONS, corrupt, metrics, resolve_corruptions
from ravit.robustness import evaluate as ev
from ravit.robustness.registry import image_generators
from ravit.robustness.writer import SourceImages, source_images, unique_names, write_c_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


class _Recorder(nn.Module):
    """A 10-class 28x28 grey model that keeps every input it sees and predicts class 0."""

    num_classes = 10

    def __init__(self, label_names=None):
        super().__init__()
        self.stem = nn.Conv2d(1, 1, 1)
        self.pretrained_cfg = dict(input_size=(1, 28, 28), mean=(0.0,), std=(1.0,), crop_pct=1.0,
                                   interpolation="bilinear", label_names=label_names)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(x.shape[0], 10)


def _png(path: Path, value, mode: str = "RGB", size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full(size, value, np.uint16)).save(path)
    else:
        Image.new(mode, size, value).save(path)


def _main(argv, capsys) -> tuple[int, str]:
    from ravit.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- case 1: class order
@pytest.fixture(scope="module")
def zoo_fan():
    from ravit import create_model

    return create_model("fmnist_fan_p4", pretrained=True).eval()


def test_corrupted_folder_scores_as_on_the_fly(tmp_path, zoo_fan):
    # The case: the same images written by `ravit corrupt` and corrupted on the fly must score the same;
    # before, class folders were numbered alphabetically (Ankle_boot = 0) instead of by the model's label order.
    source = source_images("fashion-mnist", "test").head(24)
    write_c_dataset(source, tmp_path, ["fog", "contrast"], [1], progress=False)
    from_disk = ev.evaluate_imagenet_c(zoo_fan, tmp_path, ["fog", "contrast"], [1], progress=False)
    dataset = ev.image_dataset("fashion-mnist", ev.ModelInput.from_model(zoo_fan))
    on_the_fly = ev.evaluate_corruptions(zoo_fan, dataset, ["fog", "contrast"], [1], limit=24, progress=False)
    for c in ("fog", "contrast"):  # the same images, up to the PNG's 8-bit rounding: at most an image or two apart
        (k_disk, n_disk), (k_fly, n_fly) = from_disk.counts[c][1], on_the_fly.counts[c][1]
        assert n_disk == n_fly == 24 and abs(k_disk - k_fly) <= 2, (c, k_disk, k_fly)
    assert on_the_fly.counts["contrast"][1][0] > 12, "the zoo model gets most contrast-1 images right"


def test_folder_classes_map_by_name(tmp_path, zoo_fan):
    named = _Recorder(list(CLASSES))
    assert folder_name("T-shirt/top") == "T-shirt_top"
    # Without the class map, the folder made from a name still matches it; order is the model's, not sorted.
    assert label_map(["Ankle_boot", "T-shirt_top", "Trouser"], named) == [9, 0, 1]
    assert label_map(["a"], named, {"a": "Bag"}) == [8]
    with pytest.raises(DataError, match="do not match the model's classes: cat"):
        label_map(["cat", "Trouser"], named)
    for k, c in enumerate(("cat", "dog")):
        _png(tmp_path / "f" / c / "x.png", (40 * k,) * 3)
    with pytest.raises(DataError, match="do not match the model's classes: cat, dog"):
        ev.evaluate_folder(zoo_fan, tmp_path / "f", "folder", progress=False)


def test_folder_labels_follow_the_models_order(tmp_path):
    # The recorder always predicts class 0 (T-shirt/top): only the T-shirt_top image may count as correct, whatever
    # the sorted order of the folders ('T-shirt_top' < 'Trouser') and with a hidden folder that is no class.
    _png(tmp_path / "Trouser" / "a.png", (10, 10, 10))
    _png(tmp_path / "Trouser" / "b.png", (20, 20, 20))
    _png(tmp_path / "T-shirt_top" / "a.png", (30, 30, 30))
    _png(tmp_path / ".ipynb_checkpoints" / "a.png", (40, 40, 40))
    res = ev.evaluate_folder(_Recorder(list(CLASSES)), tmp_path, "folder", progress=False)
    assert res.clean == (1, 3)
    with pytest.raises(DataError, match="2 class folders .* the model has 10 classes"):  # no names: no subset
        ev.evaluate_folder(_Recorder(), tmp_path, "folder", progress=False)


def test_model_without_names_says_which_order(tmp_path):
    folders = [f"c{k}" for k in range(10)]
    with pytest.warns(UserWarning, match="sorted order"):
        assert label_map(folders, _Recorder()) == list(range(10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Fashion-MNIST's own order is its label order: nothing to warn about
        assert label_map(list(CLASSES), _Recorder(), ordered=True) == list(range(10))


def test_datasets_expose_classes_and_compare_them(tmp_path):
    for split, names in (("train", ("cat", "dog")), ("val", ("cat", "cow"))):
        for c in names:
            _png(tmp_path / split / c / "0.png", (10, 20, 30))
    train = create_dataset("imagefolder", "train", data_dir=tmp_path)
    val = create_dataset("imagefolder", "val", data_dir=tmp_path)
    assert train.classes == ["cat", "dog"] and val.classes == ["cat", "cow"]
    check_same_classes(train.classes, ["cat", "dog"])
    with pytest.raises(DataError, match=r"only in the first \['dog'\], only in the second \['cow'\]"):
        check_same_classes(train.classes, val.classes)
    with pytest.raises(DataError, match="different order"):
        check_same_classes(["a", "b"], ["b", "a"])


# ----------------------------------------------------------------------------------------------- case 2: writer
def test_same_stems_are_all_written(tmp_path):
    _png(tmp_path / "src" / "a" / "x.png", (200, 0, 0))
    _png(tmp_path / "src" / "a" / "x.PNG", (0, 0, 200))
    _png(tmp_path / "src" / "a" / "x_1.png", (0, 200, 0))
    source = source_images(str(tmp_path / "src"))
    assert source.names == ["x_2", "x_3", "x_1"]  # x.PNG, x.png (x_1 is taken by x_1.png), x_1.png
    stats = write_c_dataset(source, tmp_path / "out", ["contrast"], [1], progress=False)
    files = sorted((tmp_path / "out" / "contrast" / "1" / "a").glob("*.png"))
    assert stats["written"] == 3 and len(files) == 3
    assert len({f.read_bytes() for f in files}) == 3
    assert unique_names(["a", "a", "b"], ["X", "x", "x"]) == ["X_1", "x_2", "x"]


def test_rerun_with_other_settings_is_refused(tmp_path):
    source = SourceImages(lambda i: torch.full((1, 6, 6), 0.5), ["c"] * 2, ["p", "q"], origin={"data": "t"})
    kw = dict(corruptions=["gaussian_noise"], severities=[1], progress=False)
    write_c_dataset(source, tmp_path, seed=0, **kw)
    assert write_c_dataset(source, tmp_path, seed=0, **kw)["skipped"] == 2
    with pytest.raises(InvalidArgumentError, match="made with .*seed 0.*asks for .*seed 1"):
        write_c_dataset(source, tmp_path, seed=1, **kw)
    with pytest.raises(InvalidArgumentError, match="recipe 'keep'.*recipe 'imagenet-c'"):
        write_c_dataset(source, tmp_path, recipe="imagenet-c", **kw)
    (tmp_path / "old" / "fog" / "1").mkdir(parents=True)
    with pytest.raises(InvalidArgumentError, match="no ravit-corrupt.json"):
        write_c_dataset(source, tmp_path / "old", **kw)
    assert json.loads((tmp_path / "ravit-corrupt.json").read_text())["settings"]["seed"] == 0


def test_sixteen_bit_images_keep_their_scale(tmp_path):
    _png(tmp_path / "src" / "a" / "g.png", 30000, "I;16")
    source = source_images(str(tmp_path / "src"))
    assert float(source.load(0).max()) == pytest.approx(30000 / 65535, abs=1e-6)
    assert np.asarray(load_rgb(tmp_path / "src" / "a" / "g.png")).max() == round(30000 / 65535 * 255)
    write_c_dataset(source, tmp_path / "out", ["brightness"], [1], progress=False)
    with Image.open(tmp_path / "out" / "brightness" / "1" / "a" / "g.png") as im:
        assert np.asarray(im).max() < 255, "not clipped to white"


# ----------------------------------------------------------------------------------------------- case 3
def test_empty_corruption_list_is_an_error(tmp_path, capsys):
    for spec in (",", "", " , "):
        with pytest.raises(InvalidArgumentError, match="no corruption named"):
            resolve_corruptions(spec)
    source = SourceImages(lambda i: torch.rand(1, 4, 4), ["c"], ["p"])
    with pytest.raises(InvalidArgumentError, match="no corruption"):
        write_c_dataset(source, tmp_path, [], [1], progress=False)
    code, err = _main(["corrupt", "--output", str(tmp_path / "o"), "--corruptions", ","], capsys)
    assert code == 2 and "--corruptions: no value given" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_one_pixel_images_stay_finite(name):
    for c in (1, 3):
        x = torch.rand(2, c, 1, 1, generator=torch.Generator().manual_seed(0))
        y = corrupt(x, name, 5, torch.Generator().manual_seed(0))
        assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1


# ----------------------------------------------------------------------------------------------- case 4: per image
def test_per_image_generators_do_not_depend_on_the_batch():
    x = torch.rand(7, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    for name in ALL_CORRUPTIONS:
        whole = corrupt(x, name, 4, image_generators(3, range(7), name, 4))
        parts = [corrupt(x[i : i + 3], name, 4, image_generators(3, range(i, min(i + 3, 7)), name, 4))
                 for i in range(0, 7, 3)]
        assert torch.equal(whole, torch.cat(parts)), name


def test_on_the_fly_counts_ignore_batch_size_and_ranks(monkeypatch):
    dataset = ev.image_dataset("fashion-mnist", ev.ModelInput.from_model(_Recorder()))
    conds = (["gaussian_noise", "motion_blur", "glass_blur"], [2])

    def inputs(batch_size: int, rank: int = 0, world: int = 1) -> dict[int, list[torch.Tensor]]:
        monkeypatch.setattr(ev, "_rank_world", lambda: (rank, world))  # one shard of a ``world``-process run
        monkeypatch.setattr(ev, "_gather", lambda counts: counts)
        model = _Recorder()
        ev.evaluate_corruptions(model, dataset, *conds, limit=7, batch_size=batch_size, progress=False)
        per_image: dict[int, list[torch.Tensor]] = {}
        index = list(range(rank, 7, world))
        for b in range(0, len(model.seen), 4):  # per batch: clean + 3 corruptions
            ids = index[(b // 4) * batch_size : (b // 4) * batch_size + len(model.seen[b])]
            for k, i in enumerate(ids):
                per_image.setdefault(i, []).extend(model.seen[b + j][k] for j in range(1, 4))
        return per_image

    one, seven = inputs(1), inputs(7)
    shards = {**inputs(3, 0, 2), **inputs(3, 1, 2)}
    for i in range(7):
        for a, b, c in zip(one[i], seven[i], shards[i], strict=True):
            assert torch.equal(a, b) and torch.equal(a, c), f"image {i}"


def test_writer_output_ignores_batch_size(tmp_path):
    images = torch.rand(5, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    source = SourceImages(lambda i: images[i], ["c"] * 5, [f"i{i}" for i in range(5)])
    for bs in (1, 4):
        write_c_dataset(source, tmp_path / str(bs), ["shot_noise", "spatter"], [3], batch_size=bs, progress=False)
    tree = [{p.relative_to(tmp_path / str(bs)): p.read_bytes() for p in (tmp_path / str(bs)).rglob("*.png")}
            for bs in (1, 4)]
    assert len(tree[0]) == 10 and tree[0] == tree[1]


# ----------------------------------------------------------------------------------------------- cases 5 and 6: mCE
def test_mce_says_what_it_covers():
    partial = {"fog": {1: 0.5}, "contrast": {1: 0.6, 2: 0.4}}
    s = metrics.summarize(partial, 0.9)
    assert s["mce_baseline"].startswith("AlexNet") and s["mce_severities"] == [1, 2]
    assert s["mce_complete"] is False and any("2 of 15" in n for n in s["mce_notes"])
    assert any("averages severities 1-5" in n for n in s["mce_notes"])
    full = {c: dict.fromkeys(range(1, 6), 0.5) for c in metrics.ALEXNET_ERR}
    s = metrics.summarize(full, 0.9)
    assert s["mce_complete"] is True and s["mce_notes"] == []


def test_mce_baseline_from_another_models_results(tmp_path):
    result = ev.RobustnessResult("vit", "corrupt", (9, 10), {"fog": {1: (5, 10), 2: (4, 10)}, "snow": {1: (8, 10)}})
    result.save(tmp_path, plots=False)
    base = metrics.resolve_baseline(tmp_path / "robustness.json")
    assert base.name.startswith("vit") and base.clean_error == pytest.approx(0.1)
    assert metrics.mce(result.accuracy, base) == pytest.approx(1.0)
    better = {"fog": {1: 0.75}, "snow": {1: 0.6}}  # errors 0.25 vs 0.5 and 0.4 vs 0.2: CEs 0.5 and 2
    s = metrics.summarize(better, None, base)
    assert s["mce"] == pytest.approx(1.25) and s["mce_severities"] == [1]
    with pytest.raises(InvalidArgumentError, match="no fog error at severity 3"):
        metrics.mce({"fog": {3: 0.5}}, base)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="not a ravit robustness.json"):
        metrics.resolve_baseline(tmp_path / "bad.json")


def test_zero_baseline_error_never_divides_by_zero():
    acc = {"fog": {1: 0.5}, "contrast": {1: 1.0}}
    perfect = {"fog": 0.0, "contrast": 0.2}
    with pytest.raises(InvalidArgumentError, match="mCE is undefined: .* no error on fog"):
        metrics.mce(acc, perfect)
    assert metrics.corruption_errors(acc, perfect) == {"fog": None, "contrast": 0.0}
    s = metrics.summarize(acc, 1.0, perfect)
    assert s["mce"] is None and any("undefined" in n for n in s["mce_notes"])
    flat = metrics.Baseline("flat", {"fog": 0.3}, clean_error=0.3)
    with pytest.raises(InvalidArgumentError, match="relative mCE is undefined"):
        metrics.relative_mce({"fog": {1: 0.5}}, 0.9, flat)
    assert metrics.summarize({"fog": {1: 0.5}}, 0.9, flat)["relative_mce"] is None


# ----------------------------------------------------------------------------------------------- case 7: errors
def test_unreadable_images(tmp_path, capsys):
    src = tmp_path / "src"
    _png(src / "a" / "good.png", (10, 20, 30))
    _png(src / "b" / "good.png", (90, 20, 30))
    (src / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a PNG signature, then nothing
    with pytest.warns(UserWarning, match="bad.png"):
        stats = write_c_dataset(source_images(str(src)), tmp_path / "out", ["contrast"], [1, 2], progress=False)
    assert stats == {"written": 4, "skipped": 0, "unreadable": 1}
    code, err = _main(["corrupt", "--data", str(src), "--output", str(tmp_path / "cli"), "--corruptions", "contrast",
                       "--severities", "1"], capsys)
    assert code == 0 and "warning: skipping an unreadable source image" in err and "bad.png" in err
    with pytest.raises(DataError, match="bad.png: not a readable image"):
        load_rgb(src / "b" / "bad.png")


def test_unreadable_training_image_is_named(tmp_path):
    _png(tmp_path / "train" / "a" / "0.png", (1, 2, 3))
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"not an image")
    ds = create_dataset("imagefolder", "train", data_dir=tmp_path)
    assert ds[0][0].size == (8, 8)
    with pytest.raises(DataError, match="1.png: not a readable image"):
        ds[1]


def test_truncated_idx_files(tmp_path):
    body = b"\0\0\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(2 * 28 * 28)
    (tmp_path / "ok").write_bytes(body)
    assert read_idx(tmp_path / "ok").shape == (2, 28, 28)
    for name, data in (("cut", body[:-5]), ("head", body[:9]), ("cut.gz", gzip.compress(body)[:-30]),
                       ("junk.gz", b"not gzip at all")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            read_idx(tmp_path / name)


def test_cli_arguments_checked_before_the_work(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    out = ["--output", str(tmp_path / "o")]
    for argv, message in (
        (["corrupt", *out, "--device", "banana"], "'banana' is not a device"),
        (["robustness", "fmnist_deit_p4", "--data", "fashion-mnist", "--device", "banana", *out],
         "'banana' is not a device"),
        (["corrupt", "--output", str(afile / "o")], "lies under"),
        (["corrupt", "--output", str(afile)], "is a file"),
        (["robustness", "fmnist_deit_p4", "--data", "fashion-mnist", "--output", str(afile / "r")], "lies under"),
        (["corrupt", *out, "--limit", "0"], "--limit must be >= 1"),
        (["corrupt", *out, "--batch-size", "-1"], "--batch-size must be >= 1"),
        (["robustness", "fmnist_deit_p4", *out, "--limit", "-3"], "--limit must be >= 1"),
        (["robustness", "fmnist_deit_p4", *out, "--workers", "-1"], "--workers must be >= 0"),
        (["robustness", "fmnist_deit_p4", *out, "--mce-baseline", str(tmp_path / "none.json")],
         "mCE baseline results not found"),
    ):
        code, err = _main(argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "o").exists()


def test_cli_prints_the_mce_baseline_and_severities(tmp_path, capsys):
    from ravit.cli import main

    argv = ["robustness", "fmnist_deit_p4", "--pretrained", "--data", "fashion-mnist", "--corruptions", "fog",
            "--severities", "1", "3", "--limit", "4", "--device", "cpu"]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "baseline AlexNet" in out and "severities 1,3" in out and "INCOMPLETE" in out and "nominal" in out
    baseline = str(tmp_path / "a" / "robustness.json")
    assert main([*argv, "--output", str(tmp_path / "b"), "--mce-baseline", baseline]) == 0
    out = capsys.readouterr().out
    assert "baseline fmnist_deit_p4" in out
    summary = json.loads((tmp_path / "b" / "robustness.json").read_text())["summary"]
    assert summary["mce_baseline"].startswith("fmnist_deit_p4") and summary["mce_complete"] is False
