"""Class names: how class folders map to a model's class indices, by name and never by alphabetical position.

torchvision's ``ImageFolder`` numbers class folders in sorted order; a model numbers its classes in its own label
order (Fashion-MNIST: T-shirt/top, Trouser, Pullover, ...), so scoring folder index k as model class k is wrong as
soon as the two orders differ. Here every folder is matched by name to one of the model's classes:

- the model's names are its pretrained config's ``label_names`` (the zoo's manifest), or the ImageNet-1k wnids
  (``timm.data.ImageNetInfo``) for a 1000-class model whose folders are wnids;
- a folder's class name is its name, or the name recorded for it in the class map ``ravit corrupt`` writes at its
  output root (``CLASS_MAP_FILE``); a name such as ``T-shirt/top`` is stored in folder ``T-shirt_top``
  (``folder_name``), and that folder name matches too.

A folder that matches none of the model's classes is an error. A model without class names is scored in the
folders' sorted order, with a warning saying so.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ravit.errors import DataError

__all__ = ["CLASS_MAP_FILE", "check_same_classes", "folder_name", "label_map", "model_class_names", "read_class_map"]

CLASS_MAP_FILE = "ravit-corrupt.json"


def folder_name(class_name: str) -> str:
    """The folder a class is stored in: runs of characters other than letters, digits, '.', '_' and '-' become '_'
    (``'T-shirt/top'`` -> ``'T-shirt_top'``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", class_name).strip("_") or "class"


def model_class_names(model: nn.Module, folders: Sequence[str] = ()) -> tuple[str, ...] | None:
    """The model's class names in its label order: ``pretrained_cfg['label_names']``, else the ImageNet-1k wnids for a
    1000-class model when every folder in ``folders`` is a wnid; None when unknown."""
    num_classes = getattr(model, "num_classes", None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names") if isinstance(cfg, dict) else None
    if names and len(names) == num_classes:
        return tuple(str(n) for n in names)
    if num_classes == 1000 and folders and all(re.fullmatch(r"n\d{8}", f) for f in folders):
        from timm.data import ImageNetInfo

        return tuple(ImageNetInfo().label_names())
    return None


def read_class_map(root: str | os.PathLike) -> dict[str, str]:
    """Folder -> class name from the ``CLASS_MAP_FILE`` at ``root`` or two levels up (the output root of ``ravit
    corrupt`` above ``<corruption>/<severity>``); empty when there is none."""
    root = Path(root)
    for base in (root, root.parent.parent):
        path = base / CLASS_MAP_FILE
        if path.is_file():
            try:
                classes = json.loads(path.read_text())["classes"]
                return {str(f): str(c) for f, c in classes.items()}
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise DataError(f"{path}: not a ravit class map ({type(err).__name__}: {err})") from None
    return {}


def label_map(
    folders: Sequence[str],
    model: nn.Module,
    class_map: dict[str, str] | None = None,
    where: str = "the data",
    ordered: bool = False,
) -> list[int]:
    """The model's class index for each folder (in ``folders``' order, i.e. the dataset's label order).

    ``class_map`` names the class of a folder where the folder name is not the class name (see ``read_class_map``).
    Raises DataError naming the folders that match no class of the model, or two folders matching one class. For a
    model without class names the dataset's order is used: with a warning unless ``ordered`` (the dataset's order
    is its own label order, as Fashion-MNIST's, not the sorted folder names).
    """
    class_map = class_map or {}
    names = model_class_names(model, folders)
    num_classes = getattr(model, "num_classes", None)
    if names is None:
        if num_classes is not None and len(folders) != num_classes:
            raise DataError(
                f"{len(folders)} class folders ({', '.join(folders[:5])}{', ...' if len(folders) > 5 else ''}) in "
                f"{where} but the model has {num_classes} classes"
            )
        if not ordered:
            warnings.warn(
                "the model declares no class names (pretrained_cfg label_names): class folders are scored in sorted "
                "order (folder k = class k); check that this is the model's label order",
                stacklevel=2,
            )
        return list(range(len(folders)))
    index = {folder_name(n): i for i, n in enumerate(names)}
    index.update({n: i for i, n in enumerate(names)})
    out, unknown = [], []
    for f in folders:
        cls = class_map.get(f, f)
        i = index.get(cls, index.get(folder_name(cls)))
        if i is None:
            unknown.append(f)
        out.append(i)
    if unknown:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise DataError(
            f"class folders of {where} do not match the model's classes: {', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''} (the model's classes: {shown})"
        )
    if len(set(out)) != len(out):
        twice = sorted({names[i] for i in out if out.count(i) > 1})
        raise DataError(f"several class folders of {where} map to the same class of the model: {', '.join(twice)}")
    return out


def check_same_classes(a: Sequence[str], b: Sequence[str], what: str = "train and val") -> None:
    """Raise DataError unless two datasets have the same classes in the same order (``dataset.classes``), so a label
    means the same class in both (e.g. train/ and val/ ImageFolders)."""
    if list(a) == list(b):
        return
    only_a = sorted(set(a) - set(b))[:5]
    only_b = sorted(set(b) - set(a))[:5]
    if only_a or only_b:
        raise DataError(
            f"{what} have different classes: only in the first {only_a or 'none'}, only in the second "
            f"{only_b or 'none'}"
        )
    raise DataError(f"{what} list the same classes in a different order: {list(a)[:5]} vs {list(b)[:5]}")
