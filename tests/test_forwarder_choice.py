"""
The forwarders of an C{http} tunnel's requests, chosen per request through
the plugins (L{txtunnel.plugins.requestForwarder}): WebSocket upgrades go
to the C{websocket} forwarder, event streams to C{sse}, the rest to C{http};
and the C{websocket} and C{sse} forwarders asked for by name.

The local service is one C{twisted.web} site serving a WebSocket echo
(autobahn, on the service's side) and an event stream; the clients are
the C{websockets} library and raw sockets, so nothing on the visitor's
side shares code with the link.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site
from websockets.sync.client import connect
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.conftest import Relay, RunningAgent, inThread, startAgent
from tests.test_streaming import PAUSED, Paced, fetch, pausedScript, sseScript
from txtunnel.access import ACCESS_NAMESPACE
from txtunnel.http1 import RequestFramer, RequestHead
from txtunnel.interfaces import IForwarder
from txtunnel.plugins import forwarders, requestForwarder

BUILT_IN = {"http", "tcp", "udp", "tls", "grpc", "websocket", "sse"}


class Echo(WebSocketServerProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


@pytest.fixture
def webApp() -> Iterator[int]:
    """
    One local web app: C{/ws} a WebSocket echo, C{/events} an event stream,
    C{/paused} an idle event stream, C{/} a page.
    """
    factory = WebSocketServerFactory()
    factory.protocol = Echo
    root = Resource()
    root.putChild(b"ws", WebSocketResource(factory))
    root.putChild(b"events", Paced(sseScript))
    root.putChild(b"paused", Paced(pausedScript))
    site = Site(root)
    site.noisy = False
    port = pytest_twisted.blockon(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site))
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def accessEvents() -> Iterator[list[dict[str, Any]]]:
    """
    The relay's access events.
    """
    events: list[dict[str, Any]] = []

    def collect(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == ACCESS_NAMESPACE and event.get("access") == "relay":
            events.append(event)

    globalLogPublisher.addObserver(collect)
    yield events
    globalLogPublisher.removeObserver(collect)


def wsEcho(relayPort: int, name: str, text: str) -> str:
    sock = socket.create_connection(("127.0.0.1", relayPort), timeout=10)
    with sock, connect(f"ws://{name}.localhost:{relayPort}/ws", sock=sock, proxy=None, open_timeout=10) as ws:
        ws.send(text)
        return str(ws.recv(timeout=10))


def head(raw: bytes) -> RequestHead:
    events = RequestFramer().feed(raw)
    assert isinstance(events[0], RequestHead)
    return events[0]


async def waitFor(condition: Any, what: str, timeout: float = 10.0) -> None:
    from tests.conftest import wait

    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await wait(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_builtin_forwarders_are_all_plugins() -> None:
    """
    getPlugins finds the seven built-in forwarders, each providing
    IForwarder; those of web requests claim requests, grpc's take HTTP/2
    messages.
    """
    found = forwarders()
    assert BUILT_IN <= set(found)
    for name in BUILT_IN:
        assert verifyObject(IForwarder, found[name]), name
        assert found[name].name == name
    assert found["grpc"].wire == "h2"
    assert found["websocket"].wire == found["sse"].wire == "http/1.1"


@pytest.mark.parametrize(
    "raw, chosen",
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "http"),
        (
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            "websocket",
        ),
        (b"GET /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n", "http"),
        (b"GET /e HTTP/1.1\r\nHost: a\r\nAccept: text/event-stream\r\n\r\n", "sse"),
        (b"GET /e HTTP/1.1\r\nHost: a\r\nAccept: text/html, text/event-stream;q=0.5\r\n\r\n", "sse"),
        (b"GET /e HTTP/1.1\r\nHost: a\r\nAccept: text/event-stream;q=0\r\n\r\n", "http"),
        # gRPC needs HTTP/2: over HTTP/1.1 its content type stays with http.
        (b"POST /s/M HTTP/1.1\r\nHost: a\r\nContent-Type: application/grpc\r\nContent-Length: 0\r\n\r\n", "http"),
    ],
    ids=["plain", "websocket", "h2c-upgrade", "sse", "sse-among-others", "sse-refused", "grpc-over-h1"],
)
def test_request_choice(raw: bytes, chosen: str) -> None:
    """
    Each request to an http tunnel goes to the forwarder that claims it,
    or stays with http.
    """
    assert requestForwarder(forwarders(), "http", head(raw)).name == chosen


def test_grpc_claims_http2_calls_only() -> None:
    """
    A gRPC call that came over HTTP/2 is claimed by grpc.
    """
    h2 = RequestHead(b"POST", b"/s/M", "2", ((b"host", b"a"), (b"content-type", b"application/grpc+proto")), b"", False)
    assert requestForwarder(forwarders(), "http", h2).name == "grpc"


def test_tunnel_by_name_keeps_its_forwarder() -> None:
    """
    A tunnel asked for by name is never handed to another forwarder, even
    for a request another one would claim.
    """
    upgrade = head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    known = forwarders()
    assert requestForwarder(known, "sse", upgrade) is known["sse"]
    assert requestForwarder(known, "nosuch", upgrade) is None


@implementer(IForwarder)
class Claims:
    """
    A third party's forwarder that claims requests for C{/mine}, or one
    that fails while deciding.
    """

    description = "test"

    def __init__(self, name: str, broken: bool = False) -> None:
        self.name = name
        self.broken = broken

    def handlesRequest(self, head: RequestHead) -> bool:
        if self.broken:
            raise RuntimeError("broken plugin")
        return head.path == b"/mine"

    def bindRequest(self, tunnel: Any) -> dict[str, Any]:
        return {}

    def bind(self, relay: Any, tunnel: Any) -> Any:
        raise NotImplementedError

    def connect(self, tunnel: Any, stream: Any) -> None:
        raise NotImplementedError


def test_third_party_claims_and_broken_plugin_is_skipped() -> None:
    """
    A third-party forwarder with handlesRequest claims the requests it
    wants; one that raises is logged and passed over, so it cannot take a
    tunnel's traffic down.
    """
    errors: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(lambda e: errors.append(e) if e.get("log_failure") else None)
    known = {**forwarders(), "a-broken": Claims("a-broken", broken=True), "mine": Claims("mine")}
    assert requestForwarder(known, "http", head(b"GET /mine HTTP/1.1\r\nHost: a\r\n\r\n")).name == "mine"
    assert requestForwarder(known, "http", head(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")).name == "http"
    assert any("a-broken" in str(e.get("name")) for e in errors)


@pytest_twisted.ensureDeferred
async def test_one_http_tunnel_hands_requests_to_their_forwarders(
    relay: Relay, agents: list[RunningAgent], webApp: int, accessEvents: list[dict[str, Any]]
) -> None:
    """
    Through one --http tunnel, a WebSocket echo, an event stream (with the
    SSE heartbeat) and a plain request each reach the local app; the relay's
    access log names the forwarder that handled each.
    """
    await startAgent(agents, relay, "--http", str(webApp), "--subdomain", "app", "--sse-heartbeat", "0.15")
    assert await inThread(wsEcho, relay.port, "app", "hello through websocket") == "hello through websocket"
    host = f"app.localhost:{relay.port}"
    got = await inThread(fetch, relay.port, host, "/events?n=3&gap=0.05", (("Accept", "text/event-stream"),))
    assert got.status == 200 and len(re.findall(rb"event: tick", got.body)) == 3
    got = await inThread(fetch, relay.port, host, "/paused?pause=0.5", (("Accept", "text/event-stream"),))
    assert got.status == 200 and b":\n\n" in got.body, got.body
    got = await inThread(fetch, relay.port, host, "/nothing-here")
    assert got.status == 404

    def byPath() -> dict[str, str]:
        return {e["path"]: e["forwarder"] for e in accessEvents if e.get("tunnel") == "app"}

    await waitFor(lambda: len(byPath()) == 4, "four access events")
    assert byPath() == {"/ws": "websocket", "/events": "sse", "/paused": "sse", "/nothing-here": "http"}


@pytest_twisted.ensureDeferred
async def test_keepalive_connection_changes_forwarder(
    relay: Relay, agents: list[RunningAgent], webApp: int, accessEvents: list[dict[str, Any]]
) -> None:
    """
    On one keep-alive connection, a plain request then an event stream:
    each is answered, and each by its own forwarder (a new stream for the
    second).
    """
    await startAgent(agents, relay, "--http", str(webApp), "--subdomain", "keep")
    host = f"keep.localhost:{relay.port}"

    def twoRequests() -> bytes:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            s.sendall(f"GET /nothing HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            s.sendall(
                f"GET /events?n=2&gap=0.05 HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
            s.shutdown(socket.SHUT_WR)
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except TimeoutError:
                raise AssertionError(data) from None
            return data

    data = await inThread(twoRequests)
    assert data.count(b"HTTP/1.1 ") == 2 and data.count(b"event: tick") == 2, data
    await waitFor(lambda: len([e for e in accessEvents if e.get("tunnel") == "keep"]) == 2, "two access events")
    assert [e["forwarder"] for e in accessEvents if e.get("tunnel") == "keep"] == ["http", "sse"]


@pytest_twisted.ensureDeferred
async def test_websocket_tunnel_by_name(relay: Relay, agents: list[RunningAgent], webApp: int) -> None:
    """
    A --websocket tunnel carries WebSocket connections and answers any
    other request 400, before the local service sees it.
    """
    await startAgent(agents, relay, "--websocket", str(webApp), "--subdomain", "sock")
    assert await inThread(wsEcho, relay.port, "sock", "by name") == "by name"
    got = await inThread(fetch, relay.port, f"sock.localhost:{relay.port}", "/events?n=1")
    assert got.status == 400 and b"WebSocket upgrades only" in got.body


@pytest_twisted.ensureDeferred
async def test_sse_tunnel_by_name_in_config(
    relay: Relay, agents: list[RunningAgent], webApp: int, tmp_path: Any
) -> None:
    """
    A [tunnel:NAME] with type = sse (and its own sse-heartbeat) serves
    event streams with the heartbeat, whatever the request's Accept.
    """
    ini = tmp_path / "agent.ini"
    ini.write_text(f"[tunnel:feed]\ntype = sse\ntarget = {webApp}\nsubdomain = feed\nsse-heartbeat = 0.15\n")
    agent = await startAgent(agents, relay, "--config", str(ini))
    assert agent.address("feed") == f"http://feed.localhost:{relay.port}/"
    got = await inThread(fetch, relay.port, f"feed.localhost:{relay.port}", "/paused?pause=0.5")
    assert got.status == 200 and b":\n\n" in got.body
    assert got.body.replace(b":\n\n", b"") == b"".join(PAUSED)
