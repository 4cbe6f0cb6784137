"""Robustness metrics (hand-worked mCE), benchmark masks, C-dataset writer (resume), evaluation and its errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ravit.robustness import metrics
from ravit.robustness.benchmarks import (
    check_classes,
    class_mask,
    imagenet_a_indices,
    imagenet_a_synsets,
    imagenet_c_folder,
    imagenet_r_indices,
    imagenet_r_synsets,
    imagenet_synsets,
)
from ravit.robustness.evaluate import evaluate_corruptions, evaluate_folder, evaluate_imagenet_c
from ravit.robustness.writer import SourceImages, write_c_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- metrics
def test_mce_hand_worked():
    # gaussian_noise: 50 % accuracy at every severity -> error 0.5 -> CE = 0.5 / 0.886428 = 0.564062
    # brightness: accuracies .9 .8 .7 .6 .5 -> mean error 0.3 -> CE = 0.3 / 0.564592 = 0.531357
    # mCE = (0.564062 + 0.531357) / 2 = 0.547710
    # relative, clean accuracy 0.8 (error 0.2), AlexNet clean error 0.43478:
    #   gaussian (0.5 - 0.2) / (0.886428 - 0.43478) = 0.664235; brightness (0.3 - 0.2) / (0.564592 - 0.43478) = 0.770345
    #   relative mCE = 0.717290
    acc = {"gaussian_noise": dict.fromkeys(range(1, 6), 0.5), "brightness": {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.5}}
    ce = metrics.corruption_errors(acc)
    assert ce["gaussian_noise"] == pytest.approx(0.564062, abs=1e-6)
    assert ce["brightness"] == pytest.approx(0.531357, abs=1e-6)
    assert metrics.mce(acc) == pytest.approx(0.547710, abs=1e-6)
    assert metrics.relative_mce(acc, 0.8) == pytest.approx(0.717290, abs=1e-6)
    assert metrics.retention(acc, 0.8)["brightness"][1] == pytest.approx(0.9 / 0.8)
    # Extra corruptions count in the 19-mean, never in mCE.
    acc["speckle_noise"] = dict.fromkeys(range(1, 6), 0.2)
    s = metrics.summarize(acc, 0.8)
    assert s["mce"] == pytest.approx(0.547710, abs=1e-6)
    assert s["mean_corruption_accuracy_15"] == pytest.approx((0.5 + 0.7) / 2)
    assert s["mean_corruption_accuracy_all"] == pytest.approx((0.5 + 0.7 + 0.2) / 3)
    assert s["complete_15"] is False
    assert s["mean_retention_all"] == pytest.approx((0.5 + 0.7 + 0.2) / 3 / 0.8)


def test_alexnet_table():
    from ravit.robustness import BENCHMARK_CORRUPTIONS

    assert tuple(metrics.ALEXNET_ERR) == BENCHMARK_CORRUPTIONS
    assert metrics.ALEXNET_ERR["jpeg_compression"] == 0.606500  # FAN's 'jPEG' typo dropped it (NVlabs/FAN#7)
    assert metrics.mce({c: dict.fromkeys(range(1, 6), 1 - e) for c, e in metrics.ALEXNET_ERR.items()}) == 1.0


# ----------------------------------------------------------------------------------------------- benchmarks
def test_imagenet_a_r_masks():
    a, r = imagenet_a_indices(), imagenet_r_indices()
    assert len(a) == len(set(a)) == 200 and len(r) == len(set(r)) == 200
    assert sum(a) == 102178 and sum(r) == 86135
    assert a[:5] == (6, 11, 13, 15, 17) and a[-4:] == (984, 986, 987, 988)
    assert r[:6] == (1, 2, 4, 6, 8, 9) and r[-4:] == (980, 981, 983, 988)
    assert list(a) == sorted(a) and list(r) == sorted(r)
    assert len(set(a) & set(r)) == 86
    syn = imagenet_synsets()
    assert len(syn) == 1000
    assert [syn[i] for i in a] == list(imagenet_a_synsets()) and [syn[i] for i in r] == list(imagenet_r_synsets())
    assert torch.equal(class_mask("imagenet-a"), torch.tensor(a)) and class_mask("sketch") is None


class _PixelClassifier(nn.Module):
    """Test model: the class is encoded in the image's mean grey level; ``decoy`` adds a larger logit elsewhere."""

    def __init__(self, num_classes: int, levels: dict[int, int], decoy: int | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(3, 1, 1)  # present so the input spec can read the channel count
        self.levels, self.decoy = levels, decoy
        self.pretrained_cfg = dict(input_size=(3, 8, 8), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0,
                                   interpolation="bilinear")

    def forward(self, x):
        level = torch.round(x.mean((1, 2, 3)) * 255).long()
        logits = torch.zeros(x.shape[0], self.num_classes)
        for i, v in enumerate(level.tolist()):
            logits[i, self.levels[v]] = 1
            if self.decoy is not None:
                logits[i, self.decoy] = 5
        return logits


def _folder(root: Path, classes: list[str], level_of) -> None:
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), level_of(k), np.uint8)).save(root / c / "a.png")


def test_imagenet_r_mask_applied(tmp_path):
    syn = imagenet_r_synsets()
    _folder(tmp_path, sorted(syn), lambda k: k + 10)
    order = {s: i for i, s in enumerate(imagenet_synsets())}
    levels = {k + 10: order[s] for k, s in enumerate(sorted(syn))}
    decoy = 0  # class 0 (tench) is not an ImageNet-R class: without the mask it would win every image
    assert decoy not in imagenet_r_indices()
    model = _PixelClassifier(1000, levels, decoy)
    res = evaluate_folder(model, tmp_path, "imagenet-r", progress=False)
    assert res.clean == (200, 200) and res.clean_accuracy == 1
    image = torch.full((1, 3, 8, 8), 10 / 255)
    assert int(model(image).argmax()) == decoy, "unmasked, the decoy class would win"
    # As a plain folder the 200 wnids are matched by name to the 1000 classes, with no mask: the decoy wins.
    assert evaluate_folder(model, tmp_path, "folder", progress=False).clean == (0, 200)
    with pytest.raises(ValueError, match="imagenet-a wnids"):
        evaluate_folder(model, tmp_path, "imagenet-a", progress=False)


def test_class_mismatch_errors(tmp_path):
    with pytest.raises(ValueError, match="3 class folders .* but the model has 10 classes"):
        check_classes(["a", "b", "c"], 10)
    with pytest.raises(ValueError, match="not ImageNet-1k wnids"):
        check_classes([f"n{i:08d}" for i in range(1000)], 1000)
    with pytest.raises(ValueError, match="1000-class"):
        check_classes(list(imagenet_a_synsets()), 10, "imagenet-a")


def test_imagenet_c_layout_errors(tmp_path):
    (tmp_path / "fog" / "1" / "x").mkdir(parents=True)
    assert imagenet_c_folder(tmp_path, "fog", 1) == tmp_path / "fog" / "1"
    with pytest.raises(FileNotFoundError, match="severity folder missing: .*fog/2"):
        imagenet_c_folder(tmp_path, "fog", 2)
    with pytest.raises(FileNotFoundError, match="corruption folder missing: .*snow"):
        imagenet_c_folder(tmp_path, "snow", 1)
    with pytest.raises(ValueError, match="valid names"):
        imagenet_c_folder(tmp_path, "rain", 1)
    with pytest.raises(ValueError, match="valid severities"):
        imagenet_c_folder(tmp_path, "fog", 6)


# ----------------------------------------------------------------------------------------------- writer
def _tiny_source(n: int = 10) -> SourceImages:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 16, 20, generator=g)
    return SourceImages(lambda i: images[i], [f"class{i % 3}" for i in range(n)], [f"img{i:02d}" for i in range(n)])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writer_resume_after_interruption(tmp_path, monkeypatch):
    source, kw = _tiny_source(), dict(corruptions=["gaussian_noise", "zoom_blur"], severities=[1, 3], batch_size=4,
                                      progress=False)
    full = write_c_dataset(source, tmp_path / "full", **kw)
    assert full == {"written": 40, "skipped": 0, "unreadable": 0}
    expected = _tree(tmp_path / "full")
    assert len(expected) == 41 and "gaussian_noise/3/class1/img04.png" in expected and "ravit-corrupt.json" in expected

    import ravit.robustness.writer as writer

    real_replace, calls = os.replace, {"n": 0}

    def dying_replace(src, dst):  # the process "dies" while the 18th image is being put in place (after the settings)
        calls["n"] += 1
        if calls["n"] == 19:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        write_c_dataset(source, tmp_path / "run", **kw)
    monkeypatch.setattr(writer.os, "replace", real_replace)
    partial = _tree(tmp_path / "run")
    finished = {k: v for k, v in partial.items() if not Path(k).name.startswith(".")}
    assert len(finished) == 18 and all(expected[k] == v for k, v in finished.items()), "no half-written image"
    again = write_c_dataset(source, tmp_path / "run", **kw)
    assert again == {"written": 23, "skipped": 17, "unreadable": 0}
    assert not any(Path(k).name.endswith(".tmp") for k in partial), "the interrupted write removed its temp file"
    assert _tree(tmp_path / "run") == expected, "a resumed run writes what an uninterrupted one does, temp files gone"


def test_writer_fashion_mnist_recipe(tmp_path):
    from ravit.robustness.writer import source_images

    try:
        source = source_images("fashion-mnist", "test", recipe="imagenet-c").head(3)
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")
    write_c_dataset(source, tmp_path, ["contrast"], [2], recipe="imagenet-c", progress=False)
    files = sorted(tmp_path.rglob("*.JPEG"))
    assert len(files) == 3 and files[0].parent.parent == tmp_path / "contrast" / "2"
    with Image.open(files[0]) as im:
        assert im.size == (224, 224) and im.format == "JPEG"


# ----------------------------------------------------------------------------------------------- evaluation
class _Tiny(nn.Module):
    num_classes = 10

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(16, 10))
        self.pretrained_cfg = dict(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,), crop_pct=1.0,
                                   interpolation="bilinear")

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def fmnist():
    from ravit.robustness.evaluate import ModelInput, image_dataset

    try:
        return image_dataset("fashion-mnist", ModelInput.from_model(_Tiny()), "test")
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")


def test_evaluate_on_the_fly_and_outputs(fmnist, tmp_path):
    res = evaluate_corruptions(_Tiny(), fmnist, ["gaussian_noise", "brightness", "speckle_noise"], [1, 5], limit=24,
                               batch_size=8, progress=False)
    assert res.clean[1] == 24 and set(res.counts) == {"gaussian_noise", "brightness", "speckle_noise"}
    assert all(n == 24 for sev in res.counts.values() for _, n in sev.values())
    again = evaluate_corruptions(_Tiny(), fmnist, ["gaussian_noise", "brightness", "speckle_noise"], [1, 5], limit=24,
                                 batch_size=8, progress=False)
    assert again.counts == res.counts, "seeded: the same run gives the same counts"
    paths = res.save(tmp_path)
    names = {p.name for p in paths}
    assert names == {"robustness.json", "robustness.csv", "accuracy_vs_severity.png", "accuracy_by_corruption.png"}
    data = json.loads((tmp_path / "robustness.json").read_text())
    assert data["summary"]["corruptions_in_15"] == ["gaussian_noise", "brightness"]
    assert data["summary"]["mce"] == pytest.approx(metrics.mce(res.accuracy))
    rows = (tmp_path / "robustness.csv").read_text().splitlines()
    assert rows[0].startswith("corruption,severity,accuracy") and len(rows) == 1 + 1 + 6
    assert not list(tmp_path.glob(".*.tmp"))


def test_evaluate_rejects_bad_input(fmnist, tmp_path):
    with pytest.raises(ValueError, match="valid names"):
        evaluate_corruptions(_Tiny(), fmnist, ["rain"], [1], limit=4, progress=False)
    with pytest.raises(ValueError, match="valid severities"):
        evaluate_corruptions(_Tiny(), fmnist, ["fog"], [0], limit=4, progress=False)
    wide = _Tiny()
    wide.num_classes = 1000
    with pytest.raises(ValueError, match="10 class folders .* 1000 classes"):
        evaluate_corruptions(wide, fmnist, ["fog"], [1], limit=4, progress=False)
    (tmp_path / "fog" / "1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="severity folder missing: .*fog/2"):
        evaluate_imagenet_c(_Tiny(), tmp_path, ["fog"], [1, 2], progress=False)


def test_evaluate_imagenet_c_folder(tmp_path):
    from ravit.robustness.evaluate import ModelInput

    classes = [f"c{k}" for k in range(10)]
    levels = {20 * k + 5: k for k in range(10)}
    for c, s in (("fog", 1), ("fog", 2), ("snow", 1)):
        _folder(tmp_path / "c" / c / str(s), classes, lambda k: 20 * k + 5)
    _folder(tmp_path / "clean", classes, lambda k: 20 * k + 5)
    model = _PixelClassifier(10, levels)
    assert ModelInput.from_model(model).size == (8, 8)
    res = evaluate_imagenet_c(model, tmp_path / "c", ["fog", "snow"], [1], clean_root=tmp_path / "clean",
                              progress=False)
    assert res.clean == (10, 10) and res.counts == {"fog": {1: (10, 10)}, "snow": {1: (10, 10)}}
    assert res.summary()["mce"] == 0.0 and res.summary()["relative_mce"] == 0.0


DDP_SCRIPT = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_robustness_eval import _Tiny
from ravit.robustness.evaluate import ModelInput, evaluate_corruptions, image_dataset
dist.init_process_group("gloo")
ds = image_dataset("fashion-mnist", ModelInput.from_model(_Tiny()), "test")
res = evaluate_corruptions(_Tiny(), ds, ["contrast"], [1], limit=10, batch_size=4, progress=False)
if dist.get_rank() == 0:
    print("RESULT", res.clean[0], res.clean[1], res.counts["contrast"][1][1])
dist.destroy_process_group()
"""


def test_ddp_two_ranks_gather_counts(fmnist, tmp_path):
    import subprocess

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))
    single = evaluate_corruptions(_Tiny(), fmnist, ["contrast"], [1], limit=10, batch_size=4, progress=False)
    assert line.split()[1:] == [str(single.clean[0]), "10", "10"], "ranks score disjoint shards, summed once"


def test_cli_errors_and_writer(tmp_path, capsys):
    from ravit.cli import main

    assert main(["corrupt", "--output", str(tmp_path / "c"), "--corruptions", "rain"]) == 2
    assert "valid names: gaussian_noise" in capsys.readouterr().err
    assert main(["corrupt", "--output", str(tmp_path / "c"), "--severities", "0"]) == 2
    assert "valid severities: 1, 2, 3, 4, 5" in capsys.readouterr().err
    assert main(["robustness", "test_vit", "--data", str(tmp_path / "missing"), "--benchmark", "imagenet-c"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["robustness", "test_vit", "--benchmark", "imagenet-c"]) == 2  # --data fashion-mnist: not a folder
    assert "reads a folder" in capsys.readouterr().err
    src = tmp_path / "src"
    _folder(src, ["a", "b"], lambda k: 40 + 100 * k)
    argv = ["corrupt", "--data", str(src), "--output", str(tmp_path / "c"), "--corruptions", "noise", "--severities"]
    assert main([*argv, "2,4"]) == 0
    assert len(list((tmp_path / "c").rglob("*.png"))) == 4 * 2 * 2
    assert (tmp_path / "c" / "speckle_noise" / "4" / "b" / "a.png").is_file()
    assert main([*argv, "2", "4"]) == 0  # the same list written the other way: the same images, all already there
    assert "wrote 0 images, skipped 16 already present" in capsys.readouterr().out


def test_fashion_mnist_view_is_the_one_dataset_class(fmnist):
    """The robustness view of Fashion-MNIST is ravit.data's FashionMNIST with [0, 1] tensors: the IDX pixels / 255 at
    the model's 28x28, under either spelling of the name."""
    from ravit.data import FashionMNIST, load_fashion_mnist
    from ravit.robustness.evaluate import ModelInput, image_dataset

    images, labels = load_fashion_mnist("test")
    other = image_dataset("fashion_mnist", ModelInput.from_model(_Tiny()), "test")
    assert isinstance(fmnist, FashionMNIST) and isinstance(other, FashionMNIST)
    for i in (0, 7):
        x, y = fmnist[i]
        assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and y == int(labels[i])
        torch.testing.assert_close(x[0], images[i].float() / 255, rtol=0, atol=0)
        torch.testing.assert_close(other[i][0], x, rtol=0, atol=0)
