# -*- test-case-name: tests.test_h2pipe,tests.test_grpc -*-
"""
One HTTP/2 stream joined to one link stream, with flow control both ways.

The relay's HTTP/2 edge (L{txtunnel.relay.h2edge}) and the agent's HTTP/2
client to the local service (L{txtunnel.forwarders.grpc}) both hold an
C{h2} connection with many streams; each stream that crosses the link is
an L{H2Pipe}: what the HTTP/2 peer sends (head, body, trailers, end,
reset) goes onto the link stream as L{txtunnel.h2messages} messages, and
what the link stream brings is sent to the HTTP/2 peer.

Memory stays bounded without pausing the shared connection:

 - HTTP/2 to link: body bytes are written to the link stream at once, but
   the HTTP/2 flow-control window is only given back
   (C{acknowledge_received_data}) while the link stream is not backed up
   (it pauses the pipe as its producer); so the peer can never have more
   than one stream window in flight.
 - link to HTTP/2: bytes are sent as far as the HTTP/2 window allows; the
   rest waits here and the link stream is paused, which withholds link
   credit from the other side, until a WINDOW_UPDATE arrives.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import H2Error
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.h2messages import (
    Data,
    Fields,
    Headers,
    MessageDecoder,
    MessageError,
    Trailers,
    encodeData,
    encodeHeaders,
    encodeTrailers,
)
from txtunnel.link import Stream, StreamReset

__all__ = ["H2Owner", "H2Pipe", "HOP_BY_HOP"]

#: Connection-specific fields that HTTP/2 forbids (RFC 9113, 8.2.2).
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"http2-settings"}
)


#: HTTP/2 error codes (RFC 9113 section 7) that have a link reset code of
#: their own; any other travels as C{h2-N}.
_LINK_CODES = {ErrorCodes.CANCEL: "cancel", ErrorCodes.REFUSED_STREAM: "refused"}


def linkCode(code: int) -> str:
    """
    The link reset code for an HTTP/2 peer's C{RST_STREAM} error code, so
    the far side can pass the same code on (a server's C{REFUSED_STREAM}
    tells a gRPC client it may retry; C{ENHANCE_YOUR_CALM} that it should
    slow down).
    """
    try:
        known = ErrorCodes(code)
    except ValueError:
        return "internal-error"
    return _LINK_CODES.get(known, f"h2-{int(known)}")


def h2Code(code: str) -> ErrorCodes:
    """
    The C{RST_STREAM} error code for a link reset code (L{linkCode}'s
    inverse): C{cancel}, C{aborted} and C{link-lost} cancel, C{refused} is
    C{REFUSED_STREAM}, C{h2-N} is code N, anything else an internal error.
    """
    if code in ("cancel", "aborted", "link-lost"):
        return ErrorCodes.CANCEL
    if code == "refused":
        return ErrorCodes.REFUSED_STREAM
    if code.startswith("h2-") and code[3:].isascii() and code[3:].isdigit():
        try:
            return ErrorCodes(int(code[3:]))
        except ValueError:
            pass
    return ErrorCodes.INTERNAL_ERROR


class H2Owner(TypingProtocol):
    """
    What a pipe needs from the protocol that holds the C{h2} connection.
    """

    conn: H2Connection
    #: The connection's transport cannot take more now.
    paused: bool

    def flush(self) -> None:
        """
        Write out what the connection has to send.
        """

    def newStream(self, pipe: H2Pipe) -> int:
        """
        A stream id for a pipe whose link side brings a request head (the
        agent's side); the relay's pipes are made with their id.
        """

    def pipeDone(self, pipe: H2Pipe) -> None:
        """
        The pipe is finished with: forget it.
        """


@implementer(IHalfCloseableProtocol, IPushProducer)
class H2Pipe(Protocol):
    """
    The protocol on a link stream that carries one HTTP/2 stream as
    messages, and the producer that link stream pauses when it backs up.

    @ivar streamID: the HTTP/2 stream, or C{None} until a request head from
        the link has opened one.
    @ivar responseSide: this pipe sends responses to its HTTP/2 peer (the
        relay's edge): a trailers-only block is sent as a head that ends the
        stream.
    """

    log = Logger()

    def __init__(self, owner: H2Owner, streamID: int | None, *, responseSide: bool) -> None:
        self.owner = owner
        self.streamID = streamID
        self.responseSide = responseSide
        self.stream: Stream | None = None
        self._decoder = MessageDecoder()
        #: HTTP/2 events that came before the link stream was attached.
        self._early: list[tuple[str, Any]] = []
        self._unacked = 0
        self._linkBacked = False
        self._out: deque[bytes] = deque()
        self._trailers: Fields | None = None
        self._endPending = False
        #: We have ended our direction of the HTTP/2 stream.
        self._sentEnd = False
        #: The HTTP/2 stream is reset (either way): nothing more on it.
        self._dead = False
        self._headSent = False
        self.finished = False
        #: For the access log and metrics: the response status sent, and
        #: body bytes carried each way.
        self.status = 0
        self.bytesIn = 0
        self.bytesOut = 0
        #: The visitor gates' byte counters (quotas): called with the size
        #: of each body chunk either way.
        self.meters: list[Callable[[int], object]] = []

    # -- the link side

    def makeConnection(self, transport: Any) -> None:
        self.stream = transport
        transport.registerProducer(self, True)
        super().makeConnection(transport)
        early, self._early = self._early, []
        for kind, value in early:
            getattr(self, kind)(*value)

    def dataReceived(self, data: bytes) -> None:
        for meter in self.meters:
            meter(len(data))
        try:
            events = self._decoder.feed(data)
        except MessageError as e:
            self.log.warn("bad HTTP/2 message on {stream!r}: {error}", stream=self.stream, error=str(e))
            self._abort("protocol", str(e), ErrorCodes.PROTOCOL_ERROR)
            return
        for event in events:
            if isinstance(event, Headers):
                self._sendHead(event.fields)
            elif isinstance(event, Data):
                if event.data:
                    self._out.append(event.data)
            elif isinstance(event, Trailers):
                if not self._headSent:
                    if self.responseSide:
                        # Trailers-only: one head that ends the stream.
                        self._sendHead(event.fields, end=True)
                        continue
                    self._abort("protocol", "trailers without a request head", ErrorCodes.PROTOCOL_ERROR)
                    return
                self._trailers = event.fields
        self.pump()

    def readConnectionLost(self) -> None:
        if not self._decoder.idle:
            self._abort("protocol", "the link stream ended inside a message", ErrorCodes.PROTOCOL_ERROR)
            return
        if not self._decoder.started:
            self._abort("protocol", "the link stream ended without a head", ErrorCodes.INTERNAL_ERROR)
            return
        self._endPending = True
        self.pump()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.finished:
            return
        error = reason.value
        if isinstance(error, StreamReset) or not reason.check(ConnectionDone):
            self._resetH2(h2Code(error.code) if isinstance(error, StreamReset) else ErrorCodes.CANCEL)
            self._finish()
            return
        # A clean close: both FINs are through; what waits for the HTTP/2
        # window still goes out.
        self._endPending = True
        self.pump()

    # -- IPushProducer: the link stream backs up or drains

    def pauseProducing(self) -> None:
        self._linkBacked = True

    def resumeProducing(self) -> None:
        self._linkBacked = False
        self._ack()

    def stopProducing(self) -> None:
        pass

    # -- the HTTP/2 side (called by the owner on h2 events)

    def h2Headers(self, fields: Fields) -> None:
        if self.stream is None:
            self._early.append(("h2Headers", (fields,)))
            return
        self.stream.write(encodeHeaders(fields))

    def h2Data(self, data: bytes, flowLength: int) -> None:
        if self.stream is None:
            self._early.append(("h2Data", (data, flowLength)))
            return
        for meter in self.meters:
            meter(len(data))
        self.stream.write(encodeData(data))
        self.bytesIn += len(data)
        self._unacked += flowLength
        self._ack()

    def h2Trailers(self, fields: Fields) -> None:
        if self.stream is None:
            self._early.append(("h2Trailers", (fields,)))
            return
        self.stream.write(encodeTrailers(fields))
        self.stream.loseWriteConnection()

    def h2TrailersOnly(self, fields: Fields) -> None:
        """
        A response that is one head ending the stream (gRPC's
        trailers-only): sent as a lone TRAILERS message.
        """
        self.h2Trailers(fields)

    def h2Ended(self) -> None:
        if self.stream is None:
            self._early.append(("h2Ended", ()))
            return
        self.stream.loseWriteConnection()

    def h2Reset(self, code: int) -> None:
        """
        The HTTP/2 peer reset the stream: reset the link stream too.
        """
        self._dead = True
        if self.stream is None:
            self._early = []
            self._finish()
            return
        self.stream.reset(linkCode(code), f"HTTP/2 stream reset with code {int(code)}")

    def h2Closed(self) -> None:
        """
        The HTTP/2 connection went away under this stream.
        """
        self.h2Reset(ErrorCodes.CANCEL)

    def h2Lost(self, reason: str) -> None:
        """
        The HTTP/2 peer's connection was lost in the middle of this stream
        (a local service killed, its socket closed): reset the link stream
        as an internal error, which the far side passes on as
        C{RST_STREAM INTERNAL_ERROR} (gRPC: C{INTERNAL}), not as a
        cancellation nobody asked for.
        """
        self._dead = True
        if self.stream is None:
            self._early = []
            self._finish()
            return
        self.stream.reset("internal-error", reason)

    def windowOpened(self) -> None:
        self.pump()

    # -- internals

    def _ack(self) -> None:
        stream = self.stream
        backed = self._linkBacked and stream is not None and not stream.closed
        if backed or not self._unacked or self.streamID is None or self._dead:
            return
        n, self._unacked = self._unacked, 0
        try:
            self.owner.conn.acknowledge_received_data(n, self.streamID)
        except H2Error:
            return
        self.owner.flush()

    def _sendHead(self, fields: Fields, end: bool = False) -> None:
        if self._headSent:
            self._abort("protocol", "a second head", ErrorCodes.PROTOCOL_ERROR)
            return
        if self.streamID is None:
            self.streamID = self.owner.newStream(self)
        self._headSent = True
        for name, value in fields:
            if name == b":status" and value.isdigit():
                self.status = int(value)
        conn = self.owner.conn
        try:
            conn.send_headers(self.streamID, fields, end_stream=end)
        except (H2Error, ValueError, TypeError) as e:
            self._abort("protocol", f"cannot send this head over HTTP/2: {e}", ErrorCodes.PROTOCOL_ERROR)
            return
        if end:
            self._sentEnd = True
            self._finishIfDone()
        self.owner.flush()

    def pump(self) -> None:
        """
        Send what waits as far as the HTTP/2 window allows.
        """
        if self.streamID is None or self.finished or self._dead or self._sentEnd:
            self._finishIfDone()
            return
        conn = self.owner.conn
        sid = self.streamID
        try:
            while self._out:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = self._out.popleft()
                if len(chunk) > window:
                    self._out.appendleft(chunk[window:])
                    chunk = chunk[:window]
                conn.send_data(sid, chunk)
                self.bytesOut += len(chunk)
            if not self._out:
                if self._trailers is not None:
                    trailers, self._trailers = self._trailers, None
                    conn.send_headers(sid, trailers, end_stream=True)
                    self._sentEnd = True
                elif self._endPending:
                    conn.end_stream(sid)
                    self._sentEnd = True
        except (H2Error, ValueError, TypeError) as e:
            self._abort("protocol", f"cannot send over HTTP/2: {e}", ErrorCodes.INTERNAL_ERROR)
            return
        stream = self.stream
        if stream is not None and not stream.closed:
            if self._out or self.owner.paused:
                stream.pauseProducing()
            else:
                stream.resumeProducing()
        self.owner.flush()
        self._finishIfDone()

    def _finishIfDone(self) -> None:
        stream = self.stream
        if self._dead or (self._sentEnd and stream is not None and stream.closed):
            self._finish()

    def _resetH2(self, code: int) -> None:
        if self._dead or self.streamID is None:
            return
        self._dead = True
        try:
            self.owner.conn.reset_stream(self.streamID, code)
        except H2Error:
            return
        self.owner.flush()

    def _abort(self, code: str, reason: str, h2code: int) -> None:
        self._resetH2(h2code)
        stream = self.stream
        if stream is not None and not stream.closed:
            stream.reset(code, reason)
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._out.clear()
        self.owner.pipeDone(self)
