"""Writing analysis results: JSON and CSV, each written to a temporary file and renamed, so none is half-written;
and the check, before any work, that an output folder can be made where the user asked."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from ravit.errors import InvalidArgumentError

__all__ = ["atomic_write", "check_output_dir", "write_csv", "write_json"]


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    """``data`` (plain Python values) as indented JSON."""
    return atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """A CSV table with a header row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write(path, buffer.getvalue().encode())


def check_output_dir(path: str | os.PathLike, flag: str = "--output") -> Path:
    """Refuse, before any work, an output folder that cannot be made: it, or a folder above it, is a regular file.

    ``flag`` names the argument in the message. Nothing is created; returns ``path`` as a Path.
    """
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():  # the nearest existing ancestor (a path under a file does not "exist")
            if not folder.is_dir():
                where = "is a file" if folder == path else f"is under {folder}, which is a file"
                raise InvalidArgumentError(f"{flag} {path} {where}, not a folder; choose another output path")
            break
    return path
