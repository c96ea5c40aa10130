# -*- test-case-name: tests.test_link -*-
"""
Streams multiplexed over one link, with per-stream credit windows.

A L{Link} owns the frame decoder for one carrier connection (a WebSocket, in
practice) and the table of open L{Stream}s.  Each stream looks like a Twisted
transport to the protocol on top of it: C{write}, C{loseConnection},
C{registerProducer}; and like a push producer to whatever consumes its
incoming bytes.  Credit windows bound what a peer may send before the
receiver has passed it on, so memory per stream is bounded by the window and
a stalled visitor stalls only its own stream.

The link does no I/O itself: it hands encoded bytes to an L{ILinkCarrier} and
is fed bytes by it, so it runs the same over a real WebSocket and in a unit
test with a list.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.frames import (
    MAX_FRAME_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    decodeJSON,
    encodeFrame,
    encodeJSON,
)
from txtunnel.interfaces import ILinkCarrier

__all__ = ["DEFAULT_WINDOW", "KEEPALIVE_TIMEOUT_FACTOR", "Link", "Stream", "StreamAddress", "StreamReset"]

#: Bytes a peer may send on a stream before it must wait for credit.
DEFAULT_WINDOW = 1024 * 1024

#: A link silent this many keepalive intervals is closed.  Each side pings
#: every interval and a live peer answers at once, so a healthy link is
#: never silent much over one interval; the timer is armed from the last
#: byte heard, so a dead (half-open) link is closed within 1.5 intervals of
#: going quiet -- inside the 2x the design promises.
KEEPALIVE_TIMEOUT_FACTOR = 1.5

#: Largest DATA frame we send; big enough to keep per-frame cost small.
DATA_CHUNK = 256 * 1024


class StreamReset(ConnectionLost):
    """
    The stream was aborted, by the peer or by the link going away.

    @ivar code: a short machine-readable cause (C{"refused"}, C{"timeout"},
        C{"link-lost"}, C{"flow-control"}, ...).
    @ivar reason: words for a person.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@implementer(IAddress)
class StreamAddress:
    """
    The address of one end of a stream: the link's peer and the stream id.
    """

    def __init__(self, peer: str, stream: int) -> None:
        self.peer = peer
        self.stream = stream

    def __repr__(self) -> str:
        return f"StreamAddress({self.peer!r}, {self.stream})"


@implementer(ITransport, IConsumer, IPushProducer)
class Stream:
    """
    One bidirectional byte stream on a L{Link}.

    Outgoing: L{write} sends as much as the peer's credit allows and queues
    the rest; a registered producer is paused while anything is queued.
    Incoming: bytes go to C{protocol.dataReceived}; credit is given back to
    the peer only once they are passed on and we are not paused, which is
    how a slow consumer slows its sender and nobody else.
    """

    log = Logger()

    def __init__(self, link: Link, id: int, header: dict[str, Any], sendWindow: int, recvWindow: int) -> None:
        self.link = link
        self.id = id
        self.header = header
        self.protocol: IProtocol | None = None
        self.disconnecting = False
        self.closed = False
        self._sendWindow = sendWindow
        self._recvWindow = recvWindow
        self._recvAvailable = recvWindow
        self._consumed = 0
        self._out: deque[bytes] = deque()
        self._outBytes = 0
        self._finPending = False
        self._finSent = False
        self._finReceived = False
        self._finDelivered = False
        self._paused = False
        self._in: deque[bytes] = deque()
        self._producer: Any = None
        self._streamingProducer = True
        self._producerPaused = False
        self._pulling = False
        self._pullAgain = False
        #: Payload bytes written to and received from the peer (for metrics).
        self.bytesSent = 0
        self.bytesReceived = 0
        #: Set by forwarders whose streams never end by themselves (a UDP
        #: flow ends only when idle): a drain on shutdown does not wait for
        #: them.  See L{Link.finiteStreams}.
        self.endless = False
        #: Called with the size of every payload chunk written or received:
        #: the relay meters TCP, UDP and TLS visitors' bytes against their
        #: bandwidth quotas with it (HTTP is metered by the edge).
        self.meter: Callable[[int], object] | None = None

    # -- wiring

    def attach(self, protocol: IProtocol) -> None:
        """
        Make C{protocol} the user of this stream and call its C{connectionMade}.
        """
        self.protocol = protocol
        protocol.makeConnection(self)  # type: ignore[arg-type]

    # -- ITransport

    def write(self, data: bytes) -> None:
        if self.closed or self._finPending or self._finSent:
            return
        if data:
            self._out.append(bytes(data))
            self._outBytes += len(data)
            self.bytesSent += len(data)
            if self.meter is not None:
                self.meter(len(data))
            self._flush()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """
        Send FIN once everything queued is sent: the half-close of TCP.
        """
        if self.closed or self._finPending or self._finSent:
            return
        self._finPending = True
        self._flush()

    def loseConnection(self) -> None:
        """
        Finish sending, then FIN; bytes that still arrive are dropped (with
        credit returned, so the peer never stalls on a closing stream).
        """
        self.disconnecting = True
        if self._in:
            # Nobody will read these now; give their credit back.
            self._consumed += sum(len(data) for data in self._in)
            self._in.clear()
        self.loseWriteConnection()
        self._grantCredit()
        self._maybeFinished()

    def abortConnection(self) -> None:
        self.reset("aborted", "closed by the other side")

    def reset(self, code: str, reason: str) -> None:
        """
        Abort the stream now and tell the peer why.
        """
        if self.closed:
            return
        self.link._sendReset(self.id, code, reason)
        self._close(Failure(StreamReset(code, reason)))

    def getPeer(self) -> StreamAddress:
        return StreamAddress(self.link.peer, self.id)

    def getHost(self) -> StreamAddress:
        return StreamAddress("local", self.id)

    # -- IConsumer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"stream {self.id} already has a producer")
        self._producer = producer
        self._streamingProducer = streaming
        self._producerPaused = False
        if self.closed:
            producer.stopProducing()
        elif streaming and self._outBytes:
            self._producerPaused = True
            producer.pauseProducing()
        elif not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    # -- IPushProducer (for bytes arriving from the peer)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._in and not self._paused and not self.closed:
            data = self._in.popleft()
            self._deliver(data)
        if not self._paused:
            self._deliverFin()
            self._grantCredit()

    def stopProducing(self) -> None:
        # As a transport does: a consumer that goes away closes us gracefully.
        self.loseConnection()

    # -- sending

    def _flush(self) -> None:
        link = self.link
        while self._out and self._sendWindow > 0 and link.writable and not self.closed:
            chunk = self._out.popleft()
            n = min(len(chunk), self._sendWindow, DATA_CHUNK)
            if n < len(chunk):
                self._out.appendleft(chunk[n:])
                chunk = chunk[:n]
            self._sendWindow -= n
            self._outBytes -= n
            link._sendData(self.id, chunk)
        if self.closed:
            return
        if self._out:
            link._blocked.add(self)
            if self._producer is not None and self._streamingProducer and not self._producerPaused:
                self._producerPaused = True
                self._producer.pauseProducing()
            return
        link._blocked.discard(self)
        if self._finPending and not self._finSent:
            self._finSent = True
            link._sendFin(self.id)
            self._maybeFinished()
            return
        if self._producer is not None:
            if not self._streamingProducer:
                self._pull()
            elif self._producerPaused:
                self._producerPaused = False
                self._producer.resumeProducing()

    def _pull(self) -> None:
        """
        Ask a pull producer for more while everything it gave has gone out.
        Its writes re-enter L{_flush}; a loop here instead of recursion
        keeps the stack flat however small its pieces are.
        """
        if self._pulling:
            self._pullAgain = True
            return
        self._pulling = True
        try:
            self._pullAgain = True
            while self._pullAgain and self._producer is not None and not self._streamingProducer and not self.closed:
                self._pullAgain = False
                self._producer.resumeProducing()
        finally:
            self._pulling = False

    # -- receiving (called by the link)

    def _dataFrame(self, data: bytes) -> None:
        if self._finReceived:
            self.link._protocolError(f"DATA after FIN on stream {self.id}")
            return
        if len(data) > self._recvAvailable:
            self.reset("flow-control", f"peer sent {len(data)} bytes with {self._recvAvailable} of credit")
            return
        self._recvAvailable -= len(data)
        self.bytesReceived += len(data)
        if self.meter is not None:
            self.meter(len(data))
        if self.disconnecting:
            self._consumed += len(data)
            self._grantCredit()
        elif self._paused or self._in:
            self._in.append(data)
        else:
            self._deliver(data)
            self._grantCredit()

    def _deliver(self, data: bytes) -> None:
        self._consumed += len(data)
        if self.protocol is not None:
            self.protocol.dataReceived(data)

    def _grantCredit(self) -> None:
        # A closing stream drops what arrives, so its credit flows even while
        # paused: otherwise the peer could never flush and send its FIN.
        if self.closed or (self._paused and not self.disconnecting) or self._finReceived:
            return
        if self._consumed >= self._recvWindow // 4:
            n, self._consumed = self._consumed, 0
            self._recvAvailable += n
            self.link._sendWindowUpdate(self.id, n)

    def _windowFrame(self, increment: int) -> None:
        self._sendWindow += increment
        if self._sendWindow > 0x7FFFFFFF:
            self.reset("flow-control", "window overflow")
            return
        self._flush()

    def _finFrame(self) -> None:
        if self._finReceived:
            self.link._protocolError(f"second FIN on stream {self.id}")
            return
        self._finReceived = True
        if not self._paused and not self._in:
            self._deliverFin()
        else:
            # A paused stream that is already closing needs no delivery.
            self._maybeFinished()

    def _deliverFin(self) -> None:
        if not self._finReceived or self._finDelivered or self.closed:
            return
        self._finDelivered = True
        protocol = self.protocol
        if protocol is not None and not self.disconnecting:
            half = IHalfCloseableProtocol(protocol, None)
            if half is not None:
                half.readConnectionLost()
            else:
                self.loseConnection()
        self._maybeFinished()

    def _maybeFinished(self) -> None:
        if self.closed:
            return
        readDone = self._finDelivered or (self.disconnecting and self._finReceived)
        if self._finSent and readDone:
            self._close(Failure(ConnectionDone("stream closed cleanly")))

    def _resetFrame(self, code: str, reason: str) -> None:
        self._close(Failure(StreamReset(code, reason)))

    def _close(self, reason: Failure) -> None:
        if self.closed:
            return
        self.closed = True
        self._out.clear()
        self._in.clear()
        self._outBytes = 0
        self.link._forget(self)
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        protocol = self.protocol
        if protocol is not None:
            protocol.connectionLost(reason)

    def __repr__(self) -> str:
        return f"<Stream {self.id} on {self.link.peer}>"


@implementer(IPushProducer)
class Link:
    """
    The multiplexer for one agent⇄relay connection.

    @ivar controlReceived: called with each CONTROL message (a dict).
    @ivar streamOpened: called with each L{Stream} the peer opens; it must
        attach a protocol (it may do so later, after pausing the stream).
    @ivar peer: a printable name for the other side, for logs.
    """

    log = Logger()

    def __init__(
        self,
        carrier: ILinkCarrier,
        *,
        role: str,
        clock: IReactorTime,
        peer: str = "?",
        window: int = DEFAULT_WINDOW,
        maxFrame: int = MAX_FRAME_PAYLOAD,
        keepalive: float = 10.0,
        keepaliveTimeout: float = 15.0,
    ) -> None:
        if role not in ("relay", "agent"):
            raise ValueError(f"role must be 'relay' or 'agent', not {role!r}")
        self.carrier = carrier
        self.role = role
        self.peer = peer
        self.clock = clock
        self.window = window
        self.peerWindow = window
        self.streams: dict[int, Stream] = {}
        self.controlReceived: Callable[[dict[str, Any]], None] = lambda message: None
        self.streamOpened: Callable[[Stream], None] = lambda stream: stream.reset("refused", "no streams accepted here")
        #: Called with each stream once it is closed (metrics count its bytes).
        self.streamClosed: Callable[[Stream], None] | None = None
        self.writable = True
        self.closed = False
        self._blocked: set[Stream] = set()
        self._decoder = FrameDecoder(maxFrame)
        self._maxFrame = maxFrame
        self._nextId = 1 if role == "relay" else 2
        #: The lowest id the peer has not opened yet (peer ids only grow).
        self._peerNextId = 2 if role == "relay" else 1
        self._keepalive = keepalive
        self._keepaliveTimeout = keepaliveTimeout
        self._lastHeard = clock.seconds()
        self._pingCall: IDelayedCall | None = None
        self._watchCall: IDelayedCall | None = None
        self._probeCall: IDelayedCall | None = None
        self.bytesIn = 0
        self.bytesOut = 0

    # -- lifecycle

    def start(self) -> None:
        """
        Begin the keepalive: a PING every C{keepalive} seconds, and close the
        link when nothing at all has been heard for C{keepaliveTimeout}.

        The silence deadline is its own timer, re-armed lazily from the time
        last heard (no per-frame timer work), so a dead link is closed
        C{keepaliveTimeout} after the last byte heard, not at the next ping.
        """
        if self._keepalive > 0:
            self._pingCall = self.clock.callLater(self._keepalive, self._ping)
        if self._keepaliveTimeout > 0 and self._keepalive > 0:
            self._watchCall = self.clock.callLater(self._keepaliveTimeout, self._watch)

    def _ping(self) -> None:
        self._pingCall = None
        if self.closed:
            return
        self._send(encodeFrame(FrameType.PING, 0, os.urandom(8)))
        self._pingCall = self.clock.callLater(self._keepalive, self._ping)

    def _watch(self) -> None:
        self._watchCall = None
        if self.closed:
            return
        silent = self.clock.seconds() - self._lastHeard
        if silent >= self._keepaliveTimeout:
            self._deadLink(f"silent for {silent:.1f}s", "keepalive timeout")
            return
        self._watchCall = self.clock.callLater(self._keepaliveTimeout - silent, self._watch)

    def _deadLink(self, why: str, reason: str) -> None:
        self.log.warn("link to {peer} {why}; closing it", peer=self.peer, why=why, link_event="dead", reason=reason)
        self._cancelTimers()
        self.carrier.closeLink(reason)

    def probe(self, timeout: float) -> None:
        """
        Check the link now: send a PING and close the link if nothing at all
        is heard within C{timeout} seconds.  Used after the machine wakes
        from sleep, when the link is likely dead but the keepalive would
        take its full timeout to say so.
        """
        if self.closed:
            return
        sentAt = self.clock.seconds()
        self._send(encodeFrame(FrameType.PING, 0, os.urandom(8)))
        if self._probeCall is not None and self._probeCall.active():
            self._probeCall.cancel()

        def check() -> None:
            self._probeCall = None
            if not self.closed and self._lastHeard < sentAt:
                self._deadLink(f"did not answer a probe within {timeout:g}s", "probe timeout")

        self._probeCall = self.clock.callLater(timeout, check)

    def _cancelTimers(self) -> None:
        for name in ("_pingCall", "_watchCall", "_probeCall"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)

    def connectionLost(self, why: str = "link lost") -> None:
        """
        The carrier is gone: every open stream is reset.
        """
        if self.closed:
            return
        self.closed = True
        self._cancelTimers()
        for stream in list(self.streams.values()):
            stream._resetFrame("link-lost", why)
        self._blocked.clear()

    # -- IPushProducer: the carrier's transport tells us when it is full

    def pauseProducing(self) -> None:
        self.writable = False

    def resumeProducing(self) -> None:
        self.writable = True
        for stream in list(self._blocked):
            if not self.writable:
                break
            stream._flush()

    def stopProducing(self) -> None:
        self.connectionLost("carrier stopped")

    # -- outgoing

    def openStream(self, header: dict[str, Any], protocol: IProtocol | None = None) -> Stream:
        """
        Open a new stream to the peer, announced with C{header}.
        """
        if self.closed:
            raise ConnectionLost("the link is closed")
        sid = self._nextId
        self._nextId += 2
        stream = Stream(self, sid, header, self.peerWindow, self.window)
        self.streams[sid] = stream
        self._send(encodeJSON(FrameType.OPEN, sid, header))
        if protocol is not None:
            stream.attach(protocol)
        return stream

    def sendControl(self, message: dict[str, Any]) -> None:
        if not self.closed:
            self._send(encodeJSON(FrameType.CONTROL, 0, message))

    def _send(self, data: bytes) -> None:
        self.bytesOut += len(data)
        self.carrier.sendLinkBytes(data)

    def _sendData(self, sid: int, data: bytes) -> None:
        self._send(encodeFrame(FrameType.DATA, sid, data))

    def _sendWindowUpdate(self, sid: int, n: int) -> None:
        if not self.closed:
            self._send(encodeFrame(FrameType.WINDOW, sid, n.to_bytes(4, "big")))

    def _sendFin(self, sid: int) -> None:
        if not self.closed:
            self._send(encodeFrame(FrameType.FIN, sid))

    def _sendReset(self, sid: int, code: str, reason: str) -> None:
        if not self.closed:
            self._send(encodeJSON(FrameType.RESET, sid, {"code": code, "reason": reason[:500]}))

    def finiteStreams(self) -> int:
        """
        Open streams that will end by themselves (not L{Stream.endless}):
        what a drain on shutdown waits for.
        """
        return sum(1 for stream in self.streams.values() if not stream.endless)

    def _forget(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        self._blocked.discard(stream)
        if self.streamClosed is not None:
            self.streamClosed(stream)

    # -- incoming

    def dataReceived(self, data: bytes) -> None:
        """
        Feed bytes from the carrier.  A malformed frame closes the whole link
        with a reason; streams on other links are untouched.
        """
        if self.closed:
            return
        self.bytesIn += len(data)
        self._lastHeard = self.clock.seconds()
        try:
            frames = self._decoder.feed(data)
        except FrameError as e:
            self._protocolError(str(e))
            return
        for frame in frames:
            if self.closed:
                return
            try:
                self._dispatch(frame)
            except FrameError as e:
                self._protocolError(str(e))
                return
            except Exception:
                # A bug in one stream's protocol (or a callback) must not
                # drop the other frames of this message or the whole link.
                self.log.failure(
                    "error handling a {kind} frame for stream {stream} from {peer}",
                    kind=frame.type.name,
                    stream=frame.stream,
                    peer=self.peer,
                )
                stream = self.streams.get(frame.stream)
                if stream is not None:
                    stream.reset("internal-error", "the stream's protocol failed")

    def _protocolError(self, reason: str) -> None:
        self.log.warn("protocol error from {peer}: {reason}", peer=self.peer, reason=reason)
        self.carrier.closeLink(f"protocol error: {reason}")
        self.connectionLost(f"protocol error: {reason}")

    def _dispatch(self, frame: Frame) -> None:
        kind = frame.type
        if kind is FrameType.DATA:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                stream._dataFrame(frame.payload)
            elif not self._isUnknownStreamOk(frame.stream):
                raise FrameError(f"DATA for stream {frame.stream}, which was never opened")
        elif kind is FrameType.WINDOW:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                stream._windowFrame(int.from_bytes(frame.payload, "big"))
        elif kind is FrameType.FIN:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                stream._finFrame()
        elif kind is FrameType.RESET:
            stream = self.streams.get(frame.stream)
            if stream is not None:
                info = decodeJSON(frame)
                stream._resetFrame(str(info.get("code", "reset")), str(info.get("reason", "")))
        elif kind is FrameType.OPEN:
            self._opened(frame)
        elif kind is FrameType.CONTROL:
            self.controlReceived(decodeJSON(frame))
        elif kind is FrameType.PING:
            self._send(encodeFrame(FrameType.PONG, 0, frame.payload))
        elif kind is FrameType.PONG:
            pass

    def _isUnknownStreamOk(self, sid: int) -> bool:
        # Frames may still arrive for a stream we already closed: it is ours
        # if its parity is ours, or theirs and below their next id.
        if (sid % 2) == (self._nextId % 2):
            return sid < self._nextId
        return sid < self._peerNextId

    def _opened(self, frame: Frame) -> None:
        sid = frame.stream
        if (sid % 2) == (self._nextId % 2):
            raise FrameError(f"peer opened stream {sid}, an id only we may use")
        if sid in self.streams or sid < self._peerNextId:
            raise FrameError(f"peer opened stream {sid} twice")
        header = decodeJSON(frame)
        self._peerNextId = sid + 2
        stream = Stream(self, sid, header, self.peerWindow, self.window)
        self.streams[sid] = stream
        self.streamOpened(stream)
