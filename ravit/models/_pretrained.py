"""The registry pieces the three FAN family files share: the authors' release (download folder, licence, origin), the
base pretrained config, and ``build_fan``, timm's ``build_model_with_cfg`` for a FAN family.

The FAN authors (Zhou et al., "Understanding The Robustness in Vision Transformers", ICML 2022, arXiv 2204.12451)
released ImageNet-1k checkpoints of FAN-ViT T/S/B and FAN-Hybrid T/S/B, and ImageNet-22k ones of FAN-Hybrid B/L
(release v1.0.0 linked from the NVlabs/FAN README), under the NVIDIA Source Code License-NC. Their configs carry the
download ``url``, so ``timm.create_model(name, pretrained=True)`` takes timm's own path: ``load_pretrained`` fetches the
file into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``), the family's ``checkpoint_filter_fn`` maps the official
keys, and timm adapts the classifier (another ``num_classes``) and the first convolution (another ``in_chans``).
``build_fan`` adds what that path lacks for these files: the released files are timm training checkpoints (weights
under ``state_dict``, ``args`` and a numpy metric beside them), a model or tag without weights is named as such, a
failed download or a file that is no checkpoint is a one-line error that leaves nothing in the cache, and the licence
is logged once per process.
"""

from __future__ import annotations

import functools
import logging
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from torch import nn

from ravit.checkpoint import (
    CheckpointError,
    load_state_dict,
    misfit,
    safe_checkpoint_globals,
    unwrap_state_dict,
    use_ravit_loader,
)
from ravit.errors import InvalidArgumentError, MissingFileError

__all__ = ["LICENSE", "LICENSE_URL", "ORIGIN_URL", "PAPER_IDS", "RELEASE_URL", "build_fan", "fan_cfg",
           "filter_pretrained"]

_logger = logging.getLogger(__name__)

RELEASE_URL = "https://github.com/zhoudaquan/fully_attentional_network_ckpt/releases/download/v1.0.0/"
LICENSE = "nvidia-source-code-license-nc"  # the authors' weights; timm's licence field is a lower-case slug
LICENSE_URL = "https://github.com/NVlabs/FAN/blob/main/LICENSE"
PAPER_IDS = "arXiv:2204.12451"
ORIGIN_URL = "https://github.com/NVlabs/FAN"


def fan_cfg(**kwargs) -> dict:
    """A FAN pretrained config: the official evaluation settings (224 px, bicubic, crop 1.0, ImageNet mean and std, 1000
    classes), no weights, the paper and origin; ``kwargs`` override any of them."""
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "paper_ids": PAPER_IDS, "origin_url": ORIGIN_URL, **kwargs}


def _weight_keys(names: str | tuple[str, ...] | None, params: tuple[str, ...] = ("weight", "bias")) -> set[str]:
    """The state-dict keys of the modules a pretrained config names (``classifier``, ``first_conv``)."""
    names = (names,) if isinstance(names, str) else (names or ())
    return {f"{name}.{param}" for name in names for param in params}


def filter_pretrained(checkpoint_filter_fn: Callable, state_dict: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn`` for a FAN family (bind the family's ``checkpoint_filter_fn`` first).

    Takes the weights out of a training checkpoint's wrapper (``state_dict`` / ``model``; prefixes ``module.`` and
    ``_orig_mod.`` stripped), maps the official keys with ``checkpoint_filter_fn``, and raises a CheckpointError
    naming the keys that do not fit ``model`` beyond what timm adapts next: the classifier of a model built for another
    ``num_classes`` (dropped), the first convolution of one built for another ``in_chans`` (``adapt_input_conv``).
    """
    cfg = model.pretrained_cfg
    source = cfg.get("file") or cfg.get("url") or "the pretrained weights"
    state_dict = checkpoint_filter_fn(unwrap_state_dict(state_dict, source), model)
    own = model.state_dict()
    classifier = _weight_keys(cfg.get("classifier"))
    dropped = classifier if model.num_classes != cfg["num_classes"] else set()
    adapted = {k for k in _weight_keys(cfg.get("first_conv"), ("weight",))
               if k in own and k in state_dict and own[k].shape[1] != cfg["input_size"][0]}
    problems = misfit({k: v for k, v in state_dict.items() if k not in dropped},
                      {k: state_dict[k] if k in adapted else v for k, v in own.items() if k not in dropped})
    if problems:
        classes = {state_dict[k].shape[0] for k in classifier - dropped
                   if k in state_dict and k in own and state_dict[k].shape != own[k].shape}
        hint = [f"  its classifier has {classes.pop()} classes: build the model with that num_classes, or with "
                "another one for a new classifier"] if classes else []
        raise CheckpointError("\n".join([f"{source} does not fit model '{cfg['architecture']}':", *problems, *hint]))
    return state_dict


def _cache_file(url: str, cache_dir: str | Path | None) -> Path:
    """Where timm's ``load_pretrained`` (torch.hub) keeps the file downloaded from ``url``."""
    folder = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / Path(urllib.parse.urlparse(url).path).name


def _explain_failure(err: Exception, url: str, cache_dir: str | Path | None) -> None:
    """Turn a failed load from ``url`` into a user error when the download failed (MissingFileError) or gave a file
    that is no checkpoint (CheckpointError; the file is removed from the cache). Returns for any other failure."""
    cached = _cache_file(url, cache_dir)
    if cached.is_file():
        try:
            load_state_dict(cached)
        except CheckpointError as bad:
            cached.unlink(missing_ok=True)
            raise CheckpointError(f"{url} did not give a usable checkpoint and was removed from the cache: {bad}") \
                from None
    elif isinstance(err, OSError):  # urllib's URLError / HTTPError, refused connections, timeouts
        raise MissingFileError(f"could not download {url} ({err}); check the network, or download the file yourself "
                               "and pass pretrained_cfg_overlay=dict(file=...)") from None


@functools.cache
def _announce_licence() -> None:
    """Say once per process, on the first load of the authors' weights, under which licence they came."""
    _logger.warning("The FAN authors' weights are licensed under the NVIDIA Source Code License-NC: non-commercial "
                    "use only (%s)", LICENSE_URL)


def build_fan(model_cls: type[nn.Module], variant: str, pretrained: bool, checkpoint_filter_fn: Callable,
              feature_cfg: dict, **kwargs) -> nn.Module:
    """``build_model_with_cfg`` for a FAN family, its filter wrapped by ``filter_pretrained``.

    With ``pretrained``: a config without weights is an InvalidArgumentError naming the released tags; the authors'
    files load with ``weights_only`` and the allowlist of timm training checkpoints; a failed download is a
    MissingFileError and a downloaded file that is no checkpoint a CheckpointError (removed from the cache); the
    authors' licence is logged once per process. A file given as ``pretrained_cfg_overlay=dict(file=...)`` goes
    through ``ravit.load_checkpoint`` (``use_ravit_loader``).
    """
    kwargs = use_ravit_loader(kwargs)
    build = functools.partial(
        build_model_with_cfg, model_cls, variant, pretrained, feature_cfg=feature_cfg,
        pretrained_filter_fn=functools.partial(filter_pretrained, checkpoint_filter_fn), **kwargs)
    if not pretrained:
        return build()
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    if not cfg.has_weights and cfg.state_dict is None:
        name = f"{variant}.{cfg.tag}" if cfg.tag else variant
        released = ", ".join(timm.list_pretrained(f"{variant}.*") or timm.list_pretrained("fan*"))
        raise InvalidArgumentError(f"{name!r} has no pretrained weights (released by the FAN authors: {released}); "
                                   "load a file with pretrained_cfg_overlay=dict(file=...) or ravit.load_checkpoint")
    url = cfg.url if cfg.url and not (cfg.file or cfg.hf_hub_id or cfg.state_dict is not None) else None
    try:
        with safe_checkpoint_globals():
            model = build()
    except Exception as err:
        if url is not None:
            _explain_failure(err, url, kwargs.get("cache_dir"))
        raise
    if url is not None and cfg.license == LICENSE:
        _announce_licence()
    return model
