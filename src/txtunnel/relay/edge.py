# -*- test-case-name: tests.test_http_tunnel,tests.test_hostile,tests.test_forwarder_choice -*-
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

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.access import Exchange, logAccess
from txtunnel.errors import StreamRefused
from txtunnel.gates import VisitorRequest, checkGates
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
from txtunnel.plugins import requestForwarder
from txtunnel.relay.handshake import plainLinkRefusal
from txtunnel.responses import ResponseFramer
from txtunnel.splice import sendNow, setNoDelay
from txtunnel.wslink import LINK_PATH

if TYPE_CHECKING:
    from txtunnel.relay.service import Relay

__all__ = ["EdgeFactory", "EdgeProtocol", "RETRY_AFTER"]

#: Seconds a visitor is asked to wait (C{Retry-After}) while a tunnel's
#: agent is reconnecting or the relay is shutting down.
RETRY_AFTER = 5

#: Seconds a visitor may take to send a whole request head, once it has
#: begun one (C{--header-timeout}): a slowloris client trickling a head is
#: answered 408 and closed.
DEFAULT_HEADER_TIMEOUT = 20.0
#: Seconds a keep-alive connection may sit with nothing to do
#: (C{--idle-timeout}): no request arriving and no response owed.
DEFAULT_IDLE_TIMEOUT = 60.0


class _Fail:
    """
    A queued answer of the relay's own, sent once any earlier response has
    finished.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        answer: Answer | None = None,
        head: RequestHead | None = None,
        tunnel: str = "-",
    ) -> None:
        self.answer = answer if answer is not None else Answer(status, reason)
        #: The request answered and the tunnel it was for, for the access
        #: log (none and C{-} when it could not be parsed or routed).
        self.head = head
        self.tunnel = tunnel


def unavailable(reason: str) -> Answer:
    """
    A 503 that tells the visitor when to try again (the HTTP/2 edge's too).
    """
    return Answer(503, f"{reason}; try again shortly", [("Retry-After", str(RETRY_AFTER))])


def _unavailable(reason: str) -> _Fail:
    answer = unavailable(reason)
    return _Fail(answer.status, answer.reason, answer)


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
        #: Requests forwarded on this stream whose responses are not done,
        #: oldest first (for the access log and metrics).
        self.pending: deque[Exchange] = deque()

    def dataReceived(self, data: bytes) -> None:
        if self.detached:
            return
        edge = self.edge
        edge._lastActivity = edge._now()
        for meter in edge._meters:
            meter(len(data))
        transport = self.edge.transport
        if transport is not None:
            sendNow(transport, data)
        pending = self.pending
        if pending:
            pending[0].bytesOut += len(data)
        for status in self.framer.feed(data):
            if pending:
                self.edge._exchangeDone(pending.popleft(), status)
            self.edge._responseDone(self, status)

    def _eof(self) -> None:
        self.closeDelimited = self.framer.opaque or self.framer.raw
        for status in self.framer.eof():
            if self.pending:
                self.edge._exchangeDone(self.pending.popleft(), status)

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
        #: The forwarder the current stream was opened for (its name).
        self._forwarder: str | None = None
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
        #: Gates' byte counters for the current stream.
        self._meters: list[Any] = []
        self.clientIP = "?"
        #: The request whose body is being read, for its byte count.
        self._reading: Exchange | None = None
        settings = getattr(relay, "settings", {})
        self.headerTimeout = float(settings.get("header-timeout", DEFAULT_HEADER_TIMEOUT))
        self.idleTimeout = float(settings.get("idle-timeout", DEFAULT_IDLE_TIMEOUT))
        self._headCall: IDelayedCall | None = None
        self._idleCall: IDelayedCall | None = None
        self._lastActivity = 0.0
        #: The connection was handed to the HTTP/2 edge.
        self._h2 = False
        #: The first bytes, held while they could still be the HTTP/2
        #: preface; C{None} once the connection is known to be HTTP/1.1.
        self._sniff: bytes | None = b""
        #: Close once no response is owed (the relay or the agent drains).
        self._closeWhenIdle = False
        #: The last head routed and the tunnel name its C{Host} asks for.
        self._route: tuple[RequestHead, str] | None = None
        #: The last forwarder choice: head, tunnel and the forwarder's name.
        self._choice: tuple[RequestHead, Any, str] | None = None

    @property
    def link(self) -> Any:
        """
        The agent link this connection has a stream open on, if any.
        """
        return self._stream.link if self._stream is not None else None

    def _now(self) -> float:
        return float(self.relay.reactor.seconds())

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.clientIP = getattr(peer, "host", "?")
        setNoDelay(self.transport)
        self.relay.metrics.connectionOpened(self.scheme)
        self._lastActivity = self._now()
        if self.idleTimeout > 0:
            self._idleCall = self.relay.reactor.callLater(self.idleTimeout, self._idleCheck)
        self.relay.edges.add(self)

    def closeWhenIdle(self) -> None:
        """
        Close this visitor connection once it owes no response: at once if
        it is idle, else after the response in flight is complete.
        """
        if self._lost:
            return
        if self._delegate is not None:
            # An HTTP/2 connection drains its own way; an agent's link is
            # closed by the relay after the drain.
            closeWhenIdle = getattr(self._delegate, "closeWhenIdle", None)
            if closeWhenIdle is not None:
                closeWhenIdle()
            return
        self._closeWhenIdle = True
        if not self._busy and not self._queue and self._gating is None and self._framer.idle:
            self._closeStream()
            self.transport.loseConnection()  # type: ignore[union-attr]

    # -- timeouts

    def _idleCheck(self) -> None:
        """
        Close a connection that has had nothing to do for C{idleTimeout}:
        no bytes from the visitor and no response owed.  Upgraded and
        link connections are left alone (a quiet WebSocket is fine).
        """
        self._idleCall = None
        if self._h2 and not self._lost:
            self._idleH2()
            return
        if self._lost or self._delegate is not None or self._raw:
            return
        quiet = self._now() - self._lastActivity
        if quiet < self.idleTimeout or self._busy or self._gating is not None:
            self._idleCall = self.relay.reactor.callLater(
                max(self.idleTimeout - quiet, 1.0) if quiet < self.idleTimeout else self.idleTimeout, self._idleCheck
            )
            return
        if self._framer.idle:
            self.log.debug("closing idle connection from {client}", client=self.clientIP)
            self._closeStream()
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self._timedOut("the request did not arrive in time")

    def _idleH2(self) -> None:
        """
        An HTTP/2 connection with no stream open that has sent nothing for
        C{idleTimeout} is closed too (a connection opened and left idle
        would otherwise be held for ever).
        """
        quiet = self._now() - self._lastActivity
        if quiet >= self.idleTimeout and not getattr(self._delegate, "pipes", None):
            self.log.debug("closing idle HTTP/2 connection from {client}", client=self.clientIP)
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        wait = self.idleTimeout - quiet if quiet < self.idleTimeout else self.idleTimeout
        self._idleCall = self.relay.reactor.callLater(max(wait, 1.0), self._idleCheck)

    def _headCheck(self) -> None:
        self._headCall = None
        if not self._lost and self._delegate is None and self._framer.partialHead and not self._failed:
            self._timedOut(f"the request head did not arrive within {self.headerTimeout:g}s")

    def _timedOut(self, reason: str) -> None:
        self.log.info("408 for {client}: {reason}", client=self.clientIP, reason=reason)
        self._failed = True
        self._queue.append(_Fail(408, reason))
        self._pump()

    def _stopTimers(self) -> None:
        for call in (self._headCall, self._idleCall):
            if call is not None and call.active():
                call.cancel()
        self._headCall = self._idleCall = None

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        if self._delegate is not None:
            if self._h2:
                self._lastActivity = self._now()
            self._delegate.dataReceived(data)
            return
        if self._sniff is not None:
            data = self._sniffHTTP2(data)
            if not data:
                return
        if self._failed:
            return
        self._lastActivity = self._now()
        try:
            events = self._framer.feed(data)
        except HTTPError as e:
            if e.status in (414, 431):
                self.relay.metrics.limitRejected("request-head")
            self._queue.append(_Fail(e.status, e.reason))
            self._failed = True
        else:
            self._queue.extend(events)
            self._watchHead(any(isinstance(e, RequestHead) for e in events))
        self._pump()

    def _watchHead(self, headDone: bool) -> None:
        """
        Time each request head from its first byte to its end.
        """
        call = self._headCall
        if call is not None and (headDone or not self._framer.partialHead):
            if call.active():
                call.cancel()
            call = self._headCall = None
        if call is None and self._framer.partialHead and self.headerTimeout > 0:
            self._headCall = self.relay.reactor.callLater(self.headerTimeout, self._headCheck)

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
                    for meter in self._meters:
                        meter(len(event.data))
                    self._stream.write(event.data)
                    if self._reading is not None:
                        self._reading.bytesIn += len(event.data)
            elif isinstance(event, RequestEnd):
                queue.popleft()
                if not self._raw:
                    self._reading = None
            elif isinstance(event, RequestHead):
                kind, target = self._decide(event)
                if kind == "wait":
                    self._wait()
                    return
                if kind == "fail":
                    target.head = event
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
                self._send(event.answer, event.head, tunnel=event.tunnel)

    def _decide(self, head: RequestHead) -> tuple[str, Any]:
        """
        Where C{head} goes: C{("tunnel", tunnel)}, C{("link", None)},
        C{("fail", _Fail)}, or C{("wait", None)} when it must wait for the
        current stream's responses first.
        """
        kind, name = self.relay.hosts.split(head.header(b"host"))
        self._route = (head, name or "")
        if kind == "bad":
            return ("fail", _Fail(400, "missing or invalid Host header"))
        if kind == "apex":
            if head.path != LINK_PATH.encode():
                if self.relay.apexGates:
                    return ("wait", None) if self._busy else ("apex", None)
                return ("fail", self._notHere())
            if not head.upgrade:
                return ("fail", _Fail(426, "agents connect here with a WebSocket upgrade"))
            refusal = plainLinkRefusal(self.relay, self.transport)
            if refusal is not None:
                return ("fail", _Fail(403, refusal))
            return ("wait", None) if self._busy else ("link", None)
        tunnel = self.relay.hosts.get(name or "")
        if self.relay.draining:
            return ("fail", _unavailable("this relay is shutting down"))
        if tunnel is None:
            if self.relay.heldFor("http", name or "") is not None:
                return ("fail", _unavailable(f"the agent serving {name!r} is reconnecting"))
            return ("fail", _Fail(404, f"no tunnel named {name!r} on this relay"))
        if self._stream is not None and self._busy and not self._sameStream(tunnel, head):
            return ("wait", None)
        return ("tunnel", tunnel)

    def _nameOf(self, head: RequestHead) -> str:
        """
        The tunnel name C{head} asks for (as L{_decide} found it; the C{Host}
        header is split once a request).
        """
        route = self._route
        if route is not None and route[0] is head:
            return route[1]
        return self.relay.hosts.split(head.header(b"host"))[1] or ""

    def _chosen(self, tunnel: Any, head: RequestHead) -> str:
        """
        The name of the forwarder that handles C{head} to C{tunnel}
        (L{txtunnel.plugins.requestForwarder}).
        """
        choice = self._choice
        if choice is not None and choice[0] is head and choice[1] is tunnel:
            return choice[2]
        tunnelType = getattr(tunnel, "type", "http")
        chosen = requestForwarder(self.relay.forwarders, tunnelType, head)
        name = str(getattr(chosen, "name", tunnelType))
        # Asked up to three times a request (routing, stream reuse, open).
        self._choice = (head, tunnel, name)
        return name

    def _sameStream(self, tunnel: Any, head: RequestHead) -> bool:
        """
        Whether C{head} can go on the current stream: same tunnel, same
        forwarder.  Otherwise the stream is finished and a new one opened.
        """
        return self._tunnel is tunnel and self._forwarder == self._chosen(tunnel, head)

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
            name=self._nameOf(head),
            tunnel=tunnel,
            transport=self.transport,
        )
        self._gating = head
        verdicts: list[Answer | None] = []
        result = checkGates(gates, request)
        if not isinstance(result, Deferred):
            self._verdict(result, verdicts, head, tunnel, request)
            return "pass" if result is None else "again"
        result.addCallback(self._verdict, verdicts, head, tunnel, request)
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
            self._queue[0] = _Fail(answer.status, answer.reason, answer, head, request.name or "-")
        if "gate" in self._pauses and not self._lost:
            self._resume("gate")
            self._pump()

    def _forward(self, head: RequestHead, tunnel: Any) -> None:
        if self._stream is not None and not self._sameStream(tunnel, head):
            self._closeStream()
        if self._stream is None and not self._open(tunnel, head):
            return
        assert self._stream is not None and self._responder is not None
        if head.upgrade:
            # The visitor's bytes after this request are never parsed again,
            # whether or not the server agrees to switch: when the stream
            # ends, so does the connection.
            self._raw = True
        self._responder.framer.expect(head.method)
        if not head.keepAlive and not head.upgrade:
            # The visitor sends nothing more: close once this is answered,
            # whether or not the local server closes its side.
            self._closeWhenIdle = True
        host = head.header(b"host") or b""
        passed = self._passed
        if passed is not None and passed[0] is head:
            request = passed[2]
            self._meters = request.meters
            forwarded = head.withForwarded(self.clientIP, self.scheme, host, request.addHeaders, request.dropHeaders)
        else:
            self._meters = []
            forwarded = head.withForwarded(self.clientIP, self.scheme, host)
        for meter in self._meters:
            meter(len(forwarded))
        exchange = self._exchange(head, self._nameOf(head) or "-")
        exchange.forwarder = self._forwarder or "-"
        exchange.bytesIn = len(head.raw)
        self._responder.pending.append(exchange)
        self._reading = exchange
        self._stream.write(forwarded)

    def _exchange(self, head: RequestHead | None, tunnel: str) -> Exchange:
        if head is None:
            return Exchange(tunnel, self.clientIP, b"-", b"-", b"", self.relay.reactor.seconds())
        return Exchange(
            tunnel, self.clientIP, head.method, head.target, head.header(b"host") or b"", self.relay.reactor.seconds()
        )

    def _exchangeDone(self, exchange: Exchange, status: int) -> None:
        """
        A request is answered (or its stream ended): log it and count it.
        """
        now = self.relay.reactor.seconds()
        if self.relay.accessLog:
            logAccess(exchange, status, now, scheme=self.scheme)
        self.relay.metrics.requestDone(exchange.tunnel, exchange.method, status, now - exchange.started)

    def _flushPending(self, responder: _ToVisitor, status: int | None = None) -> None:
        """
        The stream is let go of: what it still owed is logged with the
        status it had started to send (101 for a switch), C{status}, or 0.
        """
        framer = responder.framer
        while responder.pending:
            exchange = responder.pending.popleft()
            if status is not None:
                code = status
            elif framer.started or framer.raw:
                code = framer.status
            else:
                code = 0
            status = None
            self._exchangeDone(exchange, code)

    def _open(self, tunnel: Any, head: RequestHead) -> bool:
        responder = _ToVisitor(self)
        header = {"peer": self.clientIP, "scheme": self.scheme}
        chosen = self._chosen(tunnel, head)
        if chosen != getattr(tunnel, "type", "http"):
            header["forwarder"] = chosen
        try:
            stream = tunnel.openStream(header, responder)
        except StreamRefused as e:
            headers = [("Retry-After", "1")] if e.status == 503 else []
            self._send(Answer(e.status, str(e), headers=headers))
            return False
        except Exception as e:  # the link went away between routing and opening
            name = self._nameOf(head) or "-"
            self._send(Answer(502, f"the tunnel's agent is not connected ({e})"), head, tunnel=name)
            return False
        self._stream = stream
        self._responder = responder
        self._tunnel = tunnel
        self._forwarder = chosen
        stream.registerProducer(_VisitorReader(self), True)
        self.transport.registerProducer(stream, True)  # type: ignore[union-attr]
        return True

    def _closeStream(self) -> None:
        """
        Let go of the current stream: it owes nothing more, so close it.
        """
        stream, responder = self._stream, self._responder
        self._stream = self._responder = self._tunnel = None
        self._forwarder = None
        self._reading = None
        self._meters = []
        if responder is not None:
            responder.detached = True
            self._flushPending(responder)
        if stream is not None:
            if self.transport is not None:
                self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self._resume("stream")
            if not stream.closed:
                stream.loseConnection()

    # -- events from the stream

    def _responseDone(self, responder: _ToVisitor, status: int) -> None:
        if responder is not self._responder:
            return
        if responder.framer.closing:
            # The local server said it closes after this response, and the
            # visitor got that head as it was: so the relay closes too
            # (RFC 9112 section 9.6), rather than send the next request to
            # a server that will not answer it.  Requests pipelined after
            # it are not answered; the visitor retries them.
            self._queue.clear()
            self._failed = True
            self._closeStream()
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if responder.framer.outstanding:
            return
        if self._waiting:
            self._waiting = False
            self._resume("wait")
            self._pump()
        elif (self._visitorDone or self._closeWhenIdle) and not self._queue:
            self._closeStream()
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _streamEnded(self, responder: _ToVisitor, reason: Failure | None) -> None:
        if responder is not self._responder:
            return
        framer = responder.framer
        owed, started = framer.outstanding, framer.started
        delimitedByClose = responder.closeDelimited or framer.opaque or framer.raw
        if owed and not started:
            error = reason.value if reason is not None else None
            if isinstance(error, StreamReset):
                status, why = (504 if error.code == "timeout" else 502), error.reason or error.code
            else:
                status, why = 502, "the local service closed the connection without answering"
            self._flushPending(responder, status)
            self._closeStream()
            self._send(Answer(status, why), logged=True)
            return
        self._closeStream()
        if owed or delimitedByClose or self._raw or (self._visitorDone and not self._queue):
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self._waiting:
            self._waiting = False
            self._resume("wait")
        self._pump()

    def _sniffHTTP2(self, data: bytes) -> bytes:
        """
        Hand the connection to the HTTP/2 edge when TLS negotiated C{h2}
        or it starts with the HTTP/2 preface (prior-knowledge h2c); return
        the bytes the HTTP/1.1 edge should read (none while undecided).
        """
        from txtunnel.relay.h2edge import PREFACE, H2EdgeProtocol

        assert self._sniff is not None
        seen = self._sniff + data
        h2 = getattr(self.transport, "negotiatedProtocol", None) == b"h2"
        if not h2 and PREFACE.startswith(seen[: len(PREFACE)]):
            if len(seen) < len(PREFACE):
                self._sniff = seen
                return b""
            h2 = True
        self._sniff = None
        if not h2:
            return seen
        protocol = H2EdgeProtocol(self.relay, self.scheme, self.clientIP)
        self._delegate = protocol
        self._h2 = True
        protocol.makeConnection(self.transport)
        protocol.dataReceived(seen)
        return b""

    def _handoff(self, head: RequestHead) -> None:
        """
        This connection is an agent's link: give it to the WebSocket protocol.
        """
        transport: Any = self.transport
        protocol: Any = self.relay.linkFactory.buildProtocol(transport.getPeer())
        self._delegate = protocol
        self._stopTimers()
        protocol.makeConnection(transport)
        protocol.dataReceived(head.raw)
        while self._queue:
            event = self._queue.popleft()
            if isinstance(event, RawBytes):
                protocol.dataReceived(event.data)

    def _answer(self, status: int, reason: str, head: RequestHead | None = None) -> None:
        self._send(Answer(status, reason), head)

    def _send(self, answer: Answer, head: RequestHead | None = None, logged: bool = False, tunnel: str = "-") -> None:
        self._failed = True
        self._queue.clear()
        self._closeStream()
        transport = self.transport
        if not logged:
            exchange = self._exchange(head, tunnel)
            if head is not None:
                exchange.bytesIn = len(head.raw)
            exchange.bytesOut = len(answer.toBytes())
            self._exchangeDone(exchange, answer.status)
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
        elif self._busy and self._responder is not None and _isEventStream(self._responder.framer):
            # TCP cannot tell a visitor that closed its socket from one that
            # only half-closed until a write draws a reset, and a quiet event
            # stream writes nothing for long.  No EventSource half-closes to
            # wait for more events, so this visitor has left: end the
            # stream, and with it the local request.
            self.log.debug("{client} left an event stream", client=self.clientIP)
            self._queue.clear()
            self._closeStream()
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
        self.relay.metrics.connectionClosed(self.scheme)
        self._stopTimers()
        self.relay.edges.discard(self)
        if self._delegate is not None:
            self._delegate.connectionLost(reason)
            return
        self._queue.clear()
        self._closeStream()


def _isEventStream(framer: ResponseFramer) -> bool:
    """
    Whether the response C{framer} is reading the body of is an event
    stream (C{text/event-stream}).
    """
    if not framer.started or framer.framing not in ("length", "chunked", "close"):
        return False
    for name, value in framer.headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


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
