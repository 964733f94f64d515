"""The base class of failures whose message is complete (what went wrong, where, what to do):
entry points print them as one ``ERROR:`` line instead of a traceback."""

from __future__ import annotations

import errno
import os


class UserLLMError(Exception):
    """A failure stated in terms a user can act on."""


class ConfigError(UserLLMError, ValueError):
    """A configuration value that cannot work, named with the setting to change."""


# A full, read-only or unwritable disk, as Python reports it (an OSError's errno) and as
# Orbax/TensorStore do (a ValueError carrying the OS message, e.g. "No space left on device").
_ERRNO_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_WRITE_FAILURES = {os.strerror(code): cause for code, cause in _ERRNO_CAUSES.items()}


def write_failure_cause(error: BaseException) -> str | None:
    """Why a write failed, in words, if ``error`` is a full / read-only / unwritable disk."""
    if isinstance(error, OSError) and error.errno in _ERRNO_CAUSES:
        return _ERRNO_CAUSES[error.errno]
    text = str(error)
    return next((cause for msg, cause in _WRITE_FAILURES.items() if msg in text), None)


def write_failure_message(error: OSError) -> str | None:
    """One line for an ``OSError`` from a full, read-only or unwritable disk (else None)."""
    cause = write_failure_cause(error)
    if cause is None:
        return None
    # Gin re-raises with "In call to configurable ..." appended: keep the OS's own line.
    detail = str(error).splitlines()[0] if str(error) else repr(error)
    return f"cannot write: {cause} ({detail}); nothing was deleted"
