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

from txtunnel.gates import VisitorRequest, runGates
from txtunnel.http1 import (
    Answer,
    BodyBytes,
    HTTPError,
    RawBytes,
    RequestEnd,
    RequestFramer,
    RequestHead,
)
from txtunnel.link import Stream, StreamReset
from txtunnel.responses import ResponseFramer
from txtunnel.splice import setNoDelay
from txtunnel.wslink import LINK_PATH

if TYPE_CHECKING:
    from txtunnel.relay.service import Relay

__all__ = ["EdgeFactory", "EdgeProtocol"]


class _Fail:
    """
    A queued answer of the relay's own, sent once any earlier response has
    finished.
    """

    def __init__(self, status: int, reason: str, answer: Answer | None = None) -> None:
        self.answer = answer if answer is not None else Answer(status, reason)


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
    The protocol on a tunnel stream: response bytes go to the visitor, and
    the response framer tells the edge when each response is complete.
    """

    def __init__(self, edge: EdgeProtocol) -> None:
        self.edge = edge
        self.framer = ResponseFramer()
        self.detached = False
        #: The stream ended a response that only its end delimits.
        self.closeDelimited = False

    def dataReceived(self, data: bytes) -> None:
        if self.detached:
            return
        transport = self.edge.transport
        if transport is not None:
            transport.write(data)
        for status in self.framer.feed(data):
            self.edge._responseDone(self, status)

    def _eof(self) -> None:
        self.closeDelimited = self.framer.opaque or self.framer.raw
        self.framer.eof()

    def readConnectionLost(self) -> None:
        if not self.detached:
            self._eof()
            self.edge._streamEnded(self, None)

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if not self.detached:
            self._eof()
            self.edge._streamEnded(self, None if reason.check(ConnectionDone) else reason)


@implementer(IHalfCloseableProtocol)
class EdgeProtocol(Protocol):
    """
    One visitor connection on the public HTTP listener.

    Requests are routed one by one.  While a stream has responses
    outstanding, a request that must go elsewhere (another tunnel, the link
    endpoint, an error answer) waits, with the visitor paused, until they
    are complete; then the old stream is closed and the next one opened.
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
        self._waiting = False
        self._pauses: set[str] = set()
        self._delegate: Protocol | None = None
        self._failed = False
        self._lost = False
        self._visitorDone = False
        self._raw = False
        #: The head being checked by the relay's gates, and the verdict on
        #: the last head they let through (with its tunnel).
        self._gating: RequestHead | None = None
        self._passed: tuple[RequestHead, Any, VisitorRequest] | None = None
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

    @property
    def _busy(self) -> bool:
        """
        Whether the current stream still owes the visitor responses.
        """
        responder = self._responder
        return responder is not None and responder.framer.outstanding > 0

    def _wait(self) -> None:
        """
        Hold the next request until the current stream's responses are done.
        """
        self._waiting = True
        self._pause("wait")
        responder = self._responder
        if responder is not None and responder.framer.opaque and self._stream is not None:
            # Response boundaries are unknown: ask the server to finish and close.
            self._stream.loseWriteConnection()

    def _pump(self) -> None:
        queue = self._queue
        while queue and not self._waiting and self._gating is None and self._delegate is None and not self._lost:
            event = queue[0]
            if isinstance(event, (BodyBytes, RawBytes)):
                queue.popleft()
                if isinstance(event, RawBytes):
                    self._raw = True
                if self._stream is not None:
                    self._stream.write(event.data)
            elif isinstance(event, RequestEnd):
                queue.popleft()
            elif isinstance(event, RequestHead):
                kind, target = self._decide(event)
                if kind == "wait":
                    self._wait()
                    return
                if kind == "fail":
                    queue[0] = target
                    continue
                if kind == "tunnel":
                    verdict = self._admit(event, target)
                    if verdict == "wait":
                        return
                    if verdict == "again":
                        continue
                if kind == "apex":
                    # The relay's own pages (login): a gate answers, or nobody does.
                    verdict = self._admit(event, None, self.relay.apexGates)
                    if verdict == "wait":
                        return
                    if verdict == "pass":
                        queue[0] = self._notHere()
                    continue
                queue.popleft()
                if kind == "link":
                    self._closeStream()
                    self._handoff(event)
                else:
                    self._forward(event, target)
            elif isinstance(event, _Fail):
                if self._busy:
                    self._wait()
                    return
                queue.popleft()
                self._send(event.answer)

    def _decide(self, head: RequestHead) -> tuple[str, Any]:
        """
        Where C{head} goes: C{("tunnel", tunnel)}, C{("link", None)},
        C{("fail", _Fail)}, or C{("wait", None)} when it must wait for the
        current stream's responses first.
        """
        kind, name = self.relay.hosts.split(head.header(b"host"))
        if kind == "bad":
            return ("fail", _Fail(400, "missing or invalid Host header"))
        if kind == "apex":
            if head.path != LINK_PATH.encode():
                if self.relay.apexGates:
                    return ("wait", None) if self._busy else ("apex", None)
                return ("fail", self._notHere())
            if not head.upgrade:
                return ("fail", _Fail(426, "agents connect here with a WebSocket upgrade"))
            return ("wait", None) if self._busy else ("link", None)
        tunnel = self.relay.hosts.get(name or "")
        if tunnel is None:
            return ("fail", _Fail(404, f"no tunnel named {name!r} on this relay"))
        if self._stream is not None and self._tunnel is not tunnel and self._busy:
            return ("wait", None)
        return ("tunnel", tunnel)

    def _notHere(self) -> _Fail:
        return _Fail(404, f"this is a txtunnel relay; tunnels are served at NAME.{self.relay.domain}")

    def _admit(self, head: RequestHead, tunnel: Any, gates: Any = None) -> str:
        """
        Ask the relay's gates about C{head} for C{tunnel}: C{"pass"}, or
        C{"again"} when a gate answered at once (the queue now holds its
        answer), or C{"wait"} when a gate takes time -- the connection waits,
        paused, and the verdict resumes the pump.  Requests for the relay's
        own host go to C{gates} (C{Relay.apexGates}) with no tunnel.
        """
        if gates is None:
            gates = self.relay.gates
        passed = self._passed
        if not gates or (passed is not None and passed[0] is head and passed[1] is tunnel):
            return "pass"
        host = head.header(b"host") or b""
        request = VisitorRequest(
            head=head,
            clientIP=self.clientIP,
            scheme=self.scheme,
            host=host,
            name=self.relay.hosts.split(host)[1] or "",
            tunnel=tunnel,
        )
        self._gating = head
        verdicts: list[Answer | None] = []
        runGates(gates, request).addCallback(self._verdict, verdicts, head, tunnel, request)
        if self._gating is not head:
            return "pass" if verdicts == [None] else "again"
        self._pause("gate")
        return "wait"

    def _verdict(
        self,
        answer: Answer | None,
        verdicts: list[Answer | None],
        head: RequestHead,
        tunnel: Any,
        request: VisitorRequest,
    ) -> None:
        if self._gating is not head:
            return
        self._gating = None
        verdicts.append(answer)
        if answer is None:
            self._passed = (head, tunnel, request)
        elif self._queue and self._queue[0] is head:
            self._queue[0] = _Fail(answer.status, answer.reason, answer)
        if "gate" in self._pauses and not self._lost:
            self._resume("gate")
            self._pump()

    def _forward(self, head: RequestHead, tunnel: Any) -> None:
        if self._stream is not None and self._tunnel is not tunnel:
            self._closeStream()
        if self._stream is None and not self._open(tunnel):
            return
        assert self._stream is not None and self._responder is not None
        if head.upgrade:
            # The visitor's bytes after this request are never parsed again,
            # whether or not the server agrees to switch: when the stream
            # ends, so does the connection.
            self._raw = True
        self._responder.framer.expect(head.method)
        host = head.header(b"host") or b""
        passed = self._passed
        if passed is not None and passed[0] is head:
            request = passed[2]
            self._stream.write(
                head.withForwarded(self.clientIP, self.scheme, host, request.addHeaders, request.dropHeaders)
            )
        else:
            self._stream.write(head.withForwarded(self.clientIP, self.scheme, host))

    def _open(self, tunnel: Any) -> bool:
        responder = _ToVisitor(self)
        try:
            stream = tunnel.openStream({"peer": self.clientIP, "scheme": self.scheme}, responder)
        except Exception as e:  # the link went away between routing and opening
            self._answer(502, f"the tunnel's agent is not connected ({e})")
            return False
        self._stream = stream
        self._responder = responder
        self._tunnel = tunnel
        stream.registerProducer(_VisitorReader(self), True)
        self.transport.registerProducer(stream, True)  # type: ignore[union-attr]
        return True

    def _closeStream(self) -> None:
        """
        Let go of the current stream: it owes nothing more, so close it.
        """
        stream, responder = self._stream, self._responder
        self._stream = self._responder = self._tunnel = None
        if responder is not None:
            responder.detached = True
        if stream is not None:
            if self.transport is not None:
                self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self._resume("stream")
            if not stream.closed:
                stream.loseConnection()

    # -- events from the stream

    def _responseDone(self, responder: _ToVisitor, status: int) -> None:
        if responder is not self._responder or responder.framer.outstanding:
            return
        if self._waiting:
            self._waiting = False
            self._resume("wait")
            self._pump()
        elif self._visitorDone and not self._queue:
            self._closeStream()
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _streamEnded(self, responder: _ToVisitor, reason: Failure | None) -> None:
        if responder is not self._responder:
            return
        framer = responder.framer
        owed, started = framer.outstanding, framer.started
        delimitedByClose = responder.closeDelimited or framer.opaque or framer.raw
        self._closeStream()
        if owed and not started:
            error = reason.value if reason is not None else None
            if isinstance(error, StreamReset):
                self._answer(504 if error.code == "timeout" else 502, error.reason or error.code)
            else:
                self._answer(502, "the local service closed the connection without answering")
            return
        if owed or delimitedByClose or self._raw or (self._visitorDone and not self._queue):
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self._waiting:
            self._waiting = False
            self._resume("wait")
        self._pump()

    def _handoff(self, head: RequestHead) -> None:
        """
        This connection is an agent's link: give it to the WebSocket protocol.
        """
        transport: Any = self.transport
        protocol: Any = self.relay.linkFactory.buildProtocol(transport.getPeer())
        self._delegate = protocol
        protocol.makeConnection(transport)
        protocol.dataReceived(head.raw)
        while self._queue:
            event = self._queue.popleft()
            if isinstance(event, RawBytes):
                protocol.dataReceived(event.data)

    def _answer(self, status: int, reason: str) -> None:
        self._send(Answer(status, reason))

    def _send(self, answer: Answer) -> None:
        self._failed = True
        self._queue.clear()
        self._closeStream()
        transport = self.transport
        if transport is not None and not self._lost:
            self.log.debug(
                "answering {client} with {status}: {reason}",
                client=self.clientIP,
                status=answer.status,
                reason=answer.reason,
            )
            transport.write(answer.toBytes())
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
        if not self._pauses and self.transport is not None and not self._lost:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- closing

    def readConnectionLost(self) -> None:
        self._visitorDone = True
        if self._delegate is not None:
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif self._raw:
            if self._stream is not None:
                self._stream.loseWriteConnection()
            else:
                self.transport.loseConnection()  # type: ignore[union-attr]
        elif self._queue or self._busy:
            pass  # answered when the outstanding responses are complete
        elif not self._framer.idle and not self._failed:
            self._answer(400, "connection closed in the middle of a request")
        else:
            self._closeStream()
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._lost = True
        if self._delegate is not None:
            self._delegate.connectionLost(reason)
            return
        self._queue.clear()
        self._closeStream()


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
