"""User errors: a mistake in what a user passed (an argument, a file, a dataset), as opposed to a bug in ravit.

The ``ravit`` command prints a :class:`UserError` as one line and exits with code 2; any other exception keeps its
traceback, so a bug inside ravit is never hidden behind a one-line message. Library callers can catch the usual
built-in types too: each error here also derives from the built-in exception a caller would expect.
"""

from __future__ import annotations

__all__ = ["DataError", "InvalidArgumentError", "MissingFileError", "UserError"]


class UserError(Exception):
    """A user's mistake: the CLI shows the message alone and exits with code 2."""


class InvalidArgumentError(UserError, ValueError):
    """An argument out of range, of the wrong type, or inconsistent with another one."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a dataset needs) does not exist."""


class DataError(UserError, ValueError):
    """A file that exists but cannot be used: truncated, corrupt, of the wrong kind or content."""
