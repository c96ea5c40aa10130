# -*- test-case-name: tests.test_h2edge,tests.test_grpc -*-
"""
The relay's public HTTP/2 edge.

The HTTP/1.1 edge (L{txtunnel.relay.edge}) hands a connection here when it
negotiated ALPN C{h2} on TLS or begins with the HTTP/2 connection preface on
cleartext (prior-knowledge h2c).  The C{h2} library does the protocol; each
stream is routed by C{:authority} (as C{Host} on HTTP/1.1), asked about by
the relay's visitor gates, and forwarded on a link stream of its own:

 - gRPC (C{content-type: application/grpc*}) and every request to a
   C{grpc} tunnel goes as HTTP/2 messages (L{txtunnel.h2messages}); the
   agent sends it to the local service over HTTP/2 (L{txtunnel.h2pipe}
   carries trailers, resets and flow control).
 - any other request to an C{http} tunnel is translated here to HTTP/1.1
   (chunked when its length is unknown) and goes to the agent exactly as an
   HTTP/1.1 visitor's request would; the HTTP/1.1 response is framed by
   L{txtunnel.responses.ResponseFramer} and sent back as HTTP/2.  Local
   services that only speak HTTP/1.1 (most of them) so serve HTTP/2
   visitors unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.access import Exchange, logAccess
from txtunnel.errors import StreamRefused
from txtunnel.gates import VisitorRequest, runGates
from txtunnel.h2messages import Fields
from txtunnel.h2pipe import HOP_BY_HOP, H2Pipe
from txtunnel.http1 import STATUS_TEXT, Answer, RequestHead
from txtunnel.link import StreamReset as LinkStreamReset
from txtunnel.plugins import requestForwarder, wireOf
from txtunnel.ratelimit import BucketTable, Rate
from txtunnel.relay.edge import unavailable
from txtunnel.responses import ResponseFramer

if TYPE_CHECKING:
    from txtunnel.relay.service import Relay

__all__ = ["PREFACE", "H2EdgeProtocol", "isGRPC"]

#: The first bytes of every HTTP/2 connection (RFC 9113, 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: Per-stream receive window offered to visitors: what one stream may have
#: in flight towards the link before the relay stops acknowledging.
STREAM_WINDOW = 1024 * 1024

#: Receive window for the whole connection.
CONNECTION_WINDOW = 16 * 1024 * 1024

#: Streams one visitor connection may have open at once.
MAX_STREAMS = 100

#: Largest header list a visitor may send.
MAX_HEADER_LIST = 64 * 1024
#: Streams a visitor may reset per second on one connection (the HTTP/2
#: "rapid reset" attack opens and cancels streams to make the relay do
#: work for free); past it the connection gets GOAWAY ENHANCE_YOUR_CALM.
MAX_RESETS = Rate(100, 1, 100)


def isGRPC(fields: Fields) -> bool:
    """
    Whether a request head is a gRPC call (C{application/grpc}, C{+proto},
    C{+json}, ...).
    """
    for name, value in fields:
        if name == b"content-type":
            return value.lower().startswith(b"application/grpc")
    return False


def _forwardedFields(
    fields: Fields, clientIP: str, scheme: str, authority: bytes, request: VisitorRequest | None
) -> Fields:
    """
    The request head as the agent gets it: hop-by-hop fields dropped, the
    gates' additions and removals applied, C{X-Forwarded-*} set as the
    HTTP/1.1 edge sets them.
    """
    add = [(n.lower(), v) for n, v in request.addHeaders] if request is not None else []
    drop = set(request.dropHeaders) if request is not None else set()
    replaced = {b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-for", *drop, *(n for n, _ in add)}
    pseudo = [(n, v) for n, v in fields if n.startswith(b":")]
    forwardedFor = [v for n, v in fields if n == b"x-forwarded-for"]
    regular = [(n, v) for n, v in fields if not n.startswith(b":") and n not in HOP_BY_HOP and n not in replaced]
    forwardedFor.append(clientIP.encode("ascii"))
    extra = [
        (b"x-forwarded-for", b", ".join(v for v in forwardedFor if v)),
        (b"x-forwarded-proto", scheme.encode("ascii")),
        (b"x-forwarded-host", authority),
    ]
    for name, value in add:
        if any(c in name + value for c in b"\r\n\0"):
            raise ValueError(f"header {name!r} holds a line break")
    return pseudo + regular + extra + add


class _H1Pipe(H2Pipe):
    """
    An HTTP/2 request to an C{http} tunnel, carried as HTTP/1.1 on the link
    stream: the agent's C{http} forwarder sees an ordinary request.
    """

    def __init__(self, owner: H2EdgeProtocol, streamID: int, method: bytes, ended: bool) -> None:
        super().__init__(owner, streamID, responseSide=True)
        self.method = method
        self._chunked = False
        self._requestEnded = ended
        self.framer = ResponseFramer()
        self.framer.expect(method)
        self.framer.onHead = self._responseHead
        self.framer.onBody = self._responseBody
        self._answered = False

    # -- request: HTTP/2 to HTTP/1.1

    def h2Headers(self, fields: Fields) -> None:
        if self.stream is None:
            self._early.append(("h2Headers", (fields,)))
            return
        pseudo = dict((n, v) for n, v in fields if n.startswith(b":"))
        lines = [pseudo.get(b":method", b"GET") + b" " + pseudo.get(b":path", b"/") + b" HTTP/1.1"]
        lines.append(b"Host: " + pseudo.get(b":authority", b""))
        hasLength = False
        cookies = []
        for name, value in fields:
            if name.startswith(b":") or name == b"host" or name == b"te":
                continue
            if name == b"cookie":
                # HTTP/2 may split cookies into fields; HTTP/1.1 has one line.
                cookies.append(value)
                continue
            if name == b"content-length":
                hasLength = True
            lines.append(name + b": " + value)
        if cookies:
            lines.append(b"Cookie: " + b"; ".join(cookies))
        if not hasLength and not self._requestEnded:
            self._chunked = True
            lines.append(b"Transfer-Encoding: chunked")
        self.stream.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def h2Data(self, data: bytes, flowLength: int) -> None:
        if self.stream is None:
            self._early.append(("h2Data", (data, flowLength)))
            return
        if data:
            for meter in self.meters:
                meter(len(data))
            self.stream.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)
            self.bytesIn += len(data)
        self._unacked += flowLength
        self._ack()

    def h2Trailers(self, fields: Fields) -> None:
        if self.stream is None:
            self._early.append(("h2Trailers", (fields,)))
            return
        if self._chunked:
            trailer = b"".join(n + b": " + v + b"\r\n" for n, v in fields if not n.startswith(b":"))
            self.stream.write(b"0\r\n" + trailer + b"\r\n")
            self._chunked = False

    def h2Ended(self) -> None:
        if self.stream is None:
            self._early.append(("h2Ended", ()))
            return
        if self._chunked:
            self.stream.write(b"0\r\n\r\n")
            self._chunked = False

    # -- response: HTTP/1.1 to HTTP/2

    def dataReceived(self, data: bytes) -> None:
        if self._endPending or self.finished:
            return
        for meter in self.meters:
            meter(len(data))
        try:
            done = self.framer.feed(data)
        except Exception as e:  # the framer turns opaque rather than raising, but be safe
            self._abort("protocol", f"bad response: {e}", ErrorCodes.INTERNAL_ERROR)
            return
        if self.framer.raw:
            self._abort(
                "protocol", "the local service switched protocols on an HTTP/2 request", ErrorCodes.PROTOCOL_ERROR
            )
            return
        if any(status >= 200 for status in done):
            self._endPending = True
        self.pump()

    def _responseHead(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if status < 200:
            return
        fields: Fields = [(b":status", str(status).encode())]
        fields += [(n, v) for n, v in headers if n not in HOP_BY_HOP and n != b"keep-alive"]
        self._answered = True
        self._sendHead(fields)

    def _responseBody(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._out.append(data[start:end])

    def readConnectionLost(self) -> None:
        self._eof()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.finished:
            return
        if not self._endPending:
            self._eof(reason)
            if self.finished:
                return
        if not reason.check(ConnectionDone) and not self._endPending:
            super().connectionLost(reason)
            return
        self.pump()

    def _eof(self, reason: Failure | None = None) -> None:
        if self._endPending:
            return
        self.framer.eof()
        if self.framer.outstanding == 0:
            self._endPending = True
            self.pump()
            return
        if not self._answered:
            error = reason.value if reason is not None else None
            if isinstance(error, LinkStreamReset):
                status = 504 if error.code == "timeout" else 502
                words = error.reason or error.code
            else:
                status, words = 502, "the local service closed the connection without answering"
            self._answerWith(Answer(status, words))
            return
        self._abort(
            "protocol", "the local service closed the connection in the middle of a response", ErrorCodes.INTERNAL_ERROR
        )

    def _answerWith(self, answer: Answer) -> None:
        self._out.clear()
        self._answered = True
        owner: Any = self.owner
        owner.answer(self.streamID, answer)
        self._sentEnd = True
        stream = self.stream
        if stream is not None and not stream.closed:
            stream.loseConnection()
        self._finishIfDone()

    def pump(self) -> None:
        super().pump()
        stream = self.stream
        if self._sentEnd and stream is not None and not stream.closed:
            # The response is complete: this stream carries nothing more.
            stream.loseConnection()


@implementer(IPushProducer)
class H2EdgeProtocol(Protocol):
    """
    One visitor's HTTP/2 connection.
    """

    log = Logger()

    def __init__(self, relay: Relay, scheme: str, clientIP: str) -> None:
        self.relay = relay
        self.scheme = scheme
        self.clientIP = clientIP
        self.conn = H2Connection(
            H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True)
        )
        self.pipes: dict[int, H2Pipe] = {}
        #: Requests not yet answered, by stream, for the access log and metrics.
        self.exchanges: dict[int, Exchange] = {}
        self.paused = False
        self._lost = False
        self._closeWhenIdle = False
        self._resets = BucketTable(MAX_RESETS, lambda: float(relay.reactor.seconds()), 1)
        self._calmed = False

    # -- H2Owner

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self._lost:
            self.transport.write(data)

    def newStream(self, pipe: H2Pipe) -> int:
        raise AssertionError("the relay's pipes are made with their stream id")

    def pipeDone(self, pipe: H2Pipe) -> None:
        if pipe.streamID is not None and self.pipes.get(pipe.streamID) is pipe:
            del self.pipes[pipe.streamID]
        exchange = self.exchanges.pop(pipe.streamID, None) if pipe.streamID is not None else None
        if exchange is not None:
            exchange.bytesIn, exchange.bytesOut = pipe.bytesIn, pipe.bytesOut
            self._exchangeDone(exchange, pipe.status)
        if self._closeWhenIdle and not self.pipes:
            self._goAway()

    def _exchangeDone(self, exchange: Exchange, status: int) -> None:
        """
        A request is answered (or its stream ended): log it and count it.
        """
        now = self.relay.reactor.seconds()
        if self.relay.accessLog:
            logAccess(exchange, status, now, scheme=self.scheme, http="2")
        self.relay.metrics.requestDone(exchange.tunnel, exchange.method, status, now - exchange.started)

    def closeWhenIdle(self) -> None:
        """
        The relay is draining: close once no stream is open.  (Not GOAWAY
        at once: the h2 library sends nothing more after it, and the
        streams in flight must finish; new ones get 503 meanwhile.)
        """
        if self._lost or self._closeWhenIdle:
            return
        self._closeWhenIdle = True
        if not self.pipes:
            self._goAway()

    def _goAway(self) -> None:
        if self._lost or self.transport is None:
            return
        try:
            self.conn.close_connection()
        except H2Error:
            pass
        self.flush()
        self.transport.loseConnection()

    # -- the connection

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        self.conn.update_settings(
            {
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            }
        )
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            self.log.info("HTTP/2 protocol error from {client}: {error}", client=self.clientIP, error=str(e))
            try:
                self.conn.close_connection(error_code=getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR))
            except H2Error:
                pass
            self.flush()
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        for event in events:
            if self._calmed:
                return
            self._event(event)
        self.flush()

    def _event(self, event: Any) -> None:
        sid = getattr(event, "stream_id", 0)
        pipe = self.pipes.get(sid)
        if isinstance(event, RequestReceived):
            self._request(sid, event.headers, event.stream_ended is not None)
        elif isinstance(event, DataReceived):
            if pipe is not None:
                pipe.h2Data(event.data, event.flow_controlled_length)
            else:
                self._drop(sid, event.flow_controlled_length)
        elif isinstance(event, TrailersReceived):
            if pipe is not None:
                pipe.h2Trailers(event.headers)
        elif isinstance(event, StreamEnded):
            if pipe is not None:
                pipe.h2Ended()
        elif isinstance(event, StreamReset):
            if pipe is not None:
                pipe.h2Reset(event.error_code)
            if self._resets.take("") > 0:
                self._enhanceYourCalm()
        elif isinstance(event, WindowUpdated):
            targets = list(self.pipes.values()) if sid == 0 else [pipe] if pipe is not None else []
            for target in targets:
                target.windowOpened()
        elif isinstance(event, RemoteSettingsChanged):
            for target in list(self.pipes.values()):
                target.windowOpened()
        elif isinstance(event, ConnectionTerminated):
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _enhanceYourCalm(self) -> None:
        """
        Too many streams reset too fast: GOAWAY ENHANCE_YOUR_CALM and close,
        before the rest of what the visitor sent is looked at.
        """
        self._calmed = True
        self.log.info("HTTP/2 rapid stream resets from {client}; closing", client=self.clientIP)
        try:
            self.conn.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
        except H2Error:
            pass
        self.flush()
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _drop(self, sid: int, length: int) -> None:
        """
        Body bytes for a stream that is answered or gone: dropped, their
        window given back so the connection never stalls.
        """
        try:
            self.conn.acknowledge_received_data(length, sid)
        except H2Error:
            pass

    # -- requests

    def _request(self, sid: int, fields: Fields, ended: bool) -> None:
        pseudo = dict((n, v) for n, v in fields if n.startswith(b":"))
        method = pseudo.get(b":method", b"")
        authority = pseudo.get(b":authority")
        if authority is None:
            for field, value in fields:
                if field == b"host":
                    authority = value
                    break
        exchange = Exchange(
            "-", self.clientIP, method, pseudo.get(b":path", b"/"), authority or b"", self.relay.reactor.seconds()
        )
        self.exchanges[sid] = exchange
        if method == b"CONNECT":
            self.answer(sid, Answer(501, "CONNECT is not supported over HTTP/2 by this relay"))
            return
        kind, name = self.relay.hosts.split(authority)
        if kind == "bad":
            self.answer(sid, Answer(400, "missing or invalid :authority"))
            return
        if kind == "apex":
            assert authority is not None
            self._apex(sid, method, pseudo.get(b":path", b"/"), fields, authority)
            return
        tunnel = self.relay.hosts.get(name or "")
        if self.relay.draining:
            self.answer(sid, unavailable("this relay is shutting down"))
            return
        if tunnel is None:
            if self.relay.heldFor("http", name or "") is not None:
                self.answer(sid, unavailable(f"the agent serving {name!r} is reconnecting"))
                return
            self.answer(sid, Answer(404, f"no tunnel named {name!r} on this relay"))
            return
        exchange.tunnel = name or "-"
        assert authority is not None
        head = RequestHead(
            method=method,
            target=pseudo.get(b":path", b"/"),
            version="2",
            headers=tuple([(b"host", authority)] + [(n, v) for n, v in fields if not n.startswith(b":")]),
            raw=b"",
            upgrade=False,
        )
        # The forwarder that claims the request (txtunnel.plugins); only one
        # whose wire is "h2" gets HTTP/2 messages, others see HTTP/1.1.
        tunnelType = getattr(tunnel, "type", "http")
        chosen = requestForwarder(self.relay.forwarders, tunnelType, head)
        exchange.forwarder = getattr(chosen, "name", tunnelType)
        grpc = wireOf(chosen) == "h2"
        pipe: H2Pipe = H2Pipe(self, sid, responseSide=True) if grpc else _H1Pipe(self, sid, method, ended)
        self.pipes[sid] = pipe
        request = VisitorRequest(
            head=head,
            clientIP=self.clientIP,
            scheme=self.scheme,
            host=authority,
            name=name or "",
            tunnel=tunnel,
            transport=self.transport,
        )
        if not self.relay.gates:
            self._admitted(None, sid, pipe, fields, authority, tunnel, request, grpc)
            return
        runGates(self.relay.gates, request).addCallback(
            self._admitted, sid, pipe, fields, authority, tunnel, request, grpc
        )

    def _apex(self, sid: int, method: bytes, path: bytes, fields: Fields, authority: bytes) -> None:
        """
        A request for the relay's own host (its login and device-login
        pages): the apex gates answer it, as on the HTTP/1.1 edge, or
        nobody does.  Browsers speak HTTP/2 to an HTTPS relay, so these
        pages must work here too.
        """
        notHere = Answer(404, f"this is a txtunnel relay; tunnels are served at NAME.{self.relay.domain}")
        if not self.relay.apexGates:
            self.answer(sid, notHere)
            return
        head = RequestHead(
            method=method,
            target=path,
            version="2",
            headers=tuple([(b"host", authority)] + [(n, v) for n, v in fields if not n.startswith(b":")]),
            raw=b"",
            upgrade=False,
        )
        request = VisitorRequest(
            head=head,
            clientIP=self.clientIP,
            scheme=self.scheme,
            host=authority,
            name="",
            tunnel=None,
            transport=self.transport,
        )

        def answered(answer: Answer | None) -> None:
            if not self._lost:
                self.answer(sid, answer if answer is not None else notHere)

        runGates(self.relay.apexGates, request).addCallback(answered)

    def _admitted(
        self,
        answer: Answer | None,
        sid: int,
        pipe: H2Pipe,
        fields: Fields,
        authority: bytes,
        tunnel: Any,
        request: VisitorRequest,
        grpc: bool,
    ) -> None:
        if self._lost or self.pipes.get(sid) is not pipe:
            return
        if answer is not None:
            del self.pipes[sid]
            self.answer(sid, answer)
            self.flush()
            return
        try:
            forwarded = _forwardedFields(fields, self.clientIP, self.scheme, authority, request)
        except ValueError as e:
            del self.pipes[sid]
            self.answer(sid, Answer(500, f"the relay could not forward this request ({e})"))
            self.flush()
            return
        header: dict[str, Any] = {"peer": self.clientIP, "scheme": self.scheme}
        if grpc:
            header["h2"] = 1
        chosen = self.exchanges[sid].forwarder if sid in self.exchanges else None
        if chosen and chosen != getattr(tunnel, "type", "http"):
            header["forwarder"] = chosen
        early = pipe._early
        pipe._early = [("h2Headers", (forwarded,))] + early
        pipe.meters = request.meters
        try:
            tunnel.openStream(header, pipe)
        except StreamRefused as e:  # an address the relay refuses, or --max-streams
            del self.pipes[sid]
            self.answer(sid, Answer(e.status, str(e), [("Retry-After", "1")] if e.status == 503 else []))
        except Exception as e:  # the link went away between routing and opening
            del self.pipes[sid]
            self.answer(sid, Answer(502, f"the tunnel's agent is not connected ({e})"))
        self.flush()

    def answer(self, sid: int, answer: Answer) -> None:
        """
        Answer stream C{sid} with the relay's own response and end it.
        """
        text = STATUS_TEXT.get(answer.status, "Error")
        body = answer.body if answer.body is not None else f"{answer.status} {text}: {answer.reason}\n".encode()
        exchange = self.exchanges.pop(sid, None)
        if exchange is not None:
            exchange.bytesOut = len(body)
            self._exchangeDone(exchange, answer.status)
        fields: Fields = [
            (b":status", str(answer.status).encode()),
            (b"content-type", answer.contentType.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"x-txtunnel-error", b"1"),
        ]
        fields += [(n.lower().encode(), v.encode()) for n, v in answer.headers]
        self.log.debug(
            "answering {client} stream {sid} with {status}: {reason}",
            client=self.clientIP,
            sid=sid,
            status=answer.status,
            reason=answer.reason,
        )
        try:
            self.conn.send_headers(sid, fields, end_stream=not body)
            if body:
                # A short text; should the visitor's window be too small
                # for it, h2 raises and the stream is reset instead.
                self.conn.send_data(sid, body, end_stream=True)
        except (H2Error, ValueError):
            try:
                self.conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
            except H2Error:
                pass
        self.flush()

    # -- IPushProducer: the visitor's socket fills up or drains

    def pauseProducing(self) -> None:
        self.paused = True
        for pipe in list(self.pipes.values()):
            if pipe.stream is not None and not pipe.stream.closed:
                pipe.stream.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        for pipe in list(self.pipes.values()):
            pipe.pump()

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._lost = True
        pipes, self.pipes = self.pipes, {}
        for pipe in pipes.values():
            pipe.h2Closed()
