"""The shipped model zoo: small models trained on Fashion-MNIST (28x28) with ``ravit train``, weights in the package.

Each entry of ``ravit/zoo/manifest.json`` becomes a timm model name (``timm.create_model('fmnist_deit_p4',
pretrained=True)`` or ``ravit.create_model(...)``) whose pretrained config points at the packaged ``.safetensors``
file (``file=``), so loading never touches a network. A zoo name is a registered architecture (``architecture``) with
fixed constructor arguments (``model_kwargs``); caller kwargs override them (e.g. ``num_classes=5`` re-initialises
the head, as timm does for any pretrained model). The manifest also records the command, seed and test accuracy
that produced each file, and the file's sha256, checked on every pretrained load: a modified or damaged file is a
``DataError``, never a silently different model.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from timm.models import (
    generate_default_cfgs,
    get_pretrained_cfg,
    model_entrypoint,
    register_model,
    resolve_pretrained_cfg,
)

from ravit.errors import DataError, MissingFileError

__all__ = ["ZOO_DIR", "ZOO_TAG", "list_zoo", "load_manifest", "register_zoo_model", "verify_weights"]

_logger = logging.getLogger(__name__)

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
ZOO_TAG = "ravit_fmnist"
_MANIFEST = ZOO_DIR / "manifest.json"


def load_manifest() -> dict:
    """The zoo manifest: ``{"models": {name: entry}}`` (empty when the file is absent)."""
    if not _MANIFEST.is_file():
        return {"models": {}}
    return json.loads(_MANIFEST.read_text())


def list_zoo() -> list[str]:
    return sorted(load_manifest()["models"])


def _pretrained_cfg(name: str, entry: dict, zoo_dir: Path) -> dict:
    """The base architecture's pretrained config (first conv, classifier, loader) with the zoo file and data stats."""
    base = get_pretrained_cfg(entry["architecture"])
    cfg = base.to_dict() if base is not None else {}
    for key in ("url", "hf_hub_id", "hf_hub_filename", "hf_hub_revision", "state_dict", "notes", "tag"):
        cfg.pop(key, None)
    cfg.update(
        file=str(zoo_dir / entry["weights"]),
        architecture=name,
        num_classes=entry["model_kwargs"]["num_classes"],
        input_size=tuple(entry["input_size"]),
        mean=tuple(entry["mean"]),
        std=tuple(entry["std"]),
        crop_pct=entry["crop_pct"],
        fixed_input_size=True,
        license="Apache-2.0",
        description=entry.get("description"),
        label_names=entry.get("label_names"),
    )
    return cfg


def verify_weights(path: str | Path, sha256: str) -> Path:
    """``path`` if its bytes hash to ``sha256``; MissingFileError if absent, DataError if modified or damaged."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"zoo weights not found: {path}; reinstall ravit")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        raise DataError(f"zoo weights {path} do not match the manifest (sha256 {digest.hexdigest()[:12]}… instead of "
                        f"{sha256[:12]}…): the file was modified or damaged; reinstall ravit")
    return path


def _log_adapted(name: str, entry: dict, kwargs: dict) -> None:
    """Warn that timm's loader gives the zoo weights a new classifier or resizes them, as the caller's kwargs ask."""
    for key, what in (("num_classes", "a new, freshly initialised classifier"), ("img_size", "resized pos_embed")):
        if key in kwargs and kwargs[key] != entry["model_kwargs"].get(key):
            _logger.warning("%s with %s=%s: %s (the zoo weights have %s=%s)", name, key, kwargs[key], what, key,
                            entry["model_kwargs"].get(key))


def register_zoo_model(name: str, entry: dict, zoo_dir: Path = ZOO_DIR):
    """Register ``name`` with timm: an entrypoint building ``entry['architecture']`` with the zoo's kwargs and file."""
    default_cfgs.update(generate_default_cfgs({f"{name}.{ZOO_TAG}": _pretrained_cfg(name, entry, Path(zoo_dir))}))

    def entrypoint(pretrained: bool = False, **kwargs):
        cfg = resolve_pretrained_cfg(
            name, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
        )
        zoo_file = Path(zoo_dir) / entry["weights"]
        if pretrained and cfg.file and Path(cfg.file) == zoo_file:
            if entry.get("sha256"):
                verify_weights(zoo_file, entry["sha256"])
            if not cfg.custom_load:  # timm's own loader adapts these silently; ravit's loader logs them itself
                _log_adapted(name, entry, kwargs)
        create_base = model_entrypoint(entry["architecture"])
        return create_base(pretrained=pretrained, pretrained_cfg=cfg, **{**entry["model_kwargs"], **kwargs})

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = entry.get("description", f"Zoo model {name}.")
    entrypoint.base_architecture = entry["architecture"]  # read by ravit.create_model to check kwargs names
    globals()[name] = register_model(entrypoint)
    return globals()[name]


default_cfgs: dict = {}  # read by timm's register_model: the zoo's pretrained configs, one tag per name
for _name, _entry in load_manifest()["models"].items():
    register_zoo_model(_name, _entry)
