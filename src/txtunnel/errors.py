"""
Errors that carry a message meant for a person.
"""

from __future__ import annotations

__all__ = ["BindError", "ConfigError"]


class BindError(Exception):
    """
    The relay refuses to give a tunnel the public address it asked for.  The
    message is sent to the agent as the reason.
    """


class ConfigError(Exception):
    """
    A configuration file, environment variable or option has a bad value.
    The message names where it came from and what was expected.
    """
