"""``create_model`` / ``list_models``: timm's registry with ravit's families registered and ravit's loader."""

from __future__ import annotations

import fnmatch
import os

import timm
from torch import nn

from ravit.errors import InvalidArgumentError

from . import models  # noqa: F401  (registers ravit's families in timm's registry)
from .checkpoint import load_checkpoint

__all__ = ["create_model", "list_models"]


def create_model(name: str, pretrained: bool = False, checkpoint_path: str | os.PathLike | None = None,
                 **kwargs) -> nn.Module:
    """Any ravit or timm model by name; ``checkpoint_path`` loads a file through ``ravit.load_checkpoint`` (official
    key names mapped, head re-initialised when ``num_classes`` differs). Other kwargs go to the model."""
    if not timm.is_model(name.split(".", 1)[0]):
        close = ", ".join(timm.list_models(f"*{name.split('.', 1)[0][:6]}*")[:8])
        raise InvalidArgumentError(f"unknown model {name!r}" + (f"; similar names: {close}" if close else ""))
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    return model


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Names of ravit's own models (those registered by ``ravit.models``) matching a shell-style ``pattern``."""
    names = []
    for name in timm.list_models(pretrained=pretrained):
        module = getattr(timm.models.model_entrypoint(name.split(".", 1)[0]), "__module__", "")
        if module.startswith("ravit.") and fnmatch.fnmatch(name, pattern):
            names.append(name)
    return names
