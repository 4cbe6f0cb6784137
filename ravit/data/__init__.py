"""Datasets: Fashion-MNIST (IDX reader), and more added by the training work."""

from ravit.data.fashion_mnist import CLASSES, find_fashion_mnist, load_fashion_mnist, read_idx

__all__ = ["CLASSES", "find_fashion_mnist", "load_fashion_mnist", "read_idx"]
