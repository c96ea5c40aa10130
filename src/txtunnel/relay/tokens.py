# -*- test-case-name: tests.test_policy -*-
"""
Agent tokens: from C{--token} and a tokens file, kept only as hashes, with
the names and ports each one has reserved.

A tokens file has one token a line, then what it reserves::

    # token (or its hash)                 reserved names and ports
    s3cret-token-for-alice               http:alice tcp:20005
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  http:bob

A plain token is hashed as soon as it is read; a C{sha256:HEX} line is the
hash itself (C{printf 'txtunnel-token:%s' TOKEN | sha256sum}), so the file
need not hold any secret at all.  A reserved name or port can be bound only
by agents presenting that token; every other agent is refused it, and the
relay never hands a reserved port out at random.
"""

from __future__ import annotations

import hashlib
import re

import attrs

from txtunnel.config import portNumber
from txtunnel.errors import ConfigError
from txtunnel.names import checkName

__all__ = ["TokenEntry", "hashToken", "loadTokensFile", "parseReservation"]

_HEX = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
#: Kinds a reservation may name, and whether they are named by port.
RESERVABLE = {"http": False, "tls": False, "tcp": True, "udp": True}


def hashToken(token: str) -> bytes:
    """
    The form in which the relay keeps a token: never the token itself.
    """
    return hashlib.sha256(b"txtunnel-token:" + token.encode("utf-8")).digest()


def parseReservation(text: str) -> tuple[str, str]:
    """
    C{"http:alice"}, C{"tcp:20005"} to C{(kind, key)}.
    """
    kind, sep, key = text.partition(":")
    if not sep or kind not in RESERVABLE:
        raise ValueError(f"{text!r} is not a reservation like http:NAME, tls:NAME, tcp:PORT or udp:PORT")
    if RESERVABLE[kind]:
        return kind, str(portNumber(key))
    return kind, checkName(key)


@attrs.frozen
class TokenEntry:
    """
    One token the relay accepts: its hash and what it reserves.
    """

    digest: bytes
    reserved: frozenset[tuple[str, str]] = frozenset()


def loadTokensFile(path: str) -> list[TokenEntry]:
    """
    Read C{path}: one token (or C{sha256:HEX}) a line, then its
    reservations; blank lines and C{#} comments are skipped.

    @raise ConfigError: naming the file and line.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read tokens file: {e}") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        token, *reservations = fields
        where = f"{path} line {number}"
        match = _HEX.match(token)
        if match:
            digest = bytes.fromhex(match.group(1))
        elif len(token) < 8:
            raise ConfigError(f"{where}: tokens must be at least 8 characters long")
        else:
            digest = hashToken(token)
        try:
            reserved = frozenset(parseReservation(r) for r in reservations)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        entries.append(TokenEntry(digest, reserved))
    return entries
