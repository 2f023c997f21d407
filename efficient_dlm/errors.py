"""The one error type for mistakes a user can fix (bad config value, missing file, malformed input).

A raising site opts in by raising `UserError` with a message that is the whole story: it names the
file, line or key and what is wrong with it. The CLI prints exactly that one line and exits 2.
Every other exception is an internal bug and keeps its traceback. `UserError` subclasses ValueError
so library callers that catch ValueError keep working; the file variants subclass the built-in
file errors as well, so callers catching FileNotFoundError / FileExistsError keep working too.
"""
from __future__ import annotations


class UserError(ValueError):
    """An error whose message is the whole story (no traceback)."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (or is not what was asked for)."""


class UserFileExistsError(UserError, FileExistsError):
    """An output the user named already exists and may not be replaced."""
