# -*- test-case-name: tests.test_webhooks -*-
"""
Webhook signature checks: a tunnel given C{--verify-webhook KIND:SECRET}
lets a request reach the local service only when it carries a valid
signature of its body by that provider's scheme; others get a 401 from the
agent and never reach the service.

The check needs the whole body, so it is done by the agent's HTTP
forwarder (L{txtunnel.forwarders.http}), which holds each request -- head
and body, at most L{MAX_BODY} bytes, else 413 -- until it is verified.
Comparisons are constant-time; secrets are never logged or sent to the
relay.

Schemes:

C{github}
    C{X-Hub-Signature-256: sha256=HEX}, HMAC-SHA256 of the body.
C{stripe}
    C{Stripe-Signature: t=TIMESTAMP,v1=HEX[,v1=HEX...]}, HMAC-SHA256 of
    C{TIMESTAMP.BODY}; the timestamp must be within L{TOLERANCE} seconds.
C{slack}
    C{X-Slack-Signature: v0=HEX} with C{X-Slack-Request-Timestamp}, HMAC-SHA256
    of C{v0:TIMESTAMP:BODY}; same tolerance.
C{hmac}
    C{X-Signature-256: sha256=HEX} (or bare C{HEX}), HMAC-SHA256 of the body:
    for senders of your own.  C{hmac/HEADER:SECRET} reads the signature
    from C{HEADER} instead.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

import attrs

from txtunnel.chunked import ChunkScanner
from txtunnel.http1 import RequestHead

__all__ = ["KINDS", "MAX_BODY", "TOLERANCE", "WebhookVerifier", "dechunk", "parseVerifier"]

#: Bytes of a request body the agent holds while checking its signature.
MAX_BODY = 1024 * 1024

#: Seconds a signed timestamp (Stripe, Slack) may be off the agent's clock.
TOLERANCE = 300

KINDS = ("github", "stripe", "slack", "hmac")


def _mac(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


#: Digits a signed timestamp may have (seconds since 1970 have 10 for
#: centuries yet): a longer one is refused before it is read as a number.
MAX_STAMP_DIGITS = 12

#: The generic scheme's signature header, unless C{hmac/HEADER:SECRET} names another.
GENERIC_HEADER = b"x-signature-256"


def _stamp(text: str) -> int | None:
    """
    A signed timestamp: ASCII digits only (C{str.isdigit} takes C{'²'} or
    Arabic-Indic digits too, which C{int} then refuses or reads), or C{None}.
    """
    if not 0 < len(text) <= MAX_STAMP_DIGITS or not all("0" <= c <= "9" for c in text):
        return None
    return int(text)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.strip().lower().encode("ascii", "replace"), b.encode("ascii"))


@attrs.frozen(repr=False)
class WebhookVerifier:
    """
    One tunnel's webhook check.
    """

    kind: str
    secret: bytes
    #: Where the C{hmac} scheme finds the signature (lower case).
    header: bytes = GENERIC_HEADER

    def __repr__(self) -> str:
        return f"<WebhookVerifier {self.kind}>"  # never the secret

    def check(self, head: RequestHead, body: bytes, now: float) -> str | None:
        """
        C{None} if the request is signed, else why not (for the 401).
        """
        if self.kind == "hmac":
            return _generic(self.secret, head, body, self.header)
        return _CHECKS[self.kind](self.secret, head, body, now)


def _github(secret: bytes, head: RequestHead, body: bytes, now: float) -> str | None:
    given = (head.header(b"x-hub-signature-256") or b"").decode("latin-1")
    if not given.startswith("sha256="):
        return "missing X-Hub-Signature-256"
    return None if _same(given[7:], _mac(secret, body)) else "bad X-Hub-Signature-256"


def _stripe(secret: bytes, head: RequestHead, body: bytes, now: float) -> str | None:
    given = (head.header(b"stripe-signature") or b"").decode("latin-1")
    stamp, signatures = None, []
    for part in given.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            stamp = value
        elif key == "v1":
            signatures.append(value)
    seconds = _stamp(stamp) if stamp is not None else None
    if seconds is None or not signatures:
        return "missing or malformed Stripe-Signature"
    assert stamp is not None
    if abs(now - seconds) > TOLERANCE:
        return "Stripe-Signature timestamp outside the tolerance"
    expected = _mac(secret, stamp.encode("ascii") + b"." + body)
    ok = False
    for signature in signatures:
        ok |= _same(signature, expected)
    return None if ok else "bad Stripe-Signature"


def _slack(secret: bytes, head: RequestHead, body: bytes, now: float) -> str | None:
    given = (head.header(b"x-slack-signature") or b"").decode("latin-1")
    stamp = (head.header(b"x-slack-request-timestamp") or b"").decode("latin-1").strip()
    seconds = _stamp(stamp)
    if not given.startswith("v0=") or seconds is None:
        return "missing X-Slack-Signature or X-Slack-Request-Timestamp"
    if abs(now - seconds) > TOLERANCE:
        return "X-Slack-Request-Timestamp outside the tolerance"
    expected = _mac(secret, b"v0:" + stamp.encode("ascii") + b":" + body)
    return None if _same(given[3:], expected) else "bad X-Slack-Signature"


def _generic(secret: bytes, head: RequestHead, body: bytes, header: bytes = GENERIC_HEADER) -> str | None:
    name = "-".join(part.capitalize() for part in header.decode("ascii").split("-"))
    given = (head.header(header) or b"").decode("latin-1").strip()
    if given.startswith("sha256="):
        given = given[7:]
    if not given:
        return f"missing {name}"
    return None if _same(given, _mac(secret, body)) else f"bad {name}"


_CHECKS: dict[str, Callable[[bytes, RequestHead, bytes, float], str | None]] = {
    "github": _github,
    "stripe": _stripe,
    "slack": _slack,
}


def parseVerifier(text: str) -> WebhookVerifier:
    """
    C{KIND:SECRET} for C{--verify-webhook}; C{hmac/HEADER:SECRET} for the
    generic scheme with its signature in C{HEADER}.
    """
    from txtunnel.headerrules import headerName

    kind, sep, secret = str(text).strip().partition(":")
    kind, slash, header = kind.partition("/")
    kind = kind.lower()
    if not sep or kind not in KINDS:
        raise ValueError(f"expected KIND:SECRET with KIND one of {', '.join(KINDS)}")
    if slash and kind != "hmac":
        raise ValueError("only the hmac scheme takes a header name (hmac/HEADER:SECRET)")
    if len(secret) < 8:
        raise ValueError("the webhook secret must be at least 8 characters long")
    if slash:
        return WebhookVerifier(kind, secret.encode("utf-8"), headerName(header).lower().encode("ascii"))
    return WebhookVerifier(kind, secret.encode("utf-8"))


def dechunk(raw: bytes) -> bytes:
    """
    The data of a complete chunked body (as the framer passed it on).
    """
    spans: list[tuple[int, int]] = []
    ChunkScanner().feed(raw, 0, spans)
    return b"".join(raw[a:b] for a, b in spans)
