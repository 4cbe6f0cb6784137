"""Argument helpers shared by several subcommands (a private module: not a subcommand)."""

from __future__ import annotations

import yaml

from ravit.cli import CLIError

__all__ = ["parse_model_kwargs"]


def parse_model_kwargs(items: list[str] | None) -> dict:
    """``['img_size=28', 'in_chans=1']`` -> ``{'img_size': 28, 'in_chans': 1}`` (values parsed as YAML scalars)."""
    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--model-kwargs expects KEY=VALUE, got {item!r}")
        kwargs[key] = yaml.safe_load(value)
    return kwargs
