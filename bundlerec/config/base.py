"""The configuration's error type and the check every section's ``__post_init__`` uses."""

from __future__ import annotations




class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)
