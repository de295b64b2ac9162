"""Errors that are the user's to fix (a config key or value, a file, a record).

The CLI prints them as one line and exits 2; every other exception keeps its traceback, so a
bug is never mistaken for a bad input. They subclass the builtin the caller would expect
(ValueError, FileNotFoundError), so library callers may catch either.
"""
from __future__ import annotations

__all__ = ["UserError", "ConfigError", "MissingFileError"]


class UserError(ValueError):
    """Bad input: the message names the field, file or record."""


class ConfigError(UserError):
    """An unknown config key or a value of the wrong type or range; the message names the dotted field."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (or lacks what it must hold)."""
