"""Robustness tools: batched ImageNet-C corruptions, C-dataset writer, benchmark loaders, metrics, evaluation."""

from ravit.robustness.evaluate import (
    ModelInput,
    RobustnessResult,
    evaluate_corruptions,
    evaluate_folder,
    evaluate_imagenet_c,
    image_dataset,
)
from ravit.robustness.metrics import ALEXNET_ERR, mce, mean_accuracy, relative_mce, retention, summarize
from ravit.robustness.registry import (
    ALL_CORRUPTIONS,
    BENCHMARK_CORRUPTIONS,
    CORRUPTION_FAMILIES,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    check_corruption,
    corrupt,
    resolve_corruptions,
)
from ravit.robustness.writer import source_images, write_c_dataset

__all__ = [
    "ALEXNET_ERR",
    "ALL_CORRUPTIONS",
    "BENCHMARK_CORRUPTIONS",
    "CORRUPTION_FAMILIES",
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "SEVERITIES",
    "ModelInput",
    "RobustnessResult",
    "check_corruption",
    "corrupt",
    "evaluate_corruptions",
    "evaluate_folder",
    "evaluate_imagenet_c",
    "image_dataset",
    "mce",
    "mean_accuracy",
    "relative_mce",
    "resolve_corruptions",
    "retention",
    "source_images",
    "summarize",
    "write_c_dataset",
]
