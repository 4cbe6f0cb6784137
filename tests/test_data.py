"""ravit.data: the dataset registry, Fashion-MNIST, ImageFolder, timm transforms with 1 <-> 3 channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ravit.data import (
    ToChannels,
    create_dataset,
    create_transform,
    dataset_info,
    expand_stats,
    find_fashion_mnist,
    list_datasets,
)
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
