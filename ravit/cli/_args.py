"""Argument helpers shared by several subcommands (a private module: not a subcommand)."""

from __future__ import annotations

import yaml

from ravit.cli import CLIError

__all__ = ["add_weight_arguments", "parse_model_kwargs"]


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
        kwargs[key] = yaml.safe_load(value)
    return kwargs
