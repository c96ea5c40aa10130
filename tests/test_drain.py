"""
Graceful shutdown: the relay and the agent stop taking new work, let what
is in flight finish (up to --drain-timeout) and only then close.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.conftest import Relay, RunningAgent, curl, originSite, startAgent, startRelay
from txtunnel.agent.states import LinkState
from txtunnel.drain import drain

CHUNK = b"x" * 8192


class Slow(Resource):
    """
    C{/slow?n=CHUNKS&every=SECONDS}: a body written a chunk at a time.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        n = int(request.args.get(b"n", [b"10"])[0])
        every = float(request.args.get(b"every", [b"0.1"])[0])
        request.setHeader(b"content-length", str(n * len(CHUNK)).encode())
        sent = [0]

        def tick() -> None:
            if request._disconnected:
                return
            request.write(CHUNK)
            sent[0] += 1
            if sent[0] >= n:
                request.finish()
            else:
                reactor.callLater(every, tick)

        reactor.callLater(every, tick)
        return NOT_DONE_YET


@pytest.fixture
def slowOrigin() -> Iterator[int]:
    site = originSite()
    site.resource.putChild(b"slow", Slow())
    port = pytest_twisted.blockon(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site))
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


async def _stop(relay: Relay) -> None:
    await defer.maybeDeferred(relay.service.stopService)


def _host(agent: RunningAgent) -> str:
    return agent.address().split("//", 1)[1].rstrip("/")


async def _slowGet(relay: Relay, agent: RunningAgent, n: int, every: float) -> tuple[int, bytes, bytes]:
    return await curl("-H", f"Host: {_host(agent)}", f"http://127.0.0.1:{relay.port}/slow?n={n}&every={every}")


class KeepAlive(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_relay_drain_lets_a_response_finish(tmp_path: Any, agents: list[RunningAgent], slowOrigin: int) -> None:
    """
    A response in flight when the relay is told to stop arrives whole; the
    relay stops once it has, well before the drain timeout; new visitors
    cannot connect meanwhile.
    """
    relay = await startRelay(str(tmp_path / "state"), "--drain-timeout", "20")
    agent = await startAgent(agents, relay, "--http", str(slowOrigin))
    fetch = defer.ensureDeferred(_slowGet(relay, agent, 15, 0.1))
    await task.deferLater(reactor, 0.4, lambda: None)
    started = time.monotonic()
    stopped = defer.ensureDeferred(_stop(relay))
    await task.deferLater(reactor, 0.2, lambda: None)
    assert not stopped.called
    code, _, _ = await curl("-H", f"Host: {_host(agent)}", f"http://127.0.0.1:{relay.port}/")
    assert code == 7  # connection refused: the listener is closed
    code, out, err = await fetch
    assert code == 0, err
    assert out == CHUNK * 15
    await stopped
    assert time.monotonic() - started < 5


@pytest_twisted.ensureDeferred
async def test_relay_drain_refuses_new_requests_on_open_connections(
    tmp_path: Any, agents: list[RunningAgent], slowOrigin: int
) -> None:
    """
    A request that arrives on an already-open connection during the drain
    gets 503 with Retry-After, and idle keep-alive connections are closed at
    once so that they do not hold the drain up.
    """
    relay = await startRelay(str(tmp_path / "state"), "--drain-timeout", "20")
    agent = await startAgent(agents, relay, "--http", str(slowOrigin))
    idle = KeepAlive()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port)
    await endpoint.connect(_factory(idle))
    idle.transport.write(f"GET / HTTP/1.1\r\nHost: {_host(agent)}\r\n\r\n".encode())  # type: ignore[union-attr]
    for _ in range(100):
        if b"hello from origin" in idle.received:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    assert b"hello from origin" in idle.received
    started = time.monotonic()
    await defer.maybeDeferred(relay.service.stopService)
    await idle.closed
    assert time.monotonic() - started < 2


def _factory(protocol: Protocol) -> Any:
    from twisted.internet.protocol import Factory

    class F(Factory):
        def buildProtocol(self, addr: Any) -> Protocol:
            return protocol

    return F()


@pytest_twisted.ensureDeferred
async def test_relay_drain_timeout_cuts_what_is_left(tmp_path: Any, agents: list[RunningAgent], origin: int) -> None:
    """
    A request that would never finish is cut when the drain timeout ends
    (the visitor gets a 502), and the relay stops then, not later.
    """
    relay = await startRelay(str(tmp_path / "state"), "--drain-timeout", "0.5")
    agent = await startAgent(agents, relay, "--http", str(origin))
    fetch = defer.ensureDeferred(curl("-i", "-H", f"Host: {_host(agent)}", f"http://127.0.0.1:{relay.port}/never"))
    await task.deferLater(reactor, 0.3, lambda: None)
    started = time.monotonic()
    await defer.maybeDeferred(relay.service.stopService)
    assert 0.4 < time.monotonic() - started < 2
    code, out, _ = await fetch
    assert out.startswith(b"HTTP/1.1 502"), out


@pytest_twisted.ensureDeferred
async def test_agent_drain_finishes_in_flight_and_refuses_new(
    relay: Relay, agents: list[RunningAgent], slowOrigin: int
) -> None:
    """
    An agent told to stop says goodbye at once (new visitors get 404) but
    the response in flight still arrives whole; its link state is draining
    meanwhile and closed only after.
    """
    agent = await startAgent(agents, relay, "--http", str(slowOrigin), "--drain-timeout", "20")
    fetch = defer.ensureDeferred(_slowGet(relay, agent, 15, 0.1))
    await task.deferLater(reactor, 0.4, lambda: None)
    host = _host(agent)
    stopped = defer.ensureDeferred(agent.stop())
    await task.deferLater(reactor, 0.2, lambda: None)
    assert not stopped.called
    code, out, _ = await curl("-i", "-H", f"Host: {host}", f"http://127.0.0.1:{relay.port}/")
    assert out.startswith(b"HTTP/1.1 404"), out
    assert agent.agent.state is LinkState.DRAINING
    assert agent.agent.stats()["state"] == "draining"
    code, out, err = await fetch
    assert code == 0, err
    assert hashlib.sha256(out).digest() == hashlib.sha256(CHUNK * 15).digest()
    await stopped
    assert agent.agent.state is LinkState.CLOSED


@pytest_twisted.ensureDeferred
async def test_agent_drain_with_idle_visitor_connection_is_quick(
    relay: Relay, agents: list[RunningAgent], origin: int
) -> None:
    """
    A visitor's idle keep-alive connection to the tunnel does not hold the
    agent's drain up: the relay lets its stream go when the agent says bye.
    """
    agent = await startAgent(agents, relay, "--http", str(origin), "--drain-timeout", "20")
    idle = KeepAlive()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port).connect(_factory(idle))
    idle.transport.write(f"GET / HTTP/1.1\r\nHost: {_host(agent)}\r\n\r\n".encode())  # type: ignore[union-attr]
    for _ in range(100):
        if b"hello from origin" in idle.received:
            break
        await task.deferLater(reactor, 0.02, lambda: None)
    started = time.monotonic()
    await agent.stop()
    assert time.monotonic() - started < 2
    await idle.closed


def test_drain_with_a_clock() -> None:
    """
    L{drain} fires with 0 as soon as the count is 0, or with what is left
    when the timeout ends.
    """
    clock = task.Clock()
    left = [3]
    results: list[int] = []
    drain(clock, lambda: left[0], 10.0).addCallback(results.append)
    clock.advance(1)
    left[0] = 0
    clock.advance(0.05)
    assert results == [0]
    left[0] = 2
    drain(clock, lambda: left[0], 1.0).addCallback(results.append)
    for _ in range(30):
        clock.advance(0.05)
    assert results == [0, 2]
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_relay_drain_lets_an_http2_response_finish(
    tmp_path: Any, agents: list[RunningAgent], slowOrigin: int
) -> None:
    """
    An HTTP/2 visitor's response in flight at shutdown arrives whole (the
    connection gets GOAWAY, then closes when its streams are done).
    """
    relay = await startRelay(str(tmp_path / "state"), "--drain-timeout", "20")
    agent = await startAgent(agents, relay, "--http", str(slowOrigin))
    fetch = defer.ensureDeferred(
        curl(
            "--http2-prior-knowledge",
            "-H",
            f"Host: {_host(agent)}",
            f"http://127.0.0.1:{relay.port}/slow?n=10&every=0.1",
        )
    )
    await task.deferLater(reactor, 0.4, lambda: None)
    started = time.monotonic()
    await defer.maybeDeferred(relay.service.stopService)
    code, out, err = await fetch
    assert code == 0, err
    assert out == CHUNK * 10
    assert time.monotonic() - started < 5


async def _until(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await task.deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_agent_drain_timeout_cuts_a_slow_stream(
    relay: Relay, agents: list[RunningAgent], slowOrigin: int
) -> None:
    """
    A response that would take ~10 s is still in flight when the agent's
    0.5 s drain timeout ends: the agent closes the link then (not when the
    body is done), and the visitor's download is cut, not passed off as
    complete.
    """
    agent = await startAgent(agents, relay, "--http", str(slowOrigin), "--drain-timeout", "0.5")
    fetch = defer.ensureDeferred(_slowGet(relay, agent, 100, 0.1))
    session = agent.agent.session
    assert session is not None
    await _until(lambda: session.link.finiteStreams() >= 1)
    started = time.monotonic()
    await agent.stop()
    took = time.monotonic() - started
    assert 0.45 <= took < 5, took
    code, out, err = await fetch
    assert code != 0, err  # curl knows the body is short
    assert len(out) < 100 * len(CHUNK)
    assert session.link.closed


class _Visitor(Protocol):
    """
    A TCP visitor that records what comes back and when its connection ends.
    """

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[float] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(time.monotonic())


async def _tcpVisitor(agent: RunningAgent) -> _Visitor:
    visitor = _Visitor()
    port = int(agent.address().rsplit(":", 1)[1])
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(_factory(visitor))
    visitor.transport.write(b"ping")  # type: ignore[attr-defined]
    await _until(lambda: visitor.received == b"ping")
    return visitor


@pytest_twisted.ensureDeferred
async def test_agent_drain_is_held_by_a_tcp_connection_until_the_timeout(
    relay: Relay, agents: list[RunningAgent], echoServer: int
) -> None:
    """
    A TCP tunnel's connection has no end of its own: an open one (an SSH
    session, say) holds the agent's shutdown for the whole drain timeout,
    keeps working meanwhile, and is closed when the timeout ends.
    """
    agent = await startAgent(agents, relay, "--tcp", str(echoServer), "--drain-timeout", "1")
    visitor = await _tcpVisitor(agent)
    await _heldForTheTimeout(visitor, agent.stop)


async def _heldForTheTimeout(visitor: Any, stop: Any) -> None:
    """
    Stop with C{stop()} while C{visitor}'s TCP connection is open: it keeps
    working, the stop takes the 1 s drain timeout, and the connection is
    closed when it ends.
    """
    started = time.monotonic()
    stopped = defer.ensureDeferred(stop())
    visitor.transport.write(b"still here")
    await _until(lambda: visitor.received == b"pingstill here")
    await stopped
    took = time.monotonic() - started
    assert 0.95 <= took < 10, took
    closedAt = await visitor.closed
    assert closedAt - started >= 0.95


@pytest_twisted.ensureDeferred
async def test_relay_drain_is_held_by_a_tcp_connection_until_the_timeout(
    tmp_path: Any, agents: list[RunningAgent], echoServer: int
) -> None:
    """
    The same on the relay: its shutdown waits the drain timeout for an open
    TCP tunnel connection, then cuts it.
    """
    relay = await startRelay(str(tmp_path / "state"), "--drain-timeout", "1")
    agent = await startAgent(agents, relay, "--tcp", str(echoServer))
    visitor = await _tcpVisitor(agent)
    await _heldForTheTimeout(visitor, lambda: _stop(relay))


@pytest_twisted.ensureDeferred
async def test_link_lost_while_draining_is_not_dialled_again(
    relay: Relay, agents: list[RunningAgent], slowOrigin: int
) -> None:
    """
    A link that drops while the agent drains ends the drain at once (its
    streams are gone, nothing is left to wait for) and the agent does not
    dial the relay again: it was leaving.
    """
    agent = await startAgent(
        agents, relay, "--http", str(slowOrigin), "--drain-timeout", "20", "--reconnect-initial", "0.1"
    )
    fetch = defer.ensureDeferred(_slowGet(relay, agent, 100, 0.1))
    session = agent.agent.session
    assert session is not None
    await _until(lambda: session.link.finiteStreams() >= 1)
    # Every event fed to the state machine is logged, also those it ignores.
    events: list[str] = []

    def observe(event: Any) -> None:
        if "agent_event" in event and event.get("log_namespace", "").startswith("txtunnel.agent.states"):
            events.append(event["agent_event"])

    globalLogPublisher.addObserver(observe)
    try:
        stopped = defer.ensureDeferred(agent.stop())
        await _until(lambda: agent.agent.state is LinkState.DRAINING)
        session.carrier.transport.abortConnection()
        dropped = time.monotonic()
        await stopped
        assert time.monotonic() - dropped < 5  # not the 20 s drain timeout
        await task.deferLater(reactor, 0.5, lambda: None)  # a redial would have happened by now
    finally:
        globalLogPublisher.removeObserver(observe)
    assert "attempt" not in events, events
    assert events[-1] == "close"
    assert agent.agent.session is None
    code, out, _ = await fetch
    assert out != CHUNK * 100  # cut (or a 502 if no byte had come yet), never passed off as whole


@pytest_twisted.ensureDeferred
async def test_relay_stop_waits_until_a_slow_visitor_has_the_last_bytes(
    tmp_path: Any, agents: list[RunningAgent], origin: int
) -> None:
    """
    A response whose stream has ended on the link may still sit in the
    relay's write buffer for a slow visitor.  The relay's stop completes only
    once every visitor connection has been written out and closed (a twistd
    relay exits right after, and whatever was left unwritten would be cut
    off the end of the body).
    """
    relay = await startRelay(str(tmp_path / "state"), "--drain-timeout", "30")
    agent = await startAgent(agents, relay, "--http", str(origin))
    size = 16 * 1024 * 1024
    visitor = _Visitor()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port).connect(_factory(visitor))
    transport: Any = visitor.transport
    transport.write(f"GET /big?n={size} HTTP/1.1\r\nHost: {_host(agent)}\r\n\r\n".encode())
    transport.pauseProducing()  # a visitor that reads nothing for now
    await _until(lambda: relay.relay.openStreams() >= 1)
    await task.deferLater(reactor, 0.3, lambda: None)  # buffers fill up; the agent is held back
    assert relay.relay.openStreams() >= 1
    stopped = defer.ensureDeferred(_stop(relay))
    reading = [True]

    def throttle() -> None:
        # Read in short bursts: slow enough that the last bytes wait at the relay.
        if not reading[0] or visitor.closed.called:
            return
        transport.resumeProducing()
        reactor.callLater(0.002, transport.pauseProducing)
        reactor.callLater(0.01, throttle)

    throttle()
    mine = transport.getHost().port
    try:
        await stopped
        # Closed on the relay's side: every byte has left the process.
        left = [e for e in relay.relay.edges if e.transport is not None and e.transport.getPeer().port == mine]
        assert not left, "the relay's stop completed with a visitor's connection still being written"
    finally:
        reading[0] = False
        transport.resumeProducing()
    await visitor.closed
    head, _, body = visitor.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert len(body) == size
