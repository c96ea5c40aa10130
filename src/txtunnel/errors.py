"""
Errors that carry a message meant for a person.
"""

from __future__ import annotations

__all__ = ["BindError", "ConfigError", "QuotaSpent", "StreamRefused", "TooManyStreams", "VisitorRefused"]


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


class StreamRefused(Exception):
    """
    The relay will not open a stream for this visitor; C{status} is the
    HTTP status that says why, for the HTTP edge.
    """

    status = 503


class TooManyStreams(StreamRefused):
    """
    An agent's link already carries as many streams as the relay allows
    (C{--max-streams}); a visitor is told to come back shortly.
    """


class VisitorRefused(StreamRefused):
    """
    The visitor's address is outside the relay's C{--ip-allow} or inside its
    C{--ip-deny}: for TCP, UDP and TLS tunnels, which have no visitor gates,
    the check is made when the visitor's stream would be opened.
    """

    status = 403


class QuotaSpent(StreamRefused):
    """
    A monthly bandwidth quota of the visitor's address or of the tunnel
    (C{--quota-per-ip}, C{--quota-per-tunnel}) is spent: a TCP, UDP or TLS
    visitor gets no stream until it resets, as an HTTP one gets a 429.
    """

    status = 429
