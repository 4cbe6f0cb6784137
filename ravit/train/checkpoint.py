"""Training checkpoints: written atomically, loaded with ``weights_only=True``, carrying everything resume needs.

A checkpoint is a dict: ``state_dict`` (no ``module.`` prefix), ``state_dict_ema`` (with EMA), ``optimizer``,
``scheduler`` (for reading: resume rebuilds the schedule from the config), ``scaler`` (or None), ``rng`` (torch / CUDA
/ numpy / python states as tensors and plain types, so no pickle allowlist is needed), ``epoch`` (the number of
finished epochs), ``num_updates``, ``history`` (one record per finished epoch), ``best`` metrics, ``config`` (the
resolved TrainConfig as a dict), ``model`` (its name) and ``position``: None at an epoch's end, and for a run stopped
mid-epoch by ``max_steps`` the batches of the epoch done, their loss sums, the number of processes and each one's RNG
states (``ravit.train.loop``).

Saving goes through ``ravit.outputs.atomic_open`` (a temporary file next to the target, fsynced, then renamed over
it), so a crash or a full disk never leaves a half-written checkpoint under the real name: the previous one stays
intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ravit.checkpoint import CheckpointError, load_torch_file
from ravit.errors import MissingFileError
from ravit.outputs import atomic_open

__all__ = ["atomic_save", "capture_rng", "load_training_checkpoint", "restore_rng"]


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically and durably; an OSError (e.g. disk full) leaves ``path`` untouched."""
    path = Path(path)
    try:
        with atomic_open(path, "wb", fsync=True) as f:
            torch.save(obj, f)
    except OSError as err:
        reason = err.strerror or str(err)
        raise OSError(err.errno, f"could not write checkpoint {path}: {reason}; the previous file is intact") from err


def capture_rng() -> dict:
    """All RNG states as tensors / plain Python values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by ``ravit train``: MissingFileError if absent, CheckpointError (a DataError) if the file
    is damaged or not one."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    ckpt = load_torch_file(path)
    required = {"state_dict", "optimizer", "scheduler", "epoch", "config", "rng"}
    if not isinstance(ckpt, dict) or not required <= set(ckpt):
        raise CheckpointError(f"{path} is not a ravit training checkpoint (needs keys {sorted(required)})")
    return ckpt
