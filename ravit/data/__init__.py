"""Datasets: Fashion-MNIST (IDX reader), any ImageFolder, a registry, and timm transforms with 1 <-> 3 channels."""

from ravit.data.classes import CLASS_MAP_FILE, check_same_classes, folder_name, label_map, model_class_names
from ravit.data.datasets import (
    DatasetInfo,
    FashionMNIST,
    create_dataset,
    dataset_info,
    list_datasets,
    register_dataset,
)
from ravit.data.fashion_mnist import CLASSES, find_fashion_mnist, load_fashion_mnist, read_idx
from ravit.data.images import load_image, load_rgb, load_tensor
from ravit.data.transforms import ToChannels, create_transform, expand_stats

__all__ = [
    "CLASSES",
    "CLASS_MAP_FILE",
    "DatasetInfo",
    "FashionMNIST",
    "ToChannels",
    "check_same_classes",
    "create_dataset",
    "create_transform",
    "dataset_info",
    "expand_stats",
    "find_fashion_mnist",
    "folder_name",
    "label_map",
    "list_datasets",
    "load_fashion_mnist",
    "load_image",
    "load_rgb",
    "load_tensor",
    "model_class_names",
    "read_idx",
    "register_dataset",
]
