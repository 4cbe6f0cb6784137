"""The study's output folder: refused when it holds anything a study does not write, built under a hidden sibling and
renamed into place when done, so a crash or a kill leaves the previous results as they were (no half-written folder)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ravit.errors import InvalidArgumentError
from ravit.outputs import check_output_dir

__all__ = ["OUTPUTS", "check_out", "publish", "work_folder"]

# What a study writes at the top of its folder: an existing folder holding only these is a study's and is replaced.
# The names of earlier versions are listed too, so a folder written by an older ravit is still recognised.
OUTPUTS = frozenset({
    "robustness", "summary.json", "summary.md", "summary.png", "claims.csv", "token_reduction.csv",
    "token_reduction_fan.csv", "robustness.png", "token_reduction.png", "grouping.png",
    "ats.csv", "ats_accuracy_vs_gmacs.png", "grouping_eigenvalues.png", "grouping_perturbation.png",
})


def check_out(out: Path) -> None:
    """The study replaces its whole folder: refuse a file, a folder with anything but a study's outputs, or the
    current folder or one above it."""
    check_output_dir(out, "out")
    if Path.cwd().resolve().is_relative_to(out):
        raise InvalidArgumentError(f"out {out} is the current folder or one above it; name a folder for the study")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS)
        if foreign:
            raise InvalidArgumentError(
                f"out {out} holds files a study does not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); the study replaces its whole folder, so name a new or "
                f"empty one")


def _remove_leftovers(out: Path) -> None:
    """Delete the temporary folders of studies into ``out`` that were killed (their process is gone)."""
    prefix = f".{out.name}."
    for folder in out.parent.iterdir():
        if not folder.name.startswith(prefix):
            continue
        kind, _, rest = folder.name[len(prefix):].partition("-")
        pid = rest.partition("-")[0]
        if kind not in ("partial", "old") or not pid.isdigit() or not folder.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def work_folder(out: Path) -> Path:
    """A new hidden sibling of ``out`` to build the results in (leftovers of killed studies removed first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes the folder private; give it the permissions mkdir would
    return work


def publish(work: Path, out: Path) -> None:
    """Rename the finished ``work`` folder to ``out``; a previous study's folder there is deleted only afterwards."""
    old = None
    if out.exists():
        old = work.with_name(work.name.replace(".partial-", ".old-"))
        os.replace(out, old)
    try:
        os.replace(work, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old)
