"""``create_model`` / ``list_models``: timm's registry with ravit's families registered and ravit's loader."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import os
import sys

import timm
from timm.models import build_model_with_cfg, model_entrypoint
from torch import nn

from ravit.errors import InvalidArgumentError

from . import models  # noqa: F401  (registers ravit's families in timm's registry)
from .checkpoint import load_checkpoint

__all__ = ["accepted_model_kwargs", "create_model", "list_models"]

# Keyword arguments timm's builder takes out of a model's kwargs before they reach the model class.
_BUILDER_KWARGS = frozenset({"features_only", "out_indices", "feature_cls", "pruned", "pretrained_model_args",
                             "device", "dtype"})


def _named_params(fn) -> tuple[set[str], bool]:
    """(names a callable takes by keyword, whether it also takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _init_names(cls: type) -> set[str] | None:
    """Keyword names ``cls(...)`` accepts, following ``**kwargs`` up its bases; None when they leave for parts we
    cannot see (``**kwargs`` that reach ``nn.Module``)."""
    names: set[str] = set()
    for base in cls.__mro__:
        if base in (nn.Module, object):
            return None
        if "__init__" in vars(base):
            own, open_ended = _named_params(base.__init__)
            names |= own
            if not open_ended:
                return names
    return None


def accepted_model_kwargs(name: str) -> set[str] | None:
    """Keyword names ``create_model(name, ...)`` can pass on, or None when they cannot be known without building it.

    The entry point hands its ``**kwargs`` to a model class of its module (timm's ``build_model_with_cfg`` in between),
    so the names are the entry point's, the builder's, those of the module's functions (``_create_*`` helpers) and of
    its model classes (those taking ``num_classes``). A model class whose ``**kwargs`` leave for unseen parts makes the
    set unknowable. A superset on purpose: it catches a misspelt or foreign key, never refuses one the model takes.
    """
    entrypoint = model_entrypoint(name)
    base = getattr(entrypoint, "base_architecture", None)  # a zoo name: the architecture's kwargs
    names, _ = _named_params(entrypoint)
    if base is not None:
        inner = accepted_model_kwargs(base)
        return None if inner is None else names | inner
    names |= _named_params(timm.create_model)[0] | _named_params(build_model_with_cfg)[0] | _BUILDER_KWARGS
    module = sys.modules[entrypoint.__module__]
    found_model = False
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            init = _init_names(obj)
            if init is None and "num_classes" in _named_params(obj.__init__)[0]:
                return None
            if init is not None and "num_classes" in init:
                found_model = True
                names |= init
        elif inspect.isfunction(obj) and obj.__module__ == module.__name__:
            names |= _named_params(obj)[0]
    return names if found_model else None


def _check_kwargs(name: str, kwargs: dict) -> None:
    accepted = accepted_model_kwargs(name)
    if accepted is None:
        return
    for key, value in kwargs.items():
        if value is not None and key not in accepted:  # timm drops None-valued kwargs before the model sees them
            close = difflib.get_close_matches(key, sorted(accepted), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidArgumentError(f"model {name!r} takes no argument {key!r}{hint}")


def create_model(name: str, pretrained: bool = False, checkpoint_path: str | os.PathLike | None = None,
                 new_head: bool | None = None, **kwargs) -> nn.Module:
    """Any ravit or timm model by name; ``checkpoint_path`` loads a file through ``ravit.load_checkpoint`` (official
    key names mapped). ``new_head``: whether a classifier that differs from the checkpoint's may be re-initialised
    (logged); None follows timm's convention, allowed only when ``num_classes`` is given. Other kwargs go to the
    model; a name the model does not take is an ``InvalidArgumentError``."""
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = ", ".join(timm.list_models(f"*{arch[:6]}*")[:8])
        raise InvalidArgumentError(f"unknown model {name!r}" + (f"; similar names: {close}" if close else ""))
    _check_kwargs(arch, kwargs)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if pretrained and str(err).startswith("No pretrained weights exist"):  # timm's message for this user error
            released = ", ".join(timm.list_pretrained(f"{arch}.*")) or "none"
            raise InvalidArgumentError(f"{name!r} has no pretrained weights (released tags: {released}); "
                                       "load a file with checkpoint_path= / --checkpoint") from None
        raise
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, new_head="num_classes" in kwargs if new_head is None else new_head)
    return model


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Names of ravit's own models (those registered by ``ravit.models``) matching a shell-style ``pattern``."""
    names = []
    for name in timm.list_models(pretrained=pretrained):
        module = getattr(timm.models.model_entrypoint(name.split(".", 1)[0]), "__module__", "")
        if module.startswith("ravit.") and fnmatch.fnmatch(name, pattern):
            names.append(name)
    return names
