# -*- test-case-name: tests.test_tcp_tunnel,tests.test_faults -*-
"""
Join a link stream and a TCP connection into one pipe, with backpressure
both ways and half-close carried across.

This is Twisted's C{portforward} wiring with a stream in place of one of the
sockets: each side is registered as the other's producer, so when either
side's outgoing buffer fills, the other stops reading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, ITransport, IWriteDescriptor
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.link import Stream

__all__ = ["SocketSide", "StreamSide", "connectStream", "sendNow", "setNoDelay", "splice", "writeNow"]


@implementer(IHalfCloseableProtocol)
class StreamSide(Protocol):
    """
    The protocol on the stream: what arrives on it goes to the socket.
    """

    def __init__(self) -> None:
        self.peer: SocketSide | None = None
        self.onLost: Callable[[Failure], None] | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            sendNow(self.peer.transport, data)

    def readConnectionLost(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseWriteConnection()  # type: ignore[attr-defined]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.onLost is not None:
            self.onLost(reason)
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            if reason.check(ConnectionDone):
                peer.transport.loseConnection()
            else:
                peer.transport.abortConnection()  # type: ignore[attr-defined]


@implementer(IHalfCloseableProtocol)
class SocketSide(Protocol):
    """
    The protocol on the TCP connection: what arrives on it goes to the stream.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.lost = False

    def connectionMade(self) -> None:
        setNoDelay(self.transport)
        splice(self.stream, self)

    def dataReceived(self, data: bytes) -> None:
        self.stream.write(data)

    def readConnectionLost(self) -> None:
        self.stream.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = True
        stream = self.stream
        if stream.closed:
            return
        if reason.check(ConnectionDone):
            stream.loseConnection()
        else:
            stream.reset("reset", f"connection lost: {reason.getErrorMessage()}")


def splice(stream: Stream, side: SocketSide) -> None:
    """
    Wire C{stream} and C{side}'s connected transport together.
    """
    transport: ITransport = side.transport  # type: ignore[assignment]
    protocol = stream.protocol
    if not isinstance(protocol, StreamSide):
        protocol = StreamSide()
        stream.attach(protocol)
    protocol.peer = side
    stream.registerProducer(transport, True)
    transport.registerProducer(stream, True)  # type: ignore[attr-defined]
    stream.resumeProducing()


def setNoDelay(transport: Any) -> None:
    """
    Turn off Nagle on a TCP transport; tunnels carry interactive traffic.
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass


def writeNow(transport: Any) -> None:
    """
    Hand the bytes just written to C{transport} to the kernel now, not on
    the reactor's next turn.

    Twisted's TCP transports send nothing until the reactor next polls.  A
    relay that reads fifty visitors' requests in one turn would forward them
    all together at its end, and the agent, on the other core, would wait
    for that whole convoy, then the relay for the agent's: measured through
    an HTTP tunnel at c=50, relay and agent each 55% busy and 3,200 req/s.
    Sent as soon as a few KiB of link frames are ready, the agent starts on
    the first requests while the relay reads the rest: about 4,500 req/s
    with 90% of both cores busy (docs/performance.rst).

    The socket under any TLS layer is the one written, and a TLS layer
    that holds small writes back for the reactor's next turn (Twisted's
    C{BufferingTLSTransport}) is flushed first: over a C{wss://} link the
    held writes made the same convoy (relay 58% and agent 46% busy at
    6,900 req/s).  Only a connected socket that is not closing is touched,
    and what C{doWrite} returns is left to the reactor, which still watches
    the socket (a write registers it): an error seen here is seen, and
    handled, again on its next turn.
    """
    # A TLS layer provides what its transport provides (IWriteDescriptor
    # included): every layer is walked, and the deepest descriptor written.
    layer, transport = transport, None
    while layer is not None:
        aggregator = getattr(layer, "_aggregator", None)
        if aggregator is not None and callable(getattr(aggregator, "flush", None)):
            aggregator.flush()
        if IWriteDescriptor.providedBy(layer):
            transport = layer
        layer = getattr(layer, "transport", None)
    if transport is None or not getattr(transport, "connected", False) or getattr(transport, "disconnecting", True):
        return
    if not getattr(transport, "_tempDataLen", 1) and getattr(transport, "offset", 0) >= len(
        getattr(transport, "dataBuffer", b"")
    ):
        return  # nothing queued: sent already (L{sendNow})
    if transport in _writingNow:
        # A write made while this socket is being written (its producer,
        # resumed by doWrite, wrote more) waits for the reactor's turn:
        # no recursion, however much the producer has to send.
        return
    _writingNow.add(transport)
    try:
        transport.doWrite()
    finally:
        _writingNow.discard(transport)


#: Sockets inside L{writeNow}'s C{doWrite}.
_writingNow: set[Any] = set()

#: The transports L{sendNow} may send on itself: plain TCP connections.
_DIRECT = (tcp.Server, tcp.Client)


def sendNow(transport: Any, data: bytes) -> None:
    """
    C{transport.write(data)}, but sent to the kernel at once when nothing
    is queued ahead of it, as a blocking socket's write would be.

    Twisted queues every write and sends on the reactor's next turn, which
    costs a C{epoll_ctl} to watch for writability, a poll, a dispatch and a
    C{epoll_ctl} to stop watching: for an HTTP tunnel's one small response
    per request, about a tenth of the relay's and the agent's time
    (docs/performance.rst), and a turn's latency.  Here only a plain TCP
    connection that is open, not closing and has nothing buffered is sent
    on; what the kernel does not take, and any error, goes to
    C{transport.write} as usual (an error is then the reactor's to see).
    The check reads C{FileDescriptor}'s buffer attributes (C{dataBuffer},
    C{offset}, C{_tempDataLen}); a Twisted without them gets C{write}.
    Everything else -- TLS, other transports, test doubles -- is written
    the usual way.
    """
    if type(transport) in _DIRECT and data:
        try:
            idle = (
                not transport.TLS
                and transport.connected
                and not transport.disconnecting
                and not transport._writeDisconnecting
                and not transport._writeDisconnected
                and not transport._tempDataLen
                and transport.offset >= len(transport.dataBuffer)
            )
        except AttributeError:
            # A Twisted whose transports keep their buffers otherwise:
            # everything takes the usual path.
            idle = False
        if idle:
            try:
                sent = transport.socket.send(data)
            except OSError:
                sent = 0
            if sent >= len(data):
                return
            data = data[sent:]
    transport.write(data)


def connectStream(
    reactor: Any,
    target: tuple[str, int],
    stream: Stream,
    sideFactory: Callable[[Stream], SocketSide] = SocketSide,
    streamSide: StreamSide | None = None,
    timeout: float = 10.0,
) -> Deferred[SocketSide]:
    """
    Agent half shared by the forwarders: connect to the local service at
    C{target} and splice C{stream} to it.  The stream stays paused (its bytes
    wait, bounded by its window) until the connection is made; if the stream
    goes away first, the attempt is cancelled.

    @return: a L{Deferred} that fires with the socket side, or fails with
        the connection error (and the stream is left to the caller).
    """
    from twisted.internet.abstract import isIPAddress, isIPv6Address
    from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
    from twisted.internet.protocol import Factory

    stream.pauseProducing()
    side = streamSide if streamSide is not None else StreamSide()
    stream.attach(side)
    host, port = target
    endpoint: Any
    if isIPAddress(host):
        # An address needs no resolver (whose threads a name lookup would use).
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    elif isIPv6Address(host):
        endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    else:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    factory = Factory.forProtocol(lambda: sideFactory(stream))
    factory.noisy = False
    d: Deferred[SocketSide] = endpoint.connect(factory)  # type: ignore[assignment]

    def streamGone(reason: Failure) -> None:
        if not d.called:
            d.cancel()

    side.onLost = streamGone
    return d
