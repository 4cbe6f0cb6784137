"""Datasets: Fashion-MNIST (IDX reader), any ImageFolder, a registry, timm transforms with 1 <-> 3 channels, and
what input a model expects (``ModelInput``)."""

from ravit.data.classes import CLASS_MAP_FILE, check_same_classes, folder_name, label_map, model_class_names
from ravit.data.datasets import (
    DatasetInfo,
    FashionMNIST,
    check_data,
    create_dataset,
    data_name,
    data_names,
    dataset_info,
    list_datasets,
    open_data,
    register_dataset,
)
from ravit.data.fashion_mnist import CLASSES, find_fashion_mnist, load_fashion_mnist, read_idx
from ravit.data.images import load_image, load_rgb, load_tensor
from ravit.data.model_input import ModelInput
from ravit.data.transforms import ToChannels, create_transform, expand_stats

__all__ = [
    "CLASSES",
    "CLASS_MAP_FILE",
    "DatasetInfo",
    "FashionMNIST",
    "ModelInput",
    "ToChannels",
    "check_data",
    "check_same_classes",
    "create_dataset",
    "create_transform",
    "data_name",
    "data_names",
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
    "open_data",
    "read_idx",
    "register_dataset",
]
