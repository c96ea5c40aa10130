"""
Errors that carry a message meant for a person.
"""

from __future__ import annotations

__all__ = ["BindError", "ConfigError", "TooManyStreams"]


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


class TooManyStreams(Exception):
    """
    An agent's link already carries as many streams as the relay allows
    (C{--max-streams}); a visitor is told to come back shortly.
    """
