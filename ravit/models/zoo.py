"""The shipped model zoo: small models trained on Fashion-MNIST (28x28) with ``ravit train``, weights in the package.

Each entry of ``ravit/zoo/manifest.json`` becomes a timm model name (``timm.create_model('fmnist_deit_p4',
pretrained=True)`` or ``ravit.create_model(...)``) whose pretrained config points at the packaged ``.safetensors``
file (``file=``), so loading never touches a network. A zoo name is a registered architecture (``architecture``) with
fixed constructor arguments (``model_kwargs``); caller kwargs override them (e.g. ``num_classes=5`` re-initialises
the head, as timm does for any pretrained model). The manifest also records the command, seed and test accuracy
that produced each file.
"""

from __future__ import annotations

import json
from pathlib import Path

from timm.models import (
    generate_default_cfgs,
    get_pretrained_cfg,
    model_entrypoint,
    register_model,
    resolve_pretrained_cfg,
)

__all__ = ["ZOO_DIR", "ZOO_TAG", "list_zoo", "load_manifest", "register_zoo_model"]

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


def register_zoo_model(name: str, entry: dict, zoo_dir: Path = ZOO_DIR):
    """Register ``name`` with timm: an entrypoint building ``entry['architecture']`` with the zoo's kwargs and file."""
    default_cfgs.update(generate_default_cfgs({f"{name}.{ZOO_TAG}": _pretrained_cfg(name, entry, Path(zoo_dir))}))

    def entrypoint(pretrained: bool = False, **kwargs):
        cfg = resolve_pretrained_cfg(
            name, kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
        )
        create_base = model_entrypoint(entry["architecture"])
        return create_base(pretrained=pretrained, pretrained_cfg=cfg, **{**entry["model_kwargs"], **kwargs})

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = entry.get("description", f"Zoo model {name}.")
    globals()[name] = register_model(entrypoint)
    return globals()[name]


default_cfgs: dict = {}  # read by timm's register_model: the zoo's pretrained configs, one tag per name
for _name, _entry in load_manifest()["models"].items():
    register_zoo_model(_name, _entry)
