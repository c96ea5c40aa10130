# -*- test-case-name: tests.test_sharing -*-
"""
The relay as an OpenID Connect client (relying party): any provider found
by its discovery URL, the authorization code flow with PKCE (C{S256}),
C{state} and C{nonce}, and the ID token verified against the provider's
JWKS (signature, C{iss}, C{aud}, C{exp}, C{nonce}) with joserfc.

The provider's answers are small JSON documents; each is read with a size
cap (L{MAX_DOCUMENT}) and a timeout, so a misbehaving provider cannot make
the relay buffer without bound or wait for ever.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Any
from urllib.parse import urlencode

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from txtunnel.allow import isEmail

__all__ = ["LoginFailed", "OIDCProvider", "pkcePair"]

#: Bytes of a provider document (discovery, JWKS, token answer) read at most.
MAX_DOCUMENT = 256 * 1024

#: Seconds a request to the provider may take.
TIMEOUT = 15.0

#: Signature algorithms accepted on ID tokens (never C{none}, never HMAC
#: with a public key).
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]

#: How long discovery and JWKS documents are kept before being fetched again.
CACHE_SECONDS = 3600.0

#: Seconds between fetches of a provider's JWKS for tokens signed with a
#: key it lacks (a rotation), so tokens with made-up key ids cannot make
#: the relay fetch it at will.
REFRESH_SECONDS = 60.0


class LoginFailed(Exception):
    """
    A login could not be completed; the message is shown to the visitor
    (it never holds a secret).
    """


def pkcePair() -> tuple[str, str]:
    """
    A PKCE code verifier and its C{S256} challenge.
    """
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()
    return verifier, challenge


async def fetchJSON(
    reactor: Any, url: str, *, data: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """
    GET (or POST C{data} as a form to) C{url}; the status and the parsed
    JSON body, read with a size cap.

    @raise LoginFailed: on a network error, an oversized or non-JSON body.
    """
    import treq

    heads: dict[bytes | str, bytes | str] = {"Accept": "application/json"}
    heads.update(headers or {})
    try:
        if data is None:
            d = treq.get(url, headers=heads, timeout=TIMEOUT, reactor=reactor)
        else:
            d = treq.post(url, data=data, headers=heads, timeout=TIMEOUT, reactor=reactor)
        response = await d
    except Exception as e:
        raise LoginFailed(f"cannot reach {url}: {e.__class__.__name__}") from None
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > MAX_DOCUMENT:
            raise LoginFailed(f"{url} answered with more than {MAX_DOCUMENT} bytes")
        chunks.append(data)

    try:
        await treq.collect(response, collect)
    except LoginFailed:
        raise
    except Exception as e:
        if size > MAX_DOCUMENT:
            raise LoginFailed(f"{url} answered with more than {MAX_DOCUMENT} bytes") from None
        raise LoginFailed(f"reading {url} failed: {e.__class__.__name__}") from None
    try:
        return response.code, json.loads(b"".join(chunks))
    except ValueError:
        raise LoginFailed(f"{url} did not answer with JSON (status {response.code})") from None


class OIDCProvider:
    """
    One configured OpenID Connect provider (a C{[provider:NAME]} section).
    """

    log = Logger()
    kind = "oidc"

    def __init__(
        self,
        reactor: Any,
        name: str,
        issuer: str,
        clientID: str,
        clientSecret: str,
        scopes: str = "openid email",
        label: str | None = None,
        audience: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.name = name
        self.label = label or name
        suffix = "/.well-known/openid-configuration"
        self.discoveryURL = issuer if issuer.endswith(suffix) else issuer.rstrip("/") + suffix
        self.clientID = clientID
        self._clientSecret = clientSecret
        self.scopes = scopes
        #: The C{aud} a bearer token from this provider must name.
        self.audience = audience or clientID
        self._metadata: tuple[float, dict[str, Any]] | None = None
        self._keys: tuple[float, Any] | None = None
        #: When the key set was last fetched for an unknown key, and who
        #: waits for a fetch under way.
        self._refreshed: float | None = None
        self._refreshing: list[Deferred[Any]] | None = None

    def __repr__(self) -> str:
        return f"<OIDCProvider {self.name} {self.discoveryURL}>"

    async def metadata(self) -> dict[str, Any]:
        now = self.reactor.seconds()
        if self._metadata is not None and now - self._metadata[0] < CACHE_SECONDS:
            return self._metadata[1]
        status, document = await fetchJSON(self.reactor, self.discoveryURL)
        if status != 200 or not isinstance(document, dict):
            raise LoginFailed(f"the login provider {self.name!r} has no usable discovery document")
        for key in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(document.get(key), str):
                raise LoginFailed(f"the login provider {self.name!r} discovery document lacks {key}")
        expected = self.discoveryURL[: -len("/.well-known/openid-configuration")]
        if document["issuer"].rstrip("/") != expected.rstrip("/"):
            raise LoginFailed(f"the login provider {self.name!r} names a different issuer than its discovery URL")
        self._metadata = (now, document)
        return document

    async def keys(self, refresh: bool = False) -> Any:
        from joserfc.jwk import KeySet

        now = self.reactor.seconds()
        if not refresh and self._keys is not None and now - self._keys[0] < CACHE_SECONDS:
            return self._keys[1]
        metadata = await self.metadata()
        status, document = await fetchJSON(self.reactor, metadata["jwks_uri"])
        if status != 200 or not isinstance(document, dict):
            raise LoginFailed(f"the login provider {self.name!r} has no usable key set")
        try:
            keys = KeySet.import_key_set(document)  # type: ignore[arg-type]
        except Exception:
            raise LoginFailed(f"the login provider {self.name!r} published a key set that cannot be read") from None
        self._keys = (now, keys)
        return keys

    async def refreshKeys(self) -> Any:
        """
        The provider's key set fetched again, for a token signed with a key
        the cached set lacks; C{None} when it was fetched so less than
        L{REFRESH_SECONDS} ago.  Tokens arriving while a fetch is under way
        wait for it rather than fetch again.
        """
        if self._refreshing is not None:
            waiting: Deferred[Any] = Deferred()
            self._refreshing.append(waiting)
            return await waiting
        now = self.reactor.seconds()
        if self._refreshed is not None and now - self._refreshed < REFRESH_SECONDS:
            return None
        self._refreshed = now
        waiters: list[Deferred[Any]] = []
        self._refreshing = waiters
        try:
            keys = await self.keys(refresh=True)
        except Exception:
            self._refreshing = None
            for w in waiters:
                w.callback(None)
            raise
        self._refreshing = None
        for w in waiters:
            w.callback(keys)
        return keys

    async def authorizationURL(
        self, redirectURI: str, state: str, nonce: str, challenge: str, prompt: str | None = None
    ) -> str:
        """
        Where to send the visitor to log in; C{prompt} (C{"select_account"}
        when switching accounts) asks the provider to let them choose.
        """
        metadata = await self.metadata()
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.clientID,
                "redirect_uri": redirectURI,
                "scope": self.scopes,
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
                **({"prompt": prompt} if prompt else {}),
            }
        )
        endpoint = metadata["authorization_endpoint"]
        return endpoint + ("&" if "?" in endpoint else "?") + query

    async def emails(self, code: str, verifier: str, redirectURI: str, nonce: str) -> list[str]:
        """
        Trade C{code} for tokens and return the verified emails the ID
        token proves.

        @raise LoginFailed: for any refusal or any check that fails.
        """
        metadata = await self.metadata()
        status, answer = await fetchJSON(
            self.reactor,
            metadata["token_endpoint"],
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirectURI,
                "code_verifier": verifier,
                "client_id": self.clientID,
                "client_secret": self._clientSecret,
            },
        )
        if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("id_token"), str):
            error = answer.get("error") if isinstance(answer, dict) else None
            raise LoginFailed(f"the login provider refused the login code ({str(error or status)[:80]})")
        claims = await self.verify(answer["id_token"], nonce)
        email = claims.get("email")
        if not isinstance(email, str) or not email:
            raise LoginFailed("the login provider did not give an email address (is the 'email' scope allowed?)")
        if claims.get("email_verified") is not True:
            raise LoginFailed(f"the login provider has not verified {email[:254]!r}")
        if not isEmail(email):
            raise LoginFailed(f"the login provider gave {email[:254]!r}, which is not a usable email address")
        return [email.lower()]

    async def verifyBearer(self, token: str) -> str | None:
        """
        The verified email of a bearer token this provider issued for the
        relay (audience C{audience}, else the relay's client id), or
        C{None} if it is not this provider's.

        @raise LoginFailed: if it is this provider's but not valid.
        """
        from joserfc.errors import JoseError
        from joserfc.jws import extract_compact

        try:
            unverified = json.loads(extract_compact(token.encode("ascii")).payload)
        except (JoseError, ValueError, UnicodeError):
            return None
        metadata = await self.metadata()
        if not isinstance(unverified, dict) or unverified.get("iss") != metadata["issuer"]:
            return None
        claims = await self.verify(token, None)
        email = claims.get("email")
        if not isEmail(email) or claims.get("email_verified") is not True:
            raise LoginFailed("the bearer token has no verified email")
        assert isinstance(email, str)
        return email.lower()

    async def verify(self, idToken: str, nonce: str | None) -> dict[str, Any]:
        """
        The claims of C{idToken} once its signature (a key from the
        provider's JWKS; fetched again once for an unknown key id), issuer,
        audience, expiry and nonce are checked.
        """
        from joserfc import jwt
        from joserfc.errors import InvalidKeyIdError, JoseError

        metadata = await self.metadata()
        keys = await self.keys()
        try:
            try:
                token = jwt.decode(idToken, keys, algorithms=ALGORITHMS)
            except (InvalidKeyIdError, ValueError):
                # A key the cached set lacks: the provider may have rotated.
                fresh = await self.refreshKeys()
                if fresh is None:
                    raise
                token = jwt.decode(idToken, fresh, algorithms=ALGORITHMS)
            checks: dict[str, Any] = {
                "iss": {"essential": True, "value": metadata["issuer"]},
                "aud": {"essential": True, "value": self.audience if nonce is None else self.clientID},
                "exp": {"essential": True},
            }
            if nonce is not None:
                checks["nonce"] = {"essential": True, "value": nonce}
            registry = jwt.JWTClaimsRegistry(now=int(self.reactor.seconds()), leeway=60, **checks)
            registry.validate(token.claims)
        except (JoseError, ValueError) as e:
            raise LoginFailed(f"the login provider's ID token was not valid ({e.__class__.__name__})") from None
        return dict(token.claims)


def providerFromSection(reactor: Any, name: str, values: dict[str, Any]) -> Any:
    """
    A provider object for a C{[provider:NAME]} section's checked values.
    """
    if values.get("type") == "github":
        from txtunnel.github import GitHubProvider

        return GitHubProvider(
            reactor,
            name,
            values["client-id"],
            values["client-secret"],
            values.get("issuer") or "https://github.com",
            values.get("api-url") or "https://api.github.com",
            values.get("label"),
        )
    return OIDCProvider(
        reactor,
        name,
        values["issuer"],
        values["client-id"],
        values["client-secret"],
        values.get("scopes") or "openid email",
        values.get("label"),
        values.get("audience"),
    )
