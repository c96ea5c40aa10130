# -*- test-case-name: tests.test_edge,tests.test_end_to_end -*-
"""
The relay's public HTTP/1.1 edge.

Each visitor connection is read as a sequence of requests
(L{txtunnel.http1.RequestFramer}).  A request for C{NAME.<domain>} goes to
that tunnel over one link stream per visitor connection, head rewritten only
to add C{X-Forwarded-*}, body bytes passed unchanged; responses come back as
raw bytes.  A request for C{/_txtunnel} on the relay's own host becomes an
agent's link.  When a keep-alive connection turns to another tunnel, the
current stream is half-closed and the next request waits until the local
server has answered and closed, so responses can never interleave.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.http1 import (
    BodyBytes,
    HTTPError,
    RawBytes,
    RequestEnd,
    RequestFramer,
    RequestHead,
    errorResponse,
)
from txtunnel.link import Stream, StreamReset
from txtunnel.splice import setNoDelay
from txtunnel.wslink import LINK_PATH

if TYPE_CHECKING:
    from txtunnel.relay.service import Relay

__all__ = ["EdgeFactory", "EdgeProtocol"]


class _Fail:
    """
    A queued error answer, sent once any earlier response has finished.
    """

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason


@implementer(IPushProducer)
class _VisitorReader:
    """
    The visitor's reading side as the stream's producer; pauses combine with
    the edge's own, so neither can resume what the other paused.
    """

    def __init__(self, edge: EdgeProtocol) -> None:
        self.edge = edge

    def pauseProducing(self) -> None:
        self.edge._pause("stream")

    def resumeProducing(self) -> None:
        self.edge._resume("stream")

    def stopProducing(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class _ToVisitor(Protocol):
    """
    The protocol on a tunnel stream: response bytes go to the visitor.
    """

    def __init__(self, edge: EdgeProtocol) -> None:
        self.edge = edge
        self.started = False

    def dataReceived(self, data: bytes) -> None:
        self.started = True
        transport = self.edge.transport
        if transport is not None:
            transport.write(data)

    def readConnectionLost(self) -> None:
        self.edge._streamEnded(self, None)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.edge._streamEnded(self, None if reason.check(ConnectionDone) else reason)


@implementer(IHalfCloseableProtocol)
class EdgeProtocol(Protocol):
    """
    One visitor connection on the public HTTP listener.
    """

    log = Logger()

    def __init__(self, relay: Relay, scheme: str) -> None:
        self.relay = relay
        self.scheme = scheme
        self._framer = RequestFramer()
        self._queue: deque[Any] = deque()
        self._stream: Stream | None = None
        self._responder: _ToVisitor | None = None
        self._tunnel: Any = None
        self._switching = False
        self._pauses: set[str] = set()
        self._delegate: Protocol | None = None
        self._failed = False
        self._lost = False
        self.clientIP = "?"

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.clientIP = getattr(peer, "host", "?")
        setNoDelay(self.transport)

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.dataReceived(data)
            return
        if self._failed:
            return
        try:
            self._queue.extend(self._framer.feed(data))
        except HTTPError as e:
            self._queue.append(_Fail(e.status, e.reason))
            self._failed = True
        self._pump()

    def _pump(self) -> None:
        queue = self._queue
        while queue and not self._switching and self._delegate is None and not self._lost:
            event = queue.popleft()
            if isinstance(event, (BodyBytes, RawBytes)):
                if self._stream is not None:
                    self._stream.write(event.data)
            elif isinstance(event, RequestHead):
                self._route(event)
            elif isinstance(event, _Fail):
                if self._stream is not None:
                    queue.appendleft(event)
                    self._switch()
                else:
                    self._answer(event.status, event.reason)
            elif isinstance(event, RequestEnd):
                pass
        if queue and self._switching:
            self._pause("switch")

    def _route(self, head: RequestHead) -> None:
        hostHeader = head.header(b"host")
        kind, name = self.relay.hosts.split(hostHeader)
        if kind == "bad":
            self._queue.appendleft(_Fail(400, "missing or invalid Host header"))
            return
        if kind == "apex":
            if head.path == LINK_PATH.encode():
                if not head.upgrade:
                    self._queue.appendleft(_Fail(426, "agents connect here with a WebSocket upgrade"))
                elif self._stream is not None:
                    self._queue.appendleft(head)
                    self._switch()
                else:
                    self._handoff(head)
                return
            self._queue.appendleft(
                _Fail(404, f"this is a txtunnel relay; tunnels are served at NAME.{self.relay.domain}")
            )
            return
        tunnel = self.relay.hosts.get(name)
        if tunnel is None:
            self._queue.appendleft(_Fail(404, f"no tunnel named {name!r} on this relay"))
            return
        if self._stream is not None and self._tunnel is not tunnel:
            self._queue.appendleft(head)
            self._switch()
            return
        if self._stream is None:
            if not self._open(tunnel):
                return
        assert self._stream is not None
        self._stream.write(head.withForwarded(self.clientIP, self.scheme, hostHeader or b""))

    def _open(self, tunnel: Any) -> bool:
        responder = _ToVisitor(self)
        try:
            stream = tunnel.openStream({"peer": self.clientIP, "scheme": self.scheme}, responder)
        except Exception as e:  # the link went away between routing and opening
            self._queue.appendleft(_Fail(502, f"the tunnel's agent is not connected ({e})"))
            return False
        self._stream = stream
        self._responder = responder
        self._tunnel = tunnel
        stream.registerProducer(_VisitorReader(self), True)
        self.transport.registerProducer(stream, True)  # type: ignore[union-attr]
        return True

    def _switch(self) -> None:
        """
        Let the current stream finish before the next request is handled.
        """
        self._switching = True
        self._pause("switch")
        if self._stream is not None:
            self._stream.loseWriteConnection()

    def _streamEnded(self, responder: _ToVisitor, reason: Failure | None) -> None:
        if responder is not self._responder:
            return
        stream = self._stream
        self._stream = None
        self._responder = None
        self._tunnel = None
        transport = self.transport
        if transport is not None:
            transport.unregisterProducer()  # type: ignore[attr-defined]
        self._resume("stream")
        if stream is not None and not stream.closed:
            stream.loseConnection()
        if reason is not None and not responder.started:
            error = reason.value
            if isinstance(error, StreamReset):
                status = 504 if error.code == "timeout" else 502
                self._answer(status, error.reason or error.code)
            else:
                self._answer(502, "the tunnel closed before answering")
            return
        if self._switching:
            self._switching = False
            self._resume("switch")
            self._pump()
            return
        if transport is not None:
            transport.loseConnection()

    def _handoff(self, head: RequestHead) -> None:
        """
        This connection is an agent's link: give it to the WebSocket protocol.
        """
        transport = self.transport
        protocol = self.relay.linkFactory.buildProtocol(transport.getPeer())  # type: ignore[union-attr]
        self._delegate = protocol
        protocol.makeConnection(transport)
        protocol.dataReceived(head.raw)
        while self._queue:
            event = self._queue.popleft()
            if isinstance(event, RawBytes):
                protocol.dataReceived(event.data)

    def _answer(self, status: int, reason: str) -> None:
        self._failed = True
        self._queue.clear()
        transport = self.transport
        if transport is not None:
            self.log.debug("answering {client} with {status}: {reason}", client=self.clientIP, status=status, reason=reason)
            transport.write(errorResponse(status, reason))
            transport.loseConnection()

    # -- flow control

    def _pause(self, why: str) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self._pauses.add(why)

    def _resume(self, why: str) -> None:
        if why not in self._pauses:
            return
        self._pauses.discard(why)
        if not self._pauses and self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- closing

    def readConnectionLost(self) -> None:
        if self._delegate is not None:
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif self._stream is not None and not self._queue:
            self._stream.loseWriteConnection()
        elif self._stream is None:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._lost = True
        if self._delegate is not None:
            self._delegate.connectionLost(reason)
            return
        self._queue.clear()
        stream, self._stream = self._stream, None
        self._responder = None
        if stream is not None and not stream.closed:
            stream.loseConnection()


class EdgeFactory(Factory):
    """
    Builds an L{EdgeProtocol} per visitor connection.
    """

    noisy = False

    def __init__(self, relay: Relay, scheme: str = "http") -> None:
        self.relay = relay
        self.scheme = scheme

    def buildProtocol(self, addr: Any) -> EdgeProtocol:
        protocol = EdgeProtocol(self.relay, self.scheme)
        protocol.factory = self
        return protocol
