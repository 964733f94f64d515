"""The base class of failures whose message is complete (what went wrong, where, what to do):
entry points print them as one ``ERROR:`` line instead of a traceback."""

from __future__ import annotations


class UserLLMError(Exception):
    """A failure stated in terms a user can act on."""


class ConfigError(UserLLMError, ValueError):
    """A configuration value that cannot work, named with the setting to change."""
