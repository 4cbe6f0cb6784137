"""The one checkpoint loader for every ravit (and timm) model, plus ``save_checkpoint`` for ravit's own files.

Reads ``.safetensors``, ``.pth``/``.pth.tar``/``.bin``/``.pt`` (a plain state dict, or one wrapped in ``model`` /
``state_dict`` / ``state_dict_ema`` / ``model_ema``), strips ``module.`` and ``_orig_mod.`` prefixes, loads with
``weights_only=True`` and an allowlist for the non-tensor objects of timm training checkpoints, maps official key
names through the model family's ``checkpoint_filter_fn(state_dict, model)`` and otherwise fails with an error
naming the missing, unexpected and mis-shaped keys. A new classifier, a first convolution adapted to another number of
input channels and resized weights (``pos_embed`` through timm's ViT filter) are never silent: they must be asked for,
and are logged when they happen.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import re
import struct
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from timm.models import adapt_input_conv
from torch import nn

from ravit.errors import DataError, InvalidArgumentError, MissingFileError
from ravit.outputs import atomic_open

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "load_state_dict",
    "load_torch_file",
    "misfit",
    "safe_checkpoint_globals",
    "save_checkpoint",
    "unwrap_state_dict",
    "use_ravit_loader",
]

_logger = logging.getLogger(__name__)

_WRAPPERS_EMA = ("state_dict_ema", "model_ema")
_WRAPPERS = ("state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(DataError):
    """A checkpoint that does not fit the model, is damaged, or cannot be read safely."""


# What torch's deserializer raises for bytes that are not an intact checkpoint (truncated, empty, random, text): found
# by truncating and flipping bytes of zip and legacy files. OSError (permissions, I/O) is not among them.
_DAMAGED = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, AssertionError, struct.error, OverflowError)


def _safe_globals() -> list:
    """Non-tensor objects in timm training checkpoints ('args', 'metric'): argparse.Namespace and numpy scalars."""
    allowed: list = [argparse.Namespace, np.dtype]
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    allowed.append(core.multiarray.scalar)
    allowed.extend(cls for cls in vars(np.dtypes).values() if isinstance(cls, type))
    return allowed


def safe_checkpoint_globals() -> contextlib.AbstractContextManager:
    """A context in which ``torch.load(..., weights_only=True)`` also builds the non-tensor objects of timm training
    checkpoints (for loaders outside ravit's, e.g. timm's ``load_pretrained`` reading a downloaded file)."""
    return torch.serialization.safe_globals(_safe_globals())


def _refused_global(err: pickle.UnpicklingError) -> str | None:
    """What weights_only loading refused to build (e.g. 'mymodule.MyClass'), or None when the bytes are bad."""
    text = str(err)
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
    if found:
        return found.group(1)
    found = re.search(r"allowlisted via `?add_safe_globals`?,? but got (.+)", text)
    return found.group(1).strip() if found else None


def _damage(err: Exception) -> str:
    """A short reason for a failed read: torch's own words without its advice to disable weights_only."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = text.strip().split("\n", 1)[0].split(". ", 1)[0]
    if isinstance(err, EOFError):
        return "the file ends early"
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def load_torch_file(path: str | os.PathLike, trust_checkpoint: bool = False) -> object:
    """``torch.load`` of a user's file on CPU, with ``weights_only=True`` unless ``trust_checkpoint``.

    Raises ``CheckpointError`` for a file that is damaged or not a PyTorch file at all, and a different
    ``CheckpointError`` (the only one that mentions ``trust_checkpoint``) for an intact file that holds objects the
    safe loader refuses to build.
    """
    path = Path(path)
    try:
        if trust_checkpoint:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except _DAMAGED as err:
        safe = not trust_checkpoint and isinstance(err, pickle.UnpicklingError)
        refused = _refused_global(err) if safe else None
        if refused is not None:
            raise CheckpointError(
                f"{path} holds objects that weights_only loading refuses to build ({refused}); only if you trust "
                "its source, load it with trust_checkpoint=True") from None
        needs = ", or its objects need code that is not importable here" if trust_checkpoint else ""
        raise CheckpointError(f"{path} is damaged or not a PyTorch checkpoint{needs} ({_damage(err)}); re-download or "
                              "re-create it") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except SafetensorError as err:
        raise CheckpointError(f"{path} is damaged or not a safetensors file ({err}); re-download or re-create it") \
            from None


def load_state_dict(path: str | os.PathLike, use_ema: bool = False,
                    trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` dict (unwrapped, prefixes stripped, keys as stored)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        obj: object = _load_safetensors(path)
    else:
        obj = load_torch_file(path, trust_checkpoint)
    return unwrap_state_dict(obj, path, use_ema)


def unwrap_state_dict(obj: object, source: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The flat ``{key: tensor}`` dict inside what a checkpoint file held (a module, a plain state dict, or one wrapped
    in ``state_dict`` / ``model``, or ``state_dict_ema`` / ``model_ema`` with ``use_ema``), ``module.`` and
    ``_orig_mod.`` prefixes stripped; anything else is a CheckpointError naming ``source``."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict")
    wrapped = [key for key in (_WRAPPERS_EMA if use_ema else _WRAPPERS) if isinstance(obj.get(key), dict)]
    if use_ema and not wrapped:
        raise CheckpointError(f"use_ema=True but {source} has no EMA weights ({' / '.join(_WRAPPERS_EMA)}; keys: "
                              f"{_describe(sorted(map(str, obj)))}); drop use_ema to load its plain weights")
    if wrapped:
        obj = obj[wrapped[0]]
    state_dict = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor under a string "
                                  f"key; keys found: {_describe(sorted(map(str, obj)))}")
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


def _shape(state: dict[str, torch.Tensor], key: str) -> str:
    return str(tuple(state[key].shape)) if key in state else "none"


def _new_head_asked(model: nn.Module) -> bool:
    """timm's convention: a model built for another ``num_classes`` than its architecture's pretrained config asks for
    a new classifier (e.g. ``create_model(name, num_classes=5)`` on a 10-class zoo model)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return "num_classes" in cfg and getattr(model, "num_classes", cfg["num_classes"]) != cfg["num_classes"]


def _adapt_first_conv(state_dict: dict[str, torch.Tensor], model: nn.Module, own: dict[str, torch.Tensor]) -> list[str]:
    """timm's convention for another ``in_chans``: when ``model`` was built for another number of input channels than
    its pretrained config (``input_size[0]``), a checkpoint's first convolution (the config's ``first_conv``) that
    differs from the model's in its input channels only is adapted by timm's ``adapt_input_conv`` (summed for one
    channel, tiled and rescaled for more). Changes ``state_dict`` in place and names what it adapted."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    cfg_chans = (cfg.get("input_size") or (3,))[0]
    names = cfg.get("first_conv") or ()
    adapted = []
    for conv_name in (names,) if isinstance(names, str) else names:
        key = f"{conv_name}.weight"
        if key not in state_dict or key not in own or own[key].ndim != 4 or own[key].shape[1] == cfg_chans:
            continue
        weight, target = state_dict[key], own[key].shape  # (out, in, kh, kw)
        if weight.shape[1] == target[1] or weight.shape[:1] + weight.shape[2:] != target[:1] + target[2:]:
            continue
        # base_chans (a checkpoint with other than 3 input channels) exists from timm 1.0.29 on; the floor assumes 3
        extra = {} if weight.shape[1] == 3 else {"base_chans": weight.shape[1]}
        state_dict[key] = adapt_input_conv(target[1], weight, **extra)
        adapted.append(f"{key} {tuple(weight.shape)} -> {tuple(target)}")
    return adapted


def misfit(state_dict: dict[str, torch.Tensor], own: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Why ``state_dict`` does not load into a model whose state dict is ``own``: a line each for its missing and
    unexpected keys (when ``strict``) and its mis-shaped keys; empty when it loads."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    lines = []
    if strict and missing:
        lines.append(f"  {len(missing)} missing keys: {_describe(missing)}")
    if strict and unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys: {_describe(unexpected)}")
    if misshaped:
        lines.append(f"  {len(misshaped)} mis-shaped keys: {_describe(misshaped, 4)}")
    return lines


def load_checkpoint(model: nn.Module, path: str | os.PathLike, use_ema: bool = False, strict: bool = True,
                    trust_checkpoint: bool = False, new_head: bool | None = None, resize: bool = False) -> nn.Module:
    """Load ``path`` into ``model`` in place and return the model.

    Official key names are mapped by the ``checkpoint_filter_fn`` of the model's module, when it has one.
    ``new_head``: a classifier that differs from the checkpoint's (another ``num_classes``, or none on either side)
    keeps the model's fresh initialisation, with a logged warning; ``None`` follows timm's convention (allowed when
    the model was built for another ``num_classes`` than its pretrained config), ``False`` never allows it.
    A first convolution for another number of input channels is adapted as timm does when the model was built with
    another ``in_chans`` than its pretrained config (logged).
    ``resize``: let the filter interpolate weights whose shape differs (timm's ViT filter resamples ``pos_embed`` for
    another image size), with a logged warning. Any other difference raises ``CheckpointError`` listing the missing,
    unexpected and mis-shaped keys (``strict=False`` loads what fits, logs what it left out, and still refuses
    mis-shaped keys).
    """
    path = Path(path)
    raw = load_state_dict(path, use_ema=use_ema, trust_checkpoint=trust_checkpoint)
    name = _model_name(model)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    state_dict = dict(filter_fn(raw, model)) if filter_fn is not None else dict(raw)
    own = model.state_dict()
    hints = []

    resized = [k for k in state_dict if k in raw and k in own and raw[k].numel() != state_dict[k].numel()]
    if resized and resize:
        _logger.warning("%s: resized for %s: %s", path, name,
                        _describe([f"{k} {_shape(raw, k)} -> {_shape(state_dict, k)}" for k in resized], 4))
    elif resized:
        state_dict.update({k: raw[k] for k in resized})  # reported below as mis-shaped
        hints.append(f"  the model's filter would resize {_describe(resized, 4)}: pass resize=True to interpolate")

    head = [k for k in _classifier_keys(model) if k in own or k in state_dict]
    if any(k not in own or k not in state_dict or own[k].shape != state_dict[k].shape for k in head):
        described = "; ".join(f"{k}: checkpoint {_shape(state_dict, k)} vs model {_shape(own, k)}" for k in head)
        if _new_head_asked(model) if new_head is None else new_head:
            state_dict = {k: v for k, v in state_dict.items() if k not in head}
            state_dict.update({k: own[k] for k in head if k in own})
            _logger.warning("%s: new classifier for %s, freshly initialised (%s)", path, name, described)
        else:
            hints.append(f"  the classifier differs ({described}): build the model with the checkpoint's "
                         "num_classes, or pass new_head=True to train a new classifier")

    adapted = _adapt_first_conv(state_dict, model, own)
    if adapted:
        _logger.warning("%s: first convolution adapted to the input channels of %s: %s", path, name,
                        _describe(adapted, 4))

    problems = misfit(state_dict, own, strict)
    if problems:
        saved_as = _checkpoint_model_name(path)
        header = (f"checkpoint {path} does not fit model '{name}'"
                  + (f" (it was saved from '{saved_as}')" if saved_as else "") + ":")
        raise CheckpointError("\n".join([header, *problems, *hints]))
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        _logger.warning("%s: strict=False loaded %s without %d missing keys (%s) and ignored %d unexpected keys (%s)",
                        path, name, len(missing), _describe(missing, 4), len(unexpected), _describe(unexpected, 4))
    model.load_state_dict(state_dict, strict=strict)
    return model


def save_checkpoint(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state dict as ``.safetensors`` with the model name in the metadata (atomically; the file
    gets the usual mode, 0o666 less the umask)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidArgumentError(f"ravit saves .safetensors files, got {path.name}")
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}  # no shared storage
    meta = {"format": "pt", "model": _model_name(model), "num_classes": str(getattr(model, "num_classes", ""))}
    meta.update(metadata or {})
    with atomic_open(path, "wb", fsync=True) as f:  # safetensors' own save_file would create the file 0o600
        f.write(safetensors_bytes(tensors, metadata=meta))
    return path


def use_ravit_loader(kwargs: dict) -> dict:
    """Route a file given as ``pretrained_cfg_overlay=dict(file=...)`` through the model's ``load_pretrained`` (and so
    through ``load_checkpoint``) instead of timm's own loader; call it on an entrypoint's kwargs before
    ``build_model_with_cfg``. timm resets ``custom_load`` when an overlay names a file, unless it is set explicitly."""
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay and overlay.get("file"):
        kwargs = {**kwargs, "pretrained_cfg_overlay": {"custom_load": True, **overlay}}
    return kwargs
