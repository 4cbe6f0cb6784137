"""Where results go: the check, made before any work, that an output folder can be created where the user asked, and
the temporary file an atomic write goes through."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ravit.errors import InvalidArgumentError

__all__ = ["check_output_dir", "new_temp_file"]


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
