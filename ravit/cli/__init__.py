"""The ``ravit`` command.

Each subcommand lives in its own module in this package and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace, returns an exit code). Modules are discovered, so
adding a subcommand never touches this file. The flags they share (``MODEL``, ``--data``, ``--output``, lists ...)
are built by ``ravit.cli._args``, whose parser class formats every help page and turns every parse error into one
line.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import pkgutil
import sys

from ravit import __version__
from ravit.cli._args import ArgumentParser
from ravit.errors import InvalidArgumentError, UserError

__all__ = ["CLIError", "build_parser", "main"]

# A command-line mistake (a bad flag value, flags that contradict each other): one line, exit code 2.
CLIError = InvalidArgumentError

# Operating-system errors that come from where the user pointed ravit (an output path under a regular file, a
# read-only folder, a full disk), not from a bug: reported as one line like a UserError.
_USER_OS_ERRORS = (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="ravit", description="Robust & Adaptive Vision Transformers: FAN, ATS and robustness tools."
    )
    parser.add_argument("--version", action="version", version=f"ravit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def _one_line(err: UserError) -> str:
    """The user's message; a DataLoader worker wraps it in its traceback ("Caught X in DataLoader worker ..."), whose
    last line is the original message."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: list[str] | None = None) -> int:
    args = argparse.Namespace()  # the subcommand's name lands here first, so a parse error can name it
    try:
        build_parser().parse_args(argv, args)
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"{_prog(args)}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if not isinstance(err, _USER_OS_ERRORS) and err.errno not in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise
        print(f"{_prog(args)}: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


def _prog(args: argparse.Namespace) -> str:
    command = getattr(args, "command", None)
    return f"ravit {command}" if command else "ravit"


if __name__ == "__main__":
    sys.exit(main())
