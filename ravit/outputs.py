"""Where results go: the check, made before any work, that an output folder can be created where the user asked, and
the one atomic-write path every result, checkpoint and manifest goes through."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ravit.errors import InvalidArgumentError

__all__ = ["atomic_open", "check_output_dir", "new_temp_file", "write_bytes", "write_json", "write_text"]


def check_output_dir(path: str | os.PathLike, flag: str = "--output") -> Path:
    """``path`` as an output folder, or an InvalidArgumentError naming ``flag`` when it is a file, lies under a file,
    or would be made in a folder that is not writable. Nothing is created."""
    path = Path(path)
    for folder in (path, *path.parents):
        if not folder.exists():  # a path under a file does not "exist": look further up
            continue
        if folder == path and not folder.is_dir():
            raise InvalidArgumentError(f"{flag} {path} is a file, not a folder; choose another output path")
        if not folder.is_dir():
            raise InvalidArgumentError(f"{flag} {path} lies under {folder}, which is a file: {folder} is a file, and "
                                       "nothing is under a file; choose another output path")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InvalidArgumentError(f"{flag} {path}: {folder} is not writable; choose another output path")
        break
    return path


def new_temp_file(path: str | os.PathLike) -> Path:
    """A new empty file next to ``path`` for an atomic write (write it, then ``os.replace`` it over ``path``).

    Created with mode 0o666 less the umask, as ``open()`` and ``torch.save`` create files (``tempfile.mkstemp``
    would give 0o600, and the final file would keep it)."""
    path = Path(path)
    while True:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", fsync: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on a clean exit it replaces ``path`` (``os.replace``),
    on any exception it is removed and ``path`` is left as it was. The parent folder is created.

    ``mode`` is ``"wb"`` or ``"w"`` (text, UTF-8). ``fsync`` flushes the data to disk before the rename and the folder
    after it (so the rename itself is durable), for files whose loss after a power cut would cost work (checkpoints)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode 'wb' or 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` to ``path``, atomically (see ``atomic_open``)."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` to ``path`` as UTF-8, atomically (see ``atomic_open``)."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented JSON (a final newline) to ``path``, atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")
