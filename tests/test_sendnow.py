"""
L{txtunnel.splice.sendNow}: a write to a plain TCP connection with nothing
queued goes to the kernel at once; anything else takes Twisted's usual path,
and bytes are never reordered or lost.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from txtunnel.splice import sendNow


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


async def connectedPair() -> tuple[Protocol, Collect, Any]:
    """
    A real loopback TCP connection: the server's protocol (whose transport
    is a C{tcp.Server}) and the client's collector.
    """
    made: defer.Deferred[Protocol] = defer.Deferred()

    class Server(Protocol):
        def connectionMade(self) -> None:
            made.callback(self)

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Server))
    client = Collect()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(lambda: client))
    server = await made
    return server, client, port


@pytest_twisted.ensureDeferred
async def test_small_write_sent_at_once() -> None:
    """
    Nothing is left for the reactor: no buffered bytes, and the socket is
    not watched for writability.
    """
    server, client, port = await connectedPair()
    try:
        transport: Any = server.transport
        sendNow(transport, b"hello")
        assert transport._tempDataLen == 0 and not transport.dataBuffer
        assert transport not in reactor.getWriters()
        while len(client.data) < 5:
            await deferLater(0.01)
        assert bytes(client.data) == b"hello"
    finally:
        server.transport.loseConnection()  # type: ignore[union-attr]
        await client.lost
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_large_and_queued_writes_keep_order() -> None:
    """
    What the kernel does not take is queued; later writes queue behind it
    instead of jumping ahead, and every byte arrives in order.
    """
    server, client, port = await connectedPair()
    try:
        transport: Any = server.transport
        first = os.urandom(32 << 20)  # more than any socket buffer takes at once
        sendNow(transport, first)
        assert transport._tempDataLen > 0 or transport.dataBuffer
        tail = [os.urandom(1000) for _ in range(50)]
        for chunk in tail:
            sendNow(transport, chunk)
        expected = first + b"".join(tail)
        transport.loseConnection()
        await client.lost
        assert hashlib.sha256(client.data).digest() == hashlib.sha256(expected).digest()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_closing_connection_takes_the_usual_path() -> None:
    """
    A connection that is closing is written the usual way: as with
    Twisted's C{write}, bytes written after C{loseConnection} still go out
    before the close, after those written before it.
    """
    server, client, port = await connectedPair()
    try:
        transport: Any = server.transport
        sendNow(transport, b"before")
        transport.loseConnection()
        sendNow(transport, b"after")
        await client.lost
        assert bytes(client.data) == b"beforeafter"
    finally:
        await port.stopListening()


def test_other_transports_written_as_usual() -> None:
    """
    Test doubles, TLS layers and any transport that is not a plain TCP
    connection get C{write}.
    """
    transport = StringTransport()
    sendNow(transport, b"abc")
    sendNow(transport, b"def")
    assert transport.value() == b"abcdef"


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds)


def test_transport_without_the_buffers_takes_the_usual_path(monkeypatch: Any) -> None:
    """
    Should a Twisted keep its write buffers under other names, nothing
    breaks: every write goes through C{write}.
    """
    from txtunnel import splice

    class Odd(StringTransport):
        TLS = False
        connected = True

    monkeypatch.setattr(splice, "_DIRECT", (Odd,))
    transport = Odd()
    sendNow(transport, b"abc")
    assert transport.value() == b"abc"
