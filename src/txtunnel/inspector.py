# -*- test-case-name: tests.test_inspector -*-
"""
The agent's traffic inspector: a web page and a JSON API on the agent's own
loopback port (C{http://127.0.0.1:4040/} by default) that show the HTTP
requests passing through its tunnels, live, and replay them to the local
service.

The page is one static file (C{txtunnel/static/inspector.html}, plain
JavaScript, no build step).  The API (see C{docs/inspector.rst}):

 - C{GET /api/requests}: summaries of the captured requests, newest first.
 - C{GET /api/requests/ID}: one request and its response, headers and
   bodies decoded for display (L{txtunnel.traffic.describeBody}).
 - C{POST /api/requests/ID/replay}: send the request again to the local
   service, optionally edited (JSON: C{method}, C{target}, C{headers},
   C{body}); the replay is captured like any request.
 - C{GET /api/events}: server-sent events, one C{request} event with a
   summary each time a request starts or ends.
 - C{GET /api/tunnels}: the agent's tunnels.

Captures live in the agent's bounded ring (L{txtunnel.traffic.Traffic}).
The inspector answers only requests whose C{Host} is a loopback name or the
address it was reached on, so a web page elsewhere cannot read it through
DNS rebinding, and replays need a JSON body, which a cross-site form cannot
send without a CORS preflight this server never grants.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from txtunnel.traffic import Capture, Follower, Traffic

__all__ = ["InspectorSite", "ReplayError", "buildReplay", "replay"]

#: Largest replay request body (JSON) the API reads.
MAX_REPLAY_BODY = 1024 * 1024
#: Event-stream clients at once.
MAX_WATCHERS = 32
#: Seconds a replay may take in all.
REPLAY_TIMEOUT = 60.0

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

#: Headers the replay sets itself (framing and the connection's own).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade", "proxy-connection"}
)

_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_TARGET = re.compile(rb"^(/[\x21-\x7e]*|\*)$")


class ReplayError(Exception):
    """
    A replay that cannot be made; the message says why (HTTP 400 or 409).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _json(request: Any, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode() + b"\n"


def buildReplay(capture: Capture, edits: dict[str, Any]) -> bytes:
    """
    The bytes of C{capture}'s request again, with C{edits} applied, as one
    C{Connection: close} HTTP/1.1 request with a C{Content-Length}.

    @raise ReplayError: for bad edits, or when the body was not captured
        whole and no new one is given.
    """
    method = str(edits.get("method") or capture.method).encode("latin-1", "replace")
    target = str(edits.get("target") or capture.target).encode("utf-8", "replace")
    if not _TOKEN.match(method):
        raise ReplayError(400, f"{method!r} is not an HTTP method")
    if not _TARGET.match(target):
        raise ReplayError(400, "the target must start with / and hold no spaces or control characters")
    headers = edits.get("headers")
    if headers is None:
        headers = capture.requestHeaders
    if not isinstance(headers, list) or not all(
        isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in headers
    ):
        raise ReplayError(400, "headers must be a list of [name, value] pairs of strings")
    if "body" in edits and edits["body"] is not None:
        if not isinstance(edits["body"], str):
            raise ReplayError(400, "body must be a string")
        body = edits["body"].encode("utf-8")
    else:
        body, complete = capture.requestContent()
        if not complete:
            raise ReplayError(409, "the request body was larger than the capture; give a body to replay it")
    lines = [method + b" " + target + b" HTTP/1.1"]
    for name, value in headers:
        rawName, rawValue = name.encode("latin-1", "replace"), value.encode("latin-1", "replace")
        if not _TOKEN.match(rawName):
            raise ReplayError(400, f"{name!r} is not a header name")
        if any(c in rawValue for c in b"\r\n\0"):
            raise ReplayError(400, f"the value of header {name!r} holds a line break")
        if name.lower() in HOP_BY_HOP:
            continue
        lines.append(rawName + b": " + rawValue.strip())
    if body or method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _Replaying(Protocol):
    """
    One replay's connection to the local service: its bytes both ways go
    to a L{Follower}, so the replay is captured like any request.
    """

    def __init__(self, data: bytes, follower: Follower, clock: Any) -> None:
        self.data = data
        self.follower = follower
        self.clock = clock
        self.timer: Any = None

    def connectionMade(self) -> None:
        self.follower.requestData(self.data)
        self.transport.write(self.data)  # type: ignore[union-attr]
        self.timer = self.clock.callLater(REPLAY_TIMEOUT, self.transport.abortConnection)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.follower.responseData(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.follower.connectionLost()


def replay(agent: Any, capture: Capture, edits: dict[str, Any]) -> Deferred[Capture]:
    """
    Send C{capture}'s request (edited) to its tunnel's local service again;
    fires with the new capture once the request is sent.
    """
    tunnel = next((t for t in agent.tunnels if t.name == capture.tunnel), None)
    if tunnel is None:
        raise ReplayError(409, f"the agent has no tunnel {capture.tunnel!r} any more")
    data = buildReplay(capture, edits)
    traffic: Traffic = agent.traffic
    follower = Follower(traffic, tunnel.name, replayOf=capture.id)
    host, port = tunnel.target
    endpoint = HostnameEndpoint(agent.reactor, host, port, timeout=10)
    d = endpoint.connect(Factory.forProtocol(lambda: _Replaying(data, follower, agent.reactor)))

    def sent(protocol: _Replaying) -> Capture:
        assert follower.last is not None
        return follower.last

    def failed(f: Failure) -> Failure:
        raise ReplayError(502, f"cannot reach the local service at {host}:{port}: {f.getErrorMessage()}")

    return d.addCallbacks(sent, failed)


class _Page(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'",
        )
        request.setHeader(b"x-frame-options", b"DENY")
        return resources.files("txtunnel").joinpath("static/inspector.html").read_bytes()


class _Requests(Resource):
    """
    C{/api/requests} and C{/api/requests/ID[/replay]}.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, agent: Any) -> None:
        super().__init__()
        self.agent = agent

    def _capture(self, request: Any) -> Capture | None:
        try:
            id = int(request.postpath[0])
        except (IndexError, ValueError):
            return None
        found: Capture | None = self.agent.traffic.get(id)
        return found

    def render_GET(self, request: Any) -> bytes:
        path = [p for p in request.postpath if p]
        traffic: Traffic = self.agent.traffic
        if not path:
            return _json(request, 200, {"requests": [c.summary() for c in reversed(traffic.captures)]})
        capture = self._capture(request)
        if capture is None or len(path) != 1:
            return _json(request, 404, {"error": "no such request (it may have left the ring)"})
        return _json(request, 200, capture.detail())

    def render_POST(self, request: Any) -> Any:
        path = [p for p in request.postpath if p]
        if len(path) != 2 or path[1] != b"replay":
            return _json(request, 404, {"error": "POST /api/requests/ID/replay"})
        capture = self._capture(request)
        if capture is None:
            return _json(request, 404, {"error": "no such request (it may have left the ring)"})
        kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if kind != b"application/json":
            return _json(request, 415, {"error": "send the replay's edits as application/json ({} for none)"})
        raw = request.content.read(MAX_REPLAY_BODY + 1)
        if len(raw) > MAX_REPLAY_BODY:
            return _json(request, 413, {"error": f"the edits are larger than {MAX_REPLAY_BODY} bytes"})
        try:
            edits = json.loads(raw or b"{}")
        except ValueError as e:
            return _json(request, 400, {"error": f"not JSON: {e}"})
        if not isinstance(edits, dict):
            return _json(request, 400, {"error": "the edits must be a JSON object"})
        try:
            d = replay(self.agent, capture, edits)
        except ReplayError as e:
            return _json(request, e.status, {"error": str(e)})

        def done(new: Capture) -> None:
            if not request.finished and not request._disconnected:
                request.write(_json(request, 202, {"id": new.id, "replayOf": capture.id}))
                request.finish()

        def failed(f: Failure) -> None:
            status = f.value.status if isinstance(f.value, ReplayError) else 500
            if not request.finished and not request._disconnected:
                request.write(_json(request, status, {"error": f.getErrorMessage()}))
                request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET


@implementer(IPushProducer)
class _Watcher:
    """
    One event-stream client.  A client that cannot keep up is dropped (its
    EventSource reconnects and reloads the list) rather than buffered for.
    """

    def __init__(self, events: _Events, request: Any) -> None:
        self.events = events
        self.request = request
        self.gone = False

    def send(self, event: str, capture: Capture) -> None:
        if self.gone:
            return
        self.request.write(b"event: request\ndata: " + json.dumps(capture.summary()).encode() + b"\n\n")

    def pauseProducing(self) -> None:
        self.drop()

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.drop()

    def drop(self) -> None:
        if not self.gone:
            self.gone = True
            self.events.forget(self)
            transport = getattr(self.request.channel, "transport", None)
            if transport is not None:
                transport.loseConnection()


class _Events(Resource):
    isLeaf = True

    def __init__(self, agent: Any) -> None:
        super().__init__()
        self.agent = agent
        self.watchers: list[_Watcher] = []

    def render_GET(self, request: Any) -> Any:
        if len(self.watchers) >= MAX_WATCHERS:
            return _json(request, 503, {"error": f"at most {MAX_WATCHERS} live views at once"})
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        watcher = _Watcher(self, request)
        self.watchers.append(watcher)
        self.agent.traffic.listeners.append(watcher.send)
        request.registerProducer(watcher, True)
        request.write(b": txtunnel inspector\n\n")
        request.notifyFinish().addBoth(lambda _: watcher.drop())
        return NOT_DONE_YET

    def forget(self, watcher: _Watcher) -> None:
        if watcher in self.watchers:
            self.watchers.remove(watcher)
        listeners = self.agent.traffic.listeners
        if watcher.send in listeners:
            listeners.remove(watcher.send)


class _Tunnels(Resource):
    isLeaf = True

    def __init__(self, agent: Any) -> None:
        super().__init__()
        self.agent = agent

    def render_GET(self, request: Any) -> bytes:
        tunnels = [
            {"name": t.name, "type": t.type, "target": f"{t.target[0]}:{t.target[1]}", "address": t.address}
            for t in self.agent.tunnels
        ]
        return _json(request, 200, {"relay": self.agent.relayURL, "tunnels": tunnels})


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return _json(request, 404, {"error": "not found; the API is under /api/"})


class _Refused(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return _json(
            request, 403, {"error": "the inspector answers only to localhost names or the address it listens on"}
        )


class _Root(Resource):
    def __init__(self, agent: Any) -> None:
        super().__init__()
        self.page = _Page()
        api = Resource()
        api.putChild(b"requests", _Requests(agent))
        api.putChild(b"events", _Events(agent))
        api.putChild(b"tunnels", _Tunnels(agent))
        self.putChild(b"api", api)

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        if not _hostAllowed(request):
            return _Refused()
        if path == b"":
            return self.page
        if path in self.children:
            return self.children[path]  # type: ignore[no-any-return]
        return _NotFound()

    def render(self, request: Any) -> bytes:
        return self.page.render(request)  # type: ignore[no-any-return]


def _hostAllowed(request: Any) -> bool:
    host = (request.getHeader(b"host") or b"").decode("ascii", "replace").strip().lower()
    if host.startswith("["):
        name = host.split("]", 1)[0] + "]"
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name in LOOPBACK_NAMES:
        return True
    local = getattr(request.getHost(), "host", None)
    return bool(local) and name.strip("[]") == local


class InspectorSite(Site):
    """
    The inspector of one agent.
    """

    noisy = False

    def __init__(self, agent: Any) -> None:
        super().__init__(_Root(agent))
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        pass
