"""Writing analysis results: JSON and CSV, written atomically through ``ravit.outputs`` (none is ever half-written)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ravit.outputs import write_json, write_text

__all__ = ["write_csv", "write_json"]


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> Path:
    """A CSV table with a header row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())
