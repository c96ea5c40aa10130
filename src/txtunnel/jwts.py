# -*- test-case-name: tests.test_sharing -*-
"""
The relay's own JSON Web Tokens: what C{txtunnel login} stores and what API
clients present as C{Authorization: Bearer ...} to a shared tunnel.

They are HS256 tokens (joserfc) keyed by a key derived from the relay
secret in the state directory, with C{iss} naming the relay's domain, C{aud}
C{txtunnel}, C{sub} the verified email and an expiry; only this relay (and
relays sharing its state directory) can make or check them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

__all__ = ["AUDIENCE", "RelayJWT"]

AUDIENCE = "txtunnel"

#: A bearer token longer than this is refused before it is decoded.
MAX_JWT = 8192


class RelayJWT:
    """
    Issues and verifies one relay's tokens.
    """

    def __init__(self, secret: bytes, domain: str) -> None:
        from joserfc.jwk import OctKey

        self.issuer = f"txtunnel:{domain}"
        self._key = OctKey.import_key(hmac.new(secret, b"txtunnel-jwt", hashlib.sha256).digest())

    def issue(self, email: str, lifetime: float, now: float) -> str:
        from joserfc import jwt

        claims = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": email,
            "email": email,
            "iat": int(now),
            "exp": int(now + lifetime),
            "jti": secrets.token_urlsafe(12),
        }
        return jwt.encode({"alg": "HS256", "typ": "JWT"}, claims, self._key)

    def verify(self, token: str, now: float) -> dict[str, Any] | None:
        """
        The claims of C{token} if this relay issued it and it has not
        expired, else C{None}.
        """
        from joserfc import jwt
        from joserfc.errors import JoseError

        if not token or len(token) > MAX_JWT:
            return None
        try:
            decoded = jwt.decode(token, self._key, algorithms=["HS256"])
            jwt.JWTClaimsRegistry(
                now=int(now),
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": AUDIENCE},
                exp={"essential": True},
                sub={"essential": True},
            ).validate(decoded.claims)
        except (JoseError, ValueError, TypeError):
            return None
        claims = dict(decoded.claims)
        return claims if isinstance(claims.get("sub"), str) else None
