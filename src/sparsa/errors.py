"""Errors that reach a user.

Every message names the problem and says what to do about it; the CLI prints
it on one line and exits non-zero, without a traceback.
"""

from __future__ import annotations


class SparsaError(Exception):
    """A problem the user can fix. The message is shown as is."""

    exit_code = 2


class InputError(SparsaError):
    """Bad input: a path, a flag value, a file's contents."""


class ModelError(SparsaError):
    """A model that cannot be loaded, is not supported, or holds bad weights."""


class DataError(SparsaError):
    """Text that is missing, empty, too short, or malformed."""


def require(condition: bool, message: str, kind: type[SparsaError] = InputError) -> None:
    """Raise ``kind(message)`` unless ``condition`` holds."""
    if not condition:
        raise kind(message)
