"""Datasets: Fashion-MNIST (IDX reader), any ImageFolder, a registry, and timm transforms with 1 <-> 3 channels."""

from ravit.data.datasets import (
    DatasetInfo,
    FashionMNIST,
    create_dataset,
    dataset_info,
    list_datasets,
    register_dataset,
)
from ravit.data.fashion_mnist import CLASSES, find_fashion_mnist, load_fashion_mnist, read_idx
from ravit.data.transforms import ToChannels, create_transform, expand_stats

__all__ = [
    "CLASSES",
    "DatasetInfo",
    "FashionMNIST",
    "ToChannels",
    "create_dataset",
    "create_transform",
    "dataset_info",
    "expand_stats",
    "find_fashion_mnist",
    "list_datasets",
    "load_fashion_mnist",
    "read_idx",
    "register_dataset",
]
