"""The one checkpoint loader for every ravit (and timm) model, plus ``save_checkpoint`` for ravit's own files.

Reads ``.safetensors``, ``.pth``/``.pth.tar``/``.bin``/``.pt`` (a plain state dict, or one wrapped in ``model`` /
``state_dict`` / ``state_dict_ema`` / ``model_ema``), strips ``module.`` and ``_orig_mod.`` prefixes, loads with
``weights_only=True`` and an allowlist for timm training checkpoints (reference/ecosystem.md §2), maps official key
names through the model family's ``checkpoint_filter_fn(state_dict, model)``, re-initialises the classifier when its
shape differs, and otherwise fails with an error naming the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ravit.errors import DataError, InvalidArgumentError, MissingFileError

__all__ = ["CheckpointError", "load_checkpoint", "load_state_dict", "save_checkpoint", "use_ravit_loader"]

_WRAPPERS_EMA = ("state_dict_ema", "model_ema")
_WRAPPERS = ("state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(DataError):
    """A checkpoint that does not fit the model (or cannot be read safely)."""


def _safe_globals() -> list:
    """Non-tensor objects in timm training checkpoints ('args', 'metric'): argparse.Namespace and numpy scalars."""
    allowed: list = [argparse.Namespace, np.dtype]
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    allowed.append(core.multiarray.scalar)
    allowed.extend(cls for cls in vars(np.dtypes).values() if isinstance(cls, type))
    return allowed


def _torch_load(path: Path, trust_checkpoint: bool) -> object:
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError (and others) for objects outside the allowlist
        raise CheckpointError(
            f"{path} holds objects that weights_only loading refuses ({type(err).__name__}: {str(err)[:300]}); "
            "if you trust the file, pass trust_checkpoint=True") from err


def load_state_dict(path: str | os.PathLike, use_ema: bool = False,
                    trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict (unwrapped, prefixes stripped, keys as stored)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        obj: object = load_file(path, device="cpu")
    else:
        obj = _torch_load(path, trust_checkpoint)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    wrappers = (_WRAPPERS_EMA if use_ema else ()) + _WRAPPERS
    for key in wrappers:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    else:
        if use_ema:
            raise CheckpointError(f"use_ema=True but {path} has no EMA weights (keys: {sorted(obj)[:8]})")
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; keys found: "
                                  f"{sorted(obj)[:8]}")
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state_dict[key] = value
    return state_dict


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _checkpoint_model_name(path: Path) -> str | None:
    if path.suffix != ".safetensors":
        return None
    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("model")


def _classifier_keys(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or "head"
    names = (names,) if isinstance(names, str) else tuple(names)
    return [f"{name}.{param}" for name in names for param in ("weight", "bias")]


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_checkpoint(model: nn.Module, path: str | os.PathLike, use_ema: bool = False, strict: bool = True,
                    trust_checkpoint: bool = False) -> nn.Module:
    """Load ``path`` into ``model`` in place and return the model.

    Official key names are mapped by the ``checkpoint_filter_fn`` of the model's module, when it has one. A classifier
    whose shape differs from the checkpoint's (other ``num_classes``, or none) keeps its fresh initialisation. Any
    other difference raises ``CheckpointError`` listing the missing, unexpected and mis-shaped keys (``strict=False``
    loads what fits and ignores the rest).
    """
    path = Path(path)
    state_dict = load_state_dict(path, use_ema=use_ema, trust_checkpoint=trust_checkpoint)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)

    own = model.state_dict()
    for key in _classifier_keys(model):
        if key in state_dict and (key not in own or own[key].shape != state_dict[key].shape):
            del state_dict[key]  # head re-initialised: the model keeps its own (random) classifier
        if key not in state_dict and key in own:
            state_dict[key] = own[key]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if misshaped or (strict and (missing or unexpected)):
        saved_as = _checkpoint_model_name(path)
        lines = [f"checkpoint {path} does not fit model '{_model_name(model)}'"
                 + (f" (it was saved from '{saved_as}')" if saved_as else "") + ":"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_describe(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {_describe(unexpected)}")
        if misshaped:
            lines.append(f"  {len(misshaped)} mis-shaped keys: {_describe(misshaped, 4)}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=strict)
    return model


def save_checkpoint(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state dict as ``.safetensors`` with the model name in the metadata (atomically)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidArgumentError(f"ravit saves .safetensors files, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}  # no shared storage
    meta = {"format": "pt", "model": _model_name(model), "num_classes": str(getattr(model, "num_classes", ""))}
    meta.update(metadata or {})
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def use_ravit_loader(kwargs: dict) -> dict:
    """Route a file given as ``pretrained_cfg_overlay=dict(file=...)`` through the model's ``load_pretrained`` (and so
    through ``load_checkpoint``) instead of timm's own loader; call it on an entrypoint's kwargs before
    ``build_model_with_cfg``. timm resets ``custom_load`` when an overlay names a file, unless it is set explicitly."""
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay and overlay.get("file"):
        kwargs = {**kwargs, "pretrained_cfg_overlay": {"custom_load": True, **overlay}}
    return kwargs
