"""The Fashion-MNIST 'holdout' validation split: carved from the training split, fixed, disjoint from the rest."""

from __future__ import annotations

import pytest
import torch

from ravit.data import create_dataset
from ravit.data.datasets import HOLDOUT_SIZE, holdout_indices
from ravit.data.fashion_mnist import find_fashion_mnist


def test_holdout_indices_partition_the_training_split():
    held, rest = holdout_indices(60000, "holdout"), holdout_indices(60000, "train-holdout")
    assert len(held) == HOLDOUT_SIZE and len(rest) == 60000 - HOLDOUT_SIZE
    assert torch.equal(torch.cat([held, rest]).sort().values, torch.arange(60000))
    assert torch.equal(held, holdout_indices(60000, "holdout"))  # fixed: independent of any global RNG state
    torch.manual_seed(123)
    assert torch.equal(held, holdout_indices(60000, "holdout"))


def test_holdout_datasets_are_training_images():
    try:
        find_fashion_mnist()
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")
    train = create_dataset("fashion_mnist", "train")
    held = create_dataset("fashion_mnist", "holdout")
    rest = create_dataset("fashion_mnist", "train-holdout")
    assert len(held) + len(rest) == len(train)
    index = holdout_indices(len(train), "holdout")
    assert torch.equal(held.images, train.images[index])
    assert held.targets == [train.targets[i] for i in index.tolist()]
    assert len(set(held.targets)) == 10
