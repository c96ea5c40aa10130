"""
TCP tunnels end to end: real relay and agent in process, real sockets.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from typing import Any

import pytest
import pytest_twisted

from tests.conftest import Relay, RunningAgent, closedPort, inThread, startAgent


def portOf(agent: RunningAgent) -> int:
    address = agent.address()
    assert address.startswith("tcp://127.0.0.1:")
    return int(address.rsplit(":", 1)[1])


def portIsFree(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def echoThrough(port: int, data: bytes) -> bytes:
    """
    Send C{data} while reading the echo, then half-close and read the rest.
    """
    received: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:

        def reader() -> None:
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    return
                received.append(chunk)

        t = threading.Thread(target=reader)
        t.start()
        view = memoryview(data)
        for i in range(0, len(data), 1 << 20):
            s.sendall(view[i : i + (1 << 20)])
        s.shutdown(socket.SHUT_WR)
        t.join(60)
    return b"".join(received)


@pytest_twisted.ensureDeferred
async def test_echo_with_half_close(relay: Relay, agents: list[RunningAgent], echoServer: int) -> None:
    """
    8 MiB echoed through a TCP tunnel arrive byte-exact, and the visitor's
    half-close reaches the local service, which closes in turn.
    """
    agent = await startAgent(agents, relay, "--tcp", str(echoServer))
    data = os.urandom(8 * 1024 * 1024)
    echoed = await inThread(echoThrough, portOf(agent), data)
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_echo_100_mib(relay: Relay, agents: list[RunningAgent], echoServer: int) -> None:
    """
    100 MiB echoed through a TCP tunnel keep their sha256.
    """
    agent = await startAgent(agents, relay, "--tcp", str(echoServer))
    data = os.urandom(100 * 1024 * 1024)
    echoed = await inThread(echoThrough, portOf(agent), data)
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest_twisted.ensureDeferred
async def test_requested_remote_port(relay: Relay, agents: list[RunningAgent], echoServer: int) -> None:
    """
    --remote-port inside the relay's range is granted as asked; outside it
    is refused with the range named.
    """
    port = next(p for p in range(relay.relay.ports.high, relay.relay.ports.low, -1) if portIsFree(p))
    agent = await startAgent(agents, relay, "--tcp", str(echoServer), "--remote-port", str(port))
    assert portOf(agent) == port
    assert await inThread(echoThrough, port, b"ping") == b"ping"
    other = await startAgent(agents, relay, "--tcp", str(echoServer), "--remote-port", "1", expectReady=False)
    with pytest.raises(RuntimeError, match="outside this relay's TCP range"):
        await other.agent.ready


@pytest_twisted.ensureDeferred
async def test_local_service_down_closes_visitor(relay: Relay, agents: list[RunningAgent]) -> None:
    """
    When the local service refuses, the visitor's connection is closed at
    once rather than left hanging.
    """
    agent = await startAgent(agents, relay, "--tcp", str(closedPort()))

    def attempt() -> tuple[bytes, float]:
        start = time.monotonic()
        # The relay may close (and reset) the connection before we have
        # sent, or even before connect() returns: that, too, is "closed at
        # once".
        try:
            with socket.create_connection(("127.0.0.1", portOf(agent)), timeout=10) as s:
                s.sendall(b"hello")
                data = s.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        return data, time.monotonic() - start

    data, elapsed = await inThread(attempt)
    assert data == b""
    assert elapsed < 5


@pytest_twisted.ensureDeferred
async def test_stalled_visitor_does_not_block_others(relay: Relay, agents: list[RunningAgent], echoServer: int) -> None:
    """
    A visitor that stops reading fills only its own stream's window: another
    connection on the same link keeps flowing, and the relay buffers no more
    than a bounded amount for the stalled one.
    """
    agent = await startAgent(agents, relay, "--tcp", str(echoServer))
    port = portOf(agent)
    stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:

        def flood() -> int:
            # Send until the pipe is full: the echo backs up through the tunnel.
            stalled.setblocking(False)
            sent = 0
            deadline = time.monotonic() + 5
            block = b"x" * 65536
            while time.monotonic() < deadline:
                try:
                    sent += stalled.send(block)
                except BlockingIOError:
                    time.sleep(0.05)
            return sent

        sent = await inThread(flood)
        assert sent < 64 * 1024 * 1024, "the tunnel did not push back on a stalled reader"
        data = os.urandom(2 * 1024 * 1024)
        echoed = await inThread(echoThrough, port, data)
        assert echoed == data
        buffered = sum(
            len(chunk)
            for session in relay.relay.sessions
            for stream in session.link.streams.values()
            for chunk in stream._out
        )
        assert buffered < 4 * 1024 * 1024
    finally:
        stalled.close()


@pytest_twisted.ensureDeferred
async def test_visitor_reset_reaches_local_service(relay: Relay, agents: list[RunningAgent]) -> None:
    """
    A visitor that aborts its connection (RST) makes the agent abort the
    local connection too, rather than leave it open.
    """
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.error import ConnectionDone
    from twisted.internet.protocol import Factory, Protocol

    lost: defer.Deferred[Any] = defer.Deferred()
    got: defer.Deferred[bytes] = defer.Deferred()

    class Recorder(Protocol):
        def dataReceived(self, data: bytes) -> None:
            if not got.called:
                got.callback(data)

        def connectionLost(self, reason: Any = None) -> None:
            lost.callback([reason])

    factory = Factory.forProtocol(Recorder)
    factory.noisy = False
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        agent = await startAgent(agents, relay, "--tcp", str(listening.getHost().port))
        s = socket.create_connection(("127.0.0.1", portOf(agent)), timeout=10)
        s.sendall(b"hi")
        assert await got == b"hi"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        [reason] = await lost
        assert not reason.check(ConnectionDone), "an abort arrived as a clean close"
    finally:
        await listening.stopListening()
