"""
The visitor-gate seam: gates on a real relay answer, delay, pass and
rewrite requests from real clients, and fail closed.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.conftest import Relay, RunningAgent, curl, inThread, startAgent
from tests.test_http_tunnel import parseResponses, rawExchange
from txtunnel.errors import BindError
from txtunnel.gates import VisitorRequest
from txtunnel.http1 import Answer, RequestFramer, RequestHead


class Headers(Resource):
    """
    An origin that answers with every request header it got, one per line.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        lines = [b"path=" + request.uri]
        for name, values in request.requestHeaders.getAllRawHeaders():
            for value in values:
                lines.append(name.lower() + b"=" + value)
        return b"\n".join(lines) + b"\n"


@pytest.fixture
def headersOrigin() -> Any:
    port = reactor.listenTCP(0, Site(Headers()), interface="127.0.0.1")  # type: ignore[attr-defined]
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


class Deny:
    """
    Refuses paths under C{/private} at once, with a header.
    """

    def __init__(self) -> None:
        self.seen: list[VisitorRequest] = []

    def check(self, request: VisitorRequest) -> Answer | None:
        self.seen.append(request)
        if request.head.path.startswith(b"/private"):
            return Answer(403, "not for you", headers=[("X-Why", "private")])
        return None

    def validate(self, bindRequest: dict[str, Any]) -> None:
        if bindRequest.get("name") == "forbidden":
            raise BindError("the name 'forbidden' is refused by policy")


class Slow:
    """
    Takes a while, then adds a header the visitor tried to forge and drops
    one the origin must not see.
    """

    def check(self, request: VisitorRequest) -> defer.Deferred[Answer | None]:
        d: defer.Deferred[Answer | None] = defer.Deferred()
        request.addHeaders.append((b"X-Visitor", b"checked"))
        request.dropHeaders.add(b"authorization")
        reactor.callLater(0.05, d.callback, None)  # type: ignore[attr-defined]
        return d


class Broken:
    def check(self, request: VisitorRequest) -> None:
        if request.head.path == b"/boom":
            raise RuntimeError("gate bug")


@pytest_twisted.ensureDeferred
async def test_gates_answer_delay_and_rewrite(relay: Relay, agents: list[RunningAgent], headersOrigin: int) -> None:
    """
    A gate's answer replaces the tunnel's; a slow gate holds the request,
    then its header changes reach the origin, and a visitor cannot forge
    the header it adds.
    """
    deny = Deny()
    relay.relay.gates[:] = [deny, Slow(), Broken()]
    await startAgent(agents, relay, "--http", str(headersOrigin), "--subdomain", "gated")
    host = f"Host: gated.localhost:{relay.port}"
    base = f"http://127.0.0.1:{relay.port}"

    code, out, err = await curl("-si", "-H", host, f"{base}/private/x")
    assert code == 0, err
    assert out.startswith(b"HTTP/1.1 403 Forbidden"), out
    assert b"X-Why: private" in out and b"not for you" in out

    code, out, err = await curl(
        "-s", "-H", host, "-H", "X-Visitor: forged", "-H", "Authorization: Bearer secret", f"{base}/open"
    )
    assert code == 0, err
    assert b"path=/open" in out
    assert b"x-visitor=checked" in out and b"forged" not in out
    assert b"authorization" not in out and b"secret" not in out
    assert deny.seen[-1].name == "gated" and deny.seen[-1].clientIP == "127.0.0.1"
    assert deny.seen[-1].bindRequest.get("name") == "gated"

    code, out, err = await curl("-si", "-H", host, f"{base}/boom")
    assert code == 0, err
    assert out.startswith(b"HTTP/1.1 500"), out


@pytest_twisted.ensureDeferred
async def test_slow_gate_keeps_pipelined_order(relay: Relay, agents: list[RunningAgent], headersOrigin: int) -> None:
    """
    Pipelined requests behind a slow gate are answered in order, each
    checked, and a refused one ends the connection after those before it.
    """
    relay.relay.gates[:] = [Slow(), Deny()]
    await startAgent(agents, relay, "--http", str(headersOrigin), "--subdomain", "piped")
    head = f"GET /{{}} HTTP/1.1\r\nHost: piped.localhost:{relay.port}\r\n\r\n"
    payload = "".join(head.format(p) for p in ("a", "b", "private", "c")).encode()
    data = await inThread(rawExchange, relay.port, payload)
    responses = parseResponses(data, [b"GET"] * 4)
    assert [r[0] for r in responses] == [200, 200, 403], data
    assert b"path=/a" in responses[0][2] and b"path=/b" in responses[1][2]


@pytest_twisted.ensureDeferred
async def test_gate_refuses_bind(relay: Relay, agents: list[RunningAgent], headersOrigin: int) -> None:
    """
    A gate's C{validate} turns bad per-tunnel settings into a refused bind
    with its reason, and the name stays free.
    """
    relay.relay.gates[:] = [Deny()]
    agent = await startAgent(agents, relay, "--http", str(headersOrigin), "--subdomain", "forbidden", expectReady=False)
    with pytest.raises(RuntimeError, match="refused by policy"):
        await agent.agent.ready
    code, out, _ = await curl("-si", "-H", f"Host: forbidden.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/")
    assert out.startswith(b"HTTP/1.1 404"), out


def parse(raw: bytes) -> RequestHead:
    (head,) = [e for e in RequestFramer().feed(raw) if isinstance(e, RequestHead)]
    return head


def test_forwarded_head_adds_and_drops() -> None:
    """
    Added headers replace any the visitor sent under that name; dropped
    ones go; everything else is kept byte for byte.
    """
    head = parse(b"GET / HTTP/1.1\r\nHost: a\r\nX-User: evil\r\nCookie: c=1\r\nAccept: */*\r\n\r\n")
    out = head.withForwarded("10.0.0.1", "https", b"a", [(b"X-User", b"alice@example.com")], {b"cookie"})
    assert out == (
        b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: a\r\nX-User: alice@example.com\r\n\r\n"
    )
    with pytest.raises(ValueError):
        head.withForwarded("10.0.0.1", "http", b"a", [(b"X-Bad", b"x\r\nInjected: 1")])


def test_answer_bytes_and_header_injection() -> None:
    """
    An answer is a complete response that closes; a header holding a line
    break is refused rather than sent.
    """
    raw = Answer(401, "log in", headers=[("WWW-Authenticate", 'Basic realm="t"')]).toBytes()
    assert raw.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b'WWW-Authenticate: Basic realm="t"\r\n' in raw and b"Connection: close\r\n" in raw
    assert raw.endswith(b"\r\n\r\n401 Unauthorized: log in\n")
    with pytest.raises(ValueError):
        Answer(302, "go", headers=[("Location", "/x\r\nSet-Cookie: a=b")]).toBytes()
