# -*- test-case-name: tests.test_sharing -*-
"""
Short signed tokens the relay hands to browsers (session and login
cookies): a JSON payload, base64url, and an HMAC-SHA256 over a purpose
label and the payload with the relay's secret.

The purpose label keeps one kind of token from being accepted as another
(a login cookie is never a session).  The secret lives in the state
directory (mode 0600), made on first start, so sessions survive a restart
and a new secret logs everyone out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from typing import Any

__all__ = ["Signer", "loadSecret"]

#: Bytes of a relay secret.
SECRET_BYTES = 32

#: A signed token longer than this is refused before any decoding.
MAX_TOKEN = 4096


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def loadSecret(stateDir: str) -> bytes:
    """
    The relay's signing secret from C{stateDir/relay.secret}, made (mode
    0600) if missing.
    """
    path = os.path.join(stateDir, "relay.secret")
    try:
        with open(path, "rb") as f:
            secret = _unb64(f.read().strip().decode("ascii"))
        if len(secret) >= SECRET_BYTES:
            return secret
        raise ValueError(f"{path} holds a secret shorter than {SECRET_BYTES} bytes")
    except FileNotFoundError:
        pass
    os.makedirs(stateDir, exist_ok=True)
    secret = secrets.token_bytes(SECRET_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return loadSecret(stateDir)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(_b64(secret) + "\n")
    return secret


class Signer:
    """
    Signs and checks payloads for one relay secret.
    """

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @property
    def secret(self) -> bytes:
        """
        The relay secret, for keys derived from it (L{txtunnel.jwts}).
        """
        return self._secret

    def _mac(self, purpose: str, body: str) -> str:
        message = purpose.encode("ascii") + b"\0" + body.encode("ascii")
        return _b64(hmac.new(self.secret, message, hashlib.sha256).digest())

    def sign(self, purpose: str, payload: dict[str, Any], expires: float) -> str:
        """
        A token for C{payload} that L{unsign} accepts for C{purpose} until
        C{expires} (wall-clock seconds).
        """
        body = _b64(json.dumps(dict(payload, x=int(expires)), separators=(",", ":")).encode("utf-8"))
        return body + "." + self._mac(purpose, body)

    def unsign(self, purpose: str, token: str | None, now: float) -> dict[str, Any] | None:
        """
        The payload of C{token} if it is well-formed, signed by this
        relay's secret for C{purpose} (checked in constant time) and not
        expired; otherwise C{None}.
        """
        if not token or len(token) > MAX_TOKEN or token.count(".") != 1:
            return None
        body, mac = token.split(".")
        try:
            if not hmac.compare_digest(mac.encode("ascii"), self._mac(purpose, body).encode("ascii")):
                return None
            payload = json.loads(_unb64(body))
        except (ValueError, UnicodeError):
            return None
        if not isinstance(payload, dict) or not isinstance(payload.get("x"), int) or payload["x"] <= now:
            return None
        return payload
