"""ravit.data: the dataset registry, Fashion-MNIST, ImageFolder, --data names and folders, timm transforms with
1 <-> 3 channels, and what input a model expects (ModelInput)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN

from ravit.data import (
    ModelInput,
    ToChannels,
    check_data,
    create_dataset,
    create_transform,
    data_name,
    dataset_info,
    expand_stats,
    find_fashion_mnist,
    list_datasets,
    open_data,
)
from ravit.errors import InvalidArgumentError, MissingFileError
from ravit.train.loop import seed_everything


@pytest.fixture(scope="module")
def fmnist():
    try:
        return find_fashion_mnist()
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")


@pytest.fixture
def image_folder(tmp_path):
    """train/ and val/ splits, two classes of three 12x10 RGB images each, colours known per class."""
    for split in ("train", "val"):
        for label, colour in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (10, 12), colour).save(folder / f"{i}.png")
    return tmp_path


def test_registry_lists_both_datasets():
    assert {"fashion_mnist", "imagefolder"} <= set(list_datasets())
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        create_dataset("nope")


def test_fashion_mnist_eval_transform_is_exact_normalisation(fmnist):
    info = dataset_info("fashion_mnist")
    ds = create_dataset("fashion_mnist", "test", transform=create_transform(28, 1, info.mean, info.std, crop_pct=1.0))
    raw = create_dataset("fashion_mnist", "test")
    assert len(ds) == 10_000 and len(ds.classes) == 10
    x, y = ds[3]
    pixels = torch.from_numpy(np.asarray(raw[3][0], dtype=np.float32)) / 255  # (28, 28)
    assert x.shape == (1, 28, 28) and y == raw[3][1]
    torch.testing.assert_close(x[0], (pixels - info.mean[0]) / info.std[0])


def test_fashion_mnist_to_three_channels(fmnist):
    info = dataset_info("fashion_mnist")
    ds = create_dataset("fashion_mnist", "test", transform=create_transform(32, 3, info.mean, info.std, crop_pct=1.0))
    x, _ = ds[0]
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x[0], x[1])
    torch.testing.assert_close(x[1], x[2])


def test_fashion_mnist_missing_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        create_dataset("fashion_mnist", "train", data_dir=tmp_path)


def test_train_transform_is_random_but_seedable(fmnist):
    info = dataset_info("fashion_mnist")
    tf = create_transform(28, 1, info.mean, info.std, is_training=True, scale=(0.5, 1.0), hflip=0.5)
    img = create_dataset("fashion_mnist", "train")[0][0]
    seed_everything(0)  # timm's crops draw from python's random, flips from torch's
    first = torch.stack([tf(img) for _ in range(4)])
    seed_everything(0)
    again = torch.stack([tf(img) for _ in range(4)])
    assert not torch.equal(first[0], first[1])  # augmentation varies
    torch.testing.assert_close(first, again)  # ... as a function of the RNG state


@pytest.mark.parametrize("in_chans", [1, 3])
def test_image_folder(image_folder, in_chans):
    info = dataset_info("imagefolder")
    tf = create_transform(8, in_chans, info.mean, info.std, crop_pct=1.0)
    ds = create_dataset("imagefolder", "train", data_dir=image_folder, transform=tf)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    x, y = ds[5]
    assert x.shape == (in_chans, 8, 8) and y == 1
    if in_chans == 3:  # a blue image: blue channel well above red after normalisation
        assert x[2].mean() > x[0].mean()


def test_image_folder_errors(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="split 'test' not found"):
        create_dataset("imagefolder", "test", data_dir=image_folder)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="is empty"):
        create_dataset("imagefolder", "train", data_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="needs a data_dir"):
        create_dataset("imagefolder", "train")
    with pytest.raises(ValueError, match="no split 'dev'"):
        create_dataset("imagefolder", "dev", data_dir=image_folder)


def test_channel_helpers():
    rgb = Image.new("RGB", (4, 4), (255, 0, 0))
    assert ToChannels(1)(rgb).mode == "L" and ToChannels(3)(rgb.convert("L")).mode == "RGB"
    assert ToChannels(3)(rgb) is rgb
    with pytest.raises(ValueError, match="1 or 3"):
        ToChannels(2)
    assert expand_stats((0.5,), 3) == (0.5, 0.5, 0.5)
    assert expand_stats((0.2, 0.4, 0.6), 1) == pytest.approx((0.4,))
    with pytest.raises(ValueError):
        expand_stats((0.1, 0.2), 3)


# --- --data: names and folders ---------------------------------------------------------------------------------------
def test_data_names_and_folders(tmp_path):
    assert data_name("fashion-mnist") == data_name("fashion_mnist") == data_name("Fashion-MNIST") == "fashion_mnist"
    assert data_name("imagefolder") is None and data_name(tmp_path) is None
    assert check_data("fashion_mnist") == check_data("fashion-mnist") == "fashion-mnist"
    assert check_data(tmp_path) == str(tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"unknown data 'cifar10'.*\(fashion-mnist\)"):
        check_data("cifar10")
    with pytest.raises(MissingFileError, match="data folder not found"):
        check_data(tmp_path / "nowhere")


def test_open_data_reads_a_folder_or_its_split(tmp_path):
    for root, cls in ((tmp_path / "split" / "train", "cat"), (tmp_path / "split" / "test", "dog"),
                      (tmp_path / "split" / "test", "owl"), (tmp_path / "flat", "cat")):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / cls / "0.png")
    assert open_data(tmp_path / "split", "test").classes == ["dog", "owl"]
    assert open_data(tmp_path / "split", "train").classes == ["cat"]
    assert open_data(tmp_path / "flat", "test").classes == ["cat"]
    with pytest.raises(MissingFileError, match="no images"):
        open_data(tmp_path / "split" / "test" / "owl")


# --- ModelInput ------------------------------------------------------------------------------------------------------
def test_model_input_follows_the_model_as_built():
    model = timm.create_model("deit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, num_classes=10)
    cfg = model.pretrained_cfg
    spec = ModelInput.from_model(model)
    assert spec.size == (28, 28) and spec.in_chans == 1  # not the config's (3, 224, 224)
    assert spec.mean == pytest.approx((sum(IMAGENET_DEFAULT_MEAN) / 3,))
    assert (spec.crop_pct, spec.interpolation) == (cfg["crop_pct"], cfg["interpolation"])
    assert ModelInput.from_model(model, img_size=32).size == (32, 32)


def test_model_input_of_weights_trained_on_a_dataset():
    """ravit train's eval transform: the dataset's statistics and crop, bilinear, and its native size for a model that
    takes any size; without a training dataset, the pretrained config's."""
    info = dataset_info("fashion_mnist")
    cnn = timm.create_model("resnet18", in_chans=1, num_classes=10)
    assert ModelInput.from_model(cnn).size == (224, 224)
    spec = ModelInput.from_model(cnn, trained_on=info)
    assert spec == ModelInput((28, 28), 1, info.mean, info.std, info.crop_pct, "bilinear")
    assert ModelInput.from_model(timm.create_model("resnet18"), trained_on=info).mean == info.mean * 3


@pytest.mark.parametrize("mode,in_chans,size,crop_pct", [("L", 1, (28, 28), 1.0), ("RGB", 3, (16, 16), 0.875),
                                                         ("RGB", 3, (12, 16), 0.9)])
def test_model_input_transforms_agree(mode, in_chans, size, crop_pct):
    """The [0, 1] view (robustness: corrupted before normalising) normalised equals the model's eval transform."""
    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3) if mode == "RGB" else (28, 28), dtype=np.uint8)
    img = Image.fromarray(pixels, mode)
    spec = ModelInput(size, in_chans, (0.4,) * in_chans, (0.2,) * in_chans, crop_pct, "bicubic")
    unit = spec.unit_transform()(img)  # (C, H, W) in [0, 1]
    assert unit.shape == (in_chans, *size) and unit.min() >= 0 and unit.max() <= 1
    if (mode, crop_pct) == ("L", 1.0):  # the model's own size: the pixels, untouched
        torch.testing.assert_close(unit[0], torch.from_numpy(pixels).float() / 255, rtol=0, atol=0)
    torch.testing.assert_close(spec.normalize(unit[None])[0], spec.transform()(img))


def test_model_input_normalize_converts_channels():
    spec = ModelInput((2, 2), 1, (0.5,), (0.5,))
    rgb = torch.zeros(1, 3, 2, 2)
    rgb[:, 1] = 1.0  # pure green
    torch.testing.assert_close(spec.normalize(rgb), torch.full((1, 1, 2, 2), (0.587 - 0.5) / 0.5))
    grey = torch.full((1, 1, 2, 2), 0.25)
    three = ModelInput((2, 2), 3, (0.0, 0.5, 0.25), (1.0, 0.5, 0.25))
    torch.testing.assert_close(three.normalize(grey)[0, :, 0, 0], torch.tensor([0.25, -0.5, 0.0]))
