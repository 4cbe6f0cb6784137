"""The ``ravit`` command.

Each subcommand lives in its own module in this package and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace, returns an exit code). Modules are discovered, so
adding a subcommand never touches this file.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import pkgutil
import sys

from ravit.errors import InvalidArgumentError, UserError

__all__ = ["CLIError", "build_parser", "main"]

# A command-line mistake (a bad flag value, flags that contradict each other): one line, exit code 2.
CLIError = InvalidArgumentError

# Operating-system errors that come from where the user pointed ravit (an output path under a regular file, a
# read-only folder, a full disk), not from a bug: reported as one line like a UserError.
_USER_OS_ERRORS = (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ravit", description="Robust & Adaptive Vision Transformers: FAN, ATS and robustness tools."
    )
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
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"ravit {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if not isinstance(err, _USER_OS_ERRORS) and err.errno not in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise
        print(f"ravit {args.command}: error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
