# -*- test-case-name: tests.test_admin -*-
"""
The admin endpoint of a relay or an agent: C{/metrics}, C{/health},
C{/stats}.

It is a small C{twisted.web} site on its own endpoint (loopback by
default), apart from the public listeners, so that nothing a visitor can
reach tells them about the relay's traffic.  What it shows comes from an
L{IAdminSubject}: the relay or the agent.

 - C{/metrics}: the Prometheus text exposition format of the subject's own
   registry (L{txtunnel.metrics}).
 - C{/health/live}: 200 while the process serves requests at all.
   C{/health/ready}: 200 when it can do its job (the relay listens and has
   its store; the agent has a link to the relay and a tunnel bound), else
   503.  C{/health}: both, as JSON, with the readiness status code.
 - C{/stats}: a JSON summary of tunnels and links.  It names tunnels and
   agents' addresses, so it needs C{Authorization: Bearer TOKEN} with the
   admin token; with no token configured it is refused (fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import Attribute, Interface

__all__ = ["AdminSite", "IAdminSubject", "hashAdminToken"]


class IAdminSubject(Interface):
    """
    What the admin endpoint reports on.
    """

    metrics = Attribute("A L{txtunnel.metrics} object with C{render() -> bytes}.")

    def isReady() -> tuple[bool, str]:
        """
        Whether this relay or agent can do its job now, and why not.
        """

    def stats() -> dict[str, Any]:
        """
        A JSON-serialisable summary for C{/stats}.
        """


def hashAdminToken(token: str) -> bytes:
    """
    The form in which the admin token is kept: never the token itself.
    """
    return hashlib.sha256(b"txtunnel-admin-token:" + token.encode("utf-8")).digest()


def _json(request: Any, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, subject: IAdminSubject) -> None:
        super().__init__()
        self.subject = subject

    def render_GET(self, request: Any) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST

        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return bytes(self.subject.metrics.render())


class _Health(Resource):
    isLeaf = True

    def __init__(self, subject: IAdminSubject) -> None:
        super().__init__()
        self.subject = subject

    def render_GET(self, request: Any) -> bytes:
        which = request.postpath[0] if request.postpath and request.postpath[0] else b""
        if which == b"live":
            return _json(request, 200, {"live": True})
        ready, why = self.subject.isReady()
        if which == b"ready":
            return _json(request, 200 if ready else 503, {"ready": ready, "reason": why})
        if which:
            return _json(request, 404, {"error": "try /health, /health/live or /health/ready"})
        return _json(request, 200 if ready else 503, {"live": True, "ready": ready, "reason": why})


class _Stats(Resource):
    isLeaf = True

    def __init__(self, subject: IAdminSubject, tokenHash: bytes | None) -> None:
        super().__init__()
        self.subject = subject
        self.tokenHash = tokenHash

    def _allowed(self, request: Any) -> bool:
        if self.tokenHash is None:
            return False
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        candidate = hashAdminToken(given.strip().decode("utf-8", "replace"))
        return hmac.compare_digest(candidate, self.tokenHash)

    def render_GET(self, request: Any) -> bytes:
        if self.tokenHash is None:
            return _json(request, 403, {"error": "no admin token is configured (--admin-token); /stats is off"})
        if not self._allowed(request):
            request.setHeader(b"www-authenticate", b'Bearer realm="txtunnel admin"')
            return _json(request, 401, {"error": "send Authorization: Bearer <admin token>"})
        return _json(request, 200, self.subject.stats())


class _Root(Resource):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"txtunnel admin: /metrics /health /health/live /health/ready /stats\n"

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)  # type: ignore[no-any-return]


class AdminSite(Site):
    """
    The admin endpoint's site for one relay or agent.
    """

    noisy = False

    def __init__(self, subject: IAdminSubject, token: str | None = None) -> None:
        root = _Root()
        root.putChild(b"metrics", _Metrics(subject))
        root.putChild(b"health", _Health(subject))
        root.putChild(b"stats", _Stats(subject, hashAdminToken(token) if token else None))
        super().__init__(root)
        self.displayTracebacks = False
        # Someone reads the metrics now: an agent follows its HTTP traffic
        # to count requests (see Traffic.enabled).
        subject.metrics.served = True

    def log(self, request: Any) -> None:
        # Scrapes every few seconds would drown the log.
        pass
