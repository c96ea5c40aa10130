# -*- test-case-name: tests.test_policy -*-
"""
HTTP basic auth for a tunnel, checked at the relay without the relay ever
seeing the password in its configuration.

The agent turns C{--basic-auth user:pass} into a salted PBKDF2-SHA256 hash
(L{hashCredentials}) and sends only that in its bind request; the relay
checks each visitor's C{Authorization: Basic} header against it
(L{checkCredentials}) with a constant-time compare.  A stolen bind request
(or a relay log, or the relay's memory) gives an attacker a slow, salted
hash to crack, not a password.

Deriving the key takes a few milliseconds on purpose, so the relay keeps a
small, bounded cache of credentials it has already accepted (keyed by a
fast hash of the header and the stored hash): a visitor's later requests
cost one SHA-256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections import OrderedDict

__all__ = ["CredentialCache", "checkCredentials", "credentialsList", "hashCredentials", "parseAuthorization"]

SCHEME = "pbkdf2-sha256"
#: Iterations the agent uses: about 10 ms on a 2020s CPU.
ITERATIONS = 50_000
#: The range a relay accepts, so that an agent can neither weaken the hash
#: to nothing nor make each check cost the relay seconds.
MIN_ITERATIONS = 10_000
#: About 75 ms: one check is the most a bad Authorization header can cost.
MAX_ITERATIONS = 200_000
#: Credentials one tunnel may list.
MAX_CREDENTIALS = 32


def hashCredentials(userPass: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """
    C{"user:pass"} to C{"pbkdf2-sha256$ITER$user$SALT$HASH"} (salt and hash in
    URL-safe base64).  The user name stays readable so the relay can name
    it in logs; the password is only in the hash.

    @raise ValueError: if C{userPass} is not C{user:pass} with both parts.
    """
    user, sep, password = userPass.partition(":")
    if not sep or not user or not password:
        raise ValueError("basic auth must be USER:PASSWORD, both non-empty")
    if any(c in user for c in "$\r\n\0"):
        raise ValueError("the basic auth user name must not hold $ or line breaks")
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", userPass.encode("utf-8"), salt, iterations)
    b64 = base64.urlsafe_b64encode
    return f"{SCHEME}${iterations}${user}${b64(salt).decode()}${b64(digest).decode()}"


def _split(stored: str) -> tuple[int, str, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 5 or parts[0] != SCHEME:
        raise ValueError(f"basic auth credentials must be {SCHEME}$ITERATIONS$USER$SALT$HASH")
    try:
        iterations = int(parts[1])
        salt = base64.urlsafe_b64decode(parts[3])
        digest = base64.urlsafe_b64decode(parts[4])
    except (ValueError, binascii.Error):
        raise ValueError("basic auth credentials are not well-formed") from None
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"basic auth hash iterations must be between {MIN_ITERATIONS} and {MAX_ITERATIONS}")
    if len(salt) < 8 or len(digest) != 32 or not parts[2]:
        raise ValueError("basic auth credentials are not well-formed")
    return iterations, parts[2], salt, digest


def credentialsList(value: object) -> list[str]:
    """
    Check the hashed credentials a bind request carries.

    @raise ValueError: with a reason for the agent.
    """
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("basic-auth must be a list of hashed credentials")
    if len(value) > MAX_CREDENTIALS:
        raise ValueError(f"at most {MAX_CREDENTIALS} basic auth credentials per tunnel")
    users = set()
    for stored in value:
        user = _split(stored)[1]
        if user in users:
            # Each header is checked against one entry, found by its user.
            raise ValueError(f"basic auth user {user!r} is listed twice; give each user one password")
        users.add(user)
    return list(value)


def parseAuthorization(header: bytes | None) -> str | None:
    """
    The C{user:pass} of an C{Authorization: Basic ...} header, or C{None}.
    """
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(b" ")
    if scheme.lower() != b"basic" or len(encoded) > 4096:
        return None
    try:
        return base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


def checkCredentials(userPass: str, credentials: list[str]) -> bool:
    """
    Whether C{userPass} matches the stored entry of its user name.

    At most one key is derived whatever the header and however many
    entries there are, so a bad header costs the relay one PBKDF2, not one
    per entry.  Every entry's user name is compared in constant time (no
    early exit), and an unknown user still costs one PBKDF2 (with the
    first entry's salt and iterations), so the time taken does not tell
    which user names exist.
    """
    user = userPass.partition(":")[0].encode("utf-8")
    chosen: tuple[int, bytes, bytes] | None = None
    decoy: tuple[int, bytes, bytes] | None = None
    for stored in credentials:
        try:
            iterations, name, salt, digest = _split(stored)
        except ValueError:
            continue
        if decoy is None:
            decoy = (iterations, salt, digest)
        if hmac.compare_digest(name.encode("utf-8"), user) and chosen is None:
            chosen = (iterations, salt, digest)
    entry = chosen or decoy
    if entry is None:
        return False
    iterations, salt, digest = entry
    derived = hashlib.pbkdf2_hmac("sha256", userPass.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(derived, digest) and chosen is not None


class CredentialCache:
    """
    Which (header, credentials) pairs were accepted lately: a bounded LRU
    of SHA-256 digests, so a cache hit needs no PBKDF2 and the cache never
    holds a password.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    @staticmethod
    def key(userPass: str, credentials: list[str]) -> bytes:
        h = hashlib.sha256(userPass.encode("utf-8"))
        for stored in credentials:
            h.update(b"\0" + stored.encode())
        return h.digest()

    def __contains__(self, key: bytes) -> bool:
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        return False

    def add(self, key: bytes) -> None:
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)
