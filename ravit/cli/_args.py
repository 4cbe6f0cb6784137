"""Argument helpers shared by several subcommands (a private module: not a subcommand)."""

from __future__ import annotations

import torch
import yaml

from ravit.cli import CLIError

__all__ = ["add_weight_arguments", "parse_model_kwargs", "resolve_device"]


def resolve_device(name: str | None) -> torch.device:
    """``--device``: 'auto'/None (CUDA when available, else CPU), or a torch device string that exists here."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CLIError(f"--device {name!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: ravit runs on 'cpu' or 'cuda'")
    return device


def add_weight_arguments(parser) -> None:
    """--checkpoint, --pretrained and --model-kwargs: how a subcommand builds and loads its MODEL."""
    parser.add_argument("--checkpoint", help="checkpoint file to load (ravit.load_checkpoint)")
    parser.add_argument("--pretrained", action="store_true", help="load the model's shipped weights (zoo models)")
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra model arguments, e.g. img_size=28 patch_size=4 in_chans=1 num_classes=10")


def parse_model_kwargs(items: list[str] | None) -> dict:
    """``['img_size=28', 'in_chans=1']`` -> ``{'img_size': 28, 'in_chans': 1}`` (values parsed as YAML scalars)."""
    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--model-kwargs expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "not a YAML value"
            raise CLIError(f"--model-kwargs {item!r}: {problem} (values are YAML: 3, 0.5, true, [1, 2])") from None
    return kwargs
