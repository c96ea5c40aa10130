"""
Unit tests for L{txtunnel.link}: the stream multiplexer with credit windows,
run over an in-memory carrier with a fake clock.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, ITransport
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from txtunnel.frames import Frame, FrameDecoder, FrameType, encodeFrame, encodeJSON
from txtunnel.interfaces import ILinkCarrier
from txtunnel.link import DATA_CHUNK, Link, Stream, StreamAddress, StreamReset

# -- harness


@implementer(ILinkCarrier)
class QueueCarrier:
    """
    One side's carrier: what its link sends is queued until the test pumps
    it to the other link, and decoded so tests can look at the frames.
    """

    def __init__(self) -> None:
        self.queue: list[bytes] = []
        self.sent: list[Frame] = []
        self.closed: list[str] = []
        self._decoder = FrameDecoder()
        self.onSend: Any = None

    def sendLinkBytes(self, data: bytes) -> None:
        self.queue.append(data)
        self.sent.extend(self._decoder.feed(data))
        if self.onSend is not None:
            self.onSend(data)

    def closeLink(self, reason: str) -> None:
        self.closed.append(reason)

    def kinds(self) -> list[FrameType]:
        return [f.type for f in self.sent]


class Recorder(Protocol):
    """
    A stream protocol that records what happens to it.  Not half-closeable.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.events: list[str] = []
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.events.append("made")

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.events.append("lost")
        self.reason = reason


@implementer(IHalfCloseableProtocol)
class HalfRecorder(Recorder):
    """
    A recorder that understands half-close.
    """

    def readConnectionLost(self) -> None:
        self.events.append("readLost")

    def writeConnectionLost(self) -> None:
        self.events.append("writeLost")


class Pair:
    """
    A relay link and an agent link joined by two L{QueueCarrier}s.  The agent
    accepts every stream with a new protocol from C{protocolFactory}.
    """

    def __init__(self, window: int = 1024, agentWindow: int | None = None, protocolFactory: Any = HalfRecorder) -> None:
        self.clock = Clock()
        self.relayCarrier = QueueCarrier()
        self.agentCarrier = QueueCarrier()
        agentWindow = window if agentWindow is None else agentWindow
        self.relay = Link(self.relayCarrier, role="relay", clock=self.clock, peer="agent", window=window)
        self.agent = Link(self.agentCarrier, role="agent", clock=self.clock, peer="relay", window=agentWindow)
        # what the hello/welcome exchange does in production
        self.relay.peerWindow = agentWindow
        self.agent.peerWindow = window
        self.accepted: list[Stream] = []
        self.protocols: list[Recorder] = []
        self.protocolFactory = protocolFactory
        self.agent.streamOpened = self._accept

    def _accept(self, stream: Stream) -> None:
        protocol = self.protocolFactory()
        self.accepted.append(stream)
        self.protocols.append(protocol)
        stream.attach(protocol)

    def stepRelayToAgent(self) -> bool:
        if not self.relayCarrier.queue:
            return False
        self.agent.dataReceived(self.relayCarrier.queue.pop(0))
        return True

    def stepAgentToRelay(self) -> bool:
        if not self.agentCarrier.queue:
            return False
        self.relay.dataReceived(self.agentCarrier.queue.pop(0))
        return True

    def pump(self, limit: int = 100000) -> None:
        """
        Deliver queued bytes both ways, in order, until nothing moves.
        """
        for _ in range(limit):
            moved = self.stepRelayToAgent()
            moved = self.stepAgentToRelay() or moved
            if not moved:
                return
        raise AssertionError("the links never went quiet")

    def open(
        self, header: dict[str, Any] | None = None, protocol: Recorder | None = None
    ) -> tuple[Stream, Recorder, Stream, Recorder]:
        """
        Open a stream from the relay; return both ends and their protocols.
        """
        mine = protocol or HalfRecorder()
        stream = self.relay.openStream(header or {"kind": "test"}, mine)
        self.pump()
        return stream, mine, self.accepted[-1], self.protocols[-1]


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


def resetOf(protocol: Recorder) -> StreamReset:
    assert protocol.reason is not None
    assert protocol.reason.check(StreamReset), protocol.reason
    value = protocol.reason.value
    assert isinstance(value, StreamReset)
    return value


# -- opening and data


def test_streamImplementsInterfaces() -> None:
    """
    A stream is a transport and a push producer; the link is a push producer.
    """
    pair = Pair()
    stream, _, theirs, _ = pair.open()
    verifyObject(ITransport, stream)
    verifyObject(IPushProducer, stream)
    verifyObject(IPushProducer, pair.relay)
    assert isinstance(stream.getPeer(), StreamAddress)
    assert (stream.getPeer().peer, stream.getPeer().stream) == ("agent", stream.id)
    assert (theirs.getHost().peer, theirs.getHost().stream) == ("local", theirs.id)


def test_openDeliversHeader() -> None:
    """
    Opening a stream calls the peer's C{streamOpened} with a stream that
    carries the header, and both protocols get C{connectionMade}.
    """
    pair = Pair()
    header = {"tunnel": 3, "client": "192.0.2.1:5555", "nested": {"a": [1, 2]}}
    stream, mine, theirs, protocol = pair.open(header)
    assert theirs.header == header
    assert theirs.id == stream.id
    assert mine.events == ["made"] and protocol.events == ["made"]
    assert pair.relayCarrier.sent[0] == Frame(FrameType.OPEN, stream.id, encodeJSON(FrameType.OPEN, 1, header)[10:])


def test_streamIdParity() -> None:
    """
    The relay opens odd stream ids and the agent even ones, each increasing,
    so both may open streams at once without clashing.
    """
    pair = Pair()
    pair.relay.streamOpened = lambda s: s.attach(Recorder())
    relayIds = [pair.relay.openStream({}).id for _ in range(3)]
    agentIds = [pair.agent.openStream({}).id for _ in range(3)]
    pair.pump()
    assert relayIds == [1, 3, 5]
    assert agentIds == [2, 4, 6]
    assert sorted(pair.relay.streams) == sorted(pair.agent.streams) == [1, 2, 3, 4, 5, 6]
    assert pair.relayCarrier.closed == pair.agentCarrier.closed == []


def test_finiteStreamsLeaveOutEndlessOnes() -> None:
    """
    L{Link.finiteStreams}, what a shutdown drain waits for, counts open
    streams except those marked L{Stream.endless} (UDP flows), and drops
    to zero as the finite ones close.
    """
    pair = Pair()
    pair.agent.streamOpened = lambda s: s.attach(Recorder())
    flow = pair.relay.openStream({})
    flow.endless = True
    request = pair.relay.openStream({})
    pair.pump()
    assert len(pair.relay.streams) == 2
    assert pair.relay.finiteStreams() == 1
    request.reset("cancel", "done")
    pair.pump()
    assert pair.relay.finiteStreams() == 0
    assert list(pair.relay.streams) == [flow.id]


def test_dataBothWays() -> None:
    """
    Bytes written on either end arrive in order at the other, including more
    than a window's worth and writes bigger than one DATA frame.
    """
    pair = Pair(window=1024)
    stream, mine, theirs, protocol = pair.open()
    up = pattern(10000, 1)
    down = pattern(7777, 2)
    stream.write(up[:5000])
    theirs.write(down)
    stream.writeSequence([up[5000:6000], up[6000:]])
    pair.pump()
    assert bytes(protocol.data) == up
    assert bytes(mine.data) == down
    assert all(len(f.payload) <= 1024 for f in pair.relayCarrier.sent if f.type is FrameType.DATA)


def test_bigWritesAreCut() -> None:
    """
    With a big window, a big write goes out in DATA frames of at most
    C{DATA_CHUNK} bytes.
    """
    pair = Pair(window=1 << 20)
    stream, _, _, protocol = pair.open()
    stream.write(pattern(3 * DATA_CHUNK + 5))
    pair.pump()
    sizes = [len(f.payload) for f in pair.relayCarrier.sent if f.type is FrameType.DATA]
    assert sizes == [DATA_CHUNK, DATA_CHUNK, DATA_CHUNK, 5]
    assert bytes(protocol.data) == pattern(3 * DATA_CHUNK + 5)


def test_orderingAcrossFramesDeliveredOneByOne() -> None:
    """
    Delivering one carrier message at a time, interleaved writes on several
    streams arrive per stream in the order they were written.
    """
    pair = Pair(window=4096)
    ends = [pair.open() for _ in range(3)]
    expected: dict[int, bytes] = defaultdict(bytes)
    for i in range(30):
        stream = ends[i % 3][0]
        piece = pattern(50 + i, i)
        stream.write(piece)
        expected[stream.id] += piece
        if i % 4 == 0:
            pair.stepRelayToAgent()
    pair.pump()
    for stream, _, _theirs, protocol in ends:
        assert bytes(protocol.data) == expected[stream.id]


def test_defaultStreamOpenedRefuses() -> None:
    """
    A link that accepts no streams resets each one with C{refused}.
    """
    pair = Pair()
    mine = Recorder()
    pair.agent.openStream({}, mine)
    pair.pump()
    assert resetOf(mine).code == "refused"
    assert pair.agent.streams == {} and pair.relay.streams == {}


def test_controlMessages() -> None:
    """
    CONTROL messages reach C{controlReceived} as dicts, in order.
    """
    pair = Pair()
    got: list[dict[str, Any]] = []
    pair.agent.controlReceived = got.append
    pair.relay.sendControl({"op": "welcome", "window": 1})
    pair.relay.sendControl({"op": "bound", "id": 1})
    pair.pump()
    assert got == [{"op": "welcome", "window": 1}, {"op": "bound", "id": 1}]


# -- flow control


class CheckingPair(Pair):
    """
    A pair that checks, on every DATA frame sent, that the sender never has
    more bytes in flight on a stream than the receiver's window.
    """

    def __init__(self, window: int, agentWindow: int) -> None:
        super().__init__(window=window, agentWindow=agentWindow)
        self.sentData: dict[tuple[str, int], int] = defaultdict(int)
        self.credit: dict[tuple[str, int], int] = defaultdict(int)
        self.maxInFlight = 0
        self.relayCarrier.onSend = lambda data: self._check("relay", data, agentWindow)
        self.agentCarrier.onSend = lambda data: self._check("agent", data, window)
        self.agent.streamOpened = self._accept

    def _check(self, side: str, data: bytes, peerWindow: int) -> None:
        for frame in FrameDecoder().feed(data):
            if frame.type is FrameType.DATA:
                key = (side, frame.stream)
                self.sentData[key] += len(frame.payload)
                inFlight = self.sentData[key] - self.credit[key]
                self.maxInFlight = max(self.maxInFlight, inFlight)
                assert inFlight <= peerWindow, f"{side} has {inFlight} bytes in flight on {frame.stream}"

    def _creditFrom(self, data: bytes, to: str) -> None:
        for frame in FrameDecoder().feed(data):
            if frame.type is FrameType.WINDOW:
                self.credit[(to, frame.stream)] += int.from_bytes(frame.payload, "big")

    def stepRelayToAgent(self) -> bool:
        if not self.relayCarrier.queue:
            return False
        data = self.relayCarrier.queue.pop(0)
        self._creditFrom(data, "agent")
        self.agent.dataReceived(data)
        return True

    def stepAgentToRelay(self) -> bool:
        if not self.agentCarrier.queue:
            return False
        data = self.agentCarrier.queue.pop(0)
        self._creditFrom(data, "relay")
        self.relay.dataReceived(data)
        return True


actions = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 2), st.booleans(), st.integers(1, 3000)),
        st.tuples(st.just("pause"), st.integers(0, 2), st.booleans()),
        st.tuples(st.just("resume"), st.integers(0, 2), st.booleans()),
        st.tuples(st.just("step"), st.booleans()),
        st.tuples(st.just("linkPause"), st.booleans()),
        st.tuples(st.just("linkResume"), st.booleans()),
        st.tuples(st.just("pump")),
    ),
    max_size=40,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=actions, window=st.sampled_from([64, 1000, 4096]), agentWindow=st.sampled_from([64, 1000, 4096]))
def test_windowNeverExceeded(actions: list[tuple[Any, ...]], window: int, agentWindow: int) -> None:
    """
    Whatever mix of writes, receiver pauses, carrier pauses and partial
    delivery happens, no sender ever has more unacknowledged bytes on a
    stream than the receiver's window, no stream is reset for flow control,
    and once everything is resumed every byte arrives in order.
    """
    pair = CheckingPair(window, agentWindow)
    ends = [pair.open() for _ in range(3)]
    written: dict[tuple[int, bool], bytes] = defaultdict(bytes)
    counter = 0
    for action in actions:
        kind = action[0]
        if kind == "write":
            _, index, fromRelay, size = action
            stream = ends[index][0] if fromRelay else ends[index][2]
            counter += 1
            data = pattern(size, counter)
            stream.write(data)
            written[(index, fromRelay)] += data
        elif kind in ("pause", "resume"):
            _, index, relaySide = action
            stream = ends[index][0] if relaySide else ends[index][2]
            getattr(stream, kind + "Producing")()
        elif kind == "step":
            (pair.stepRelayToAgent if action[1] else pair.stepAgentToRelay)()
        elif kind in ("linkPause", "linkResume"):
            link = pair.relay if action[1] else pair.agent
            (link.pauseProducing if kind == "linkPause" else link.resumeProducing)()
        else:
            pair.pump()
    for stream, _, theirs, _ in ends:
        stream.resumeProducing()
        theirs.resumeProducing()
    pair.relay.resumeProducing()
    pair.agent.resumeProducing()
    pair.pump()
    for index, (stream, mine, theirs, protocol) in enumerate(ends):
        assert bytes(protocol.data) == written[(index, True)]
        assert bytes(mine.data) == written[(index, False)]
        assert not stream.closed and not theirs.closed
    assert pair.relayCarrier.closed == pair.agentCarrier.closed == []


def test_senderStopsAtWindowAndResumesOnCredit() -> None:
    """
    A sender facing a receiver that does not pass bytes on sends exactly one
    window, then nothing; the WINDOW frames sent when the receiver resumes
    let the rest through.
    """
    pair = Pair(window=1000)
    stream, _, theirs, protocol = pair.open()
    theirs.pauseProducing()
    stream.write(pattern(5000))
    pair.pump()
    sent = sum(len(f.payload) for f in pair.relayCarrier.sent if f.type is FrameType.DATA)
    assert sent == 1000
    assert bytes(protocol.data) == b""
    assert FrameType.WINDOW not in pair.agentCarrier.kinds()
    theirs.resumeProducing()
    pair.pump()
    assert bytes(protocol.data) == pattern(5000)
    assert FrameType.WINDOW in pair.agentCarrier.kinds()


def test_pausedReceiverPausesSendersProducer() -> None:
    """
    The backpressure chain: a paused receiving stream withholds credit, so
    the sending stream pauses the transport registered as its producer; on
    resume the producer is resumed and all bytes arrive.
    """
    pair = Pair(window=1024)
    stream, _, theirs, protocol = pair.open()
    visitor = StringTransport()
    stream.registerProducer(visitor, True)
    assert visitor.producerState == "producing"
    theirs.pauseProducing()
    stream.write(pattern(1000))
    pair.pump()
    assert visitor.producerState == "producing"
    stream.write(pattern(1000, 1))
    pair.pump()
    assert visitor.producerState == "paused"
    theirs.resumeProducing()
    pair.pump()
    assert visitor.producerState == "producing"
    assert bytes(protocol.data) == pattern(1000) + pattern(1000, 1)


def test_registerProducerWhileBlockedPausesAtOnce() -> None:
    """
    A producer registered on a stream that already has queued bytes is
    paused immediately; a second producer is an error.
    """
    pair = Pair(window=100)
    stream, _, theirs, _ = pair.open()
    theirs.pauseProducing()
    stream.write(pattern(500))
    pair.pump()
    producer = StringTransport()
    stream.registerProducer(producer, True)
    assert producer.producerState == "paused"
    with pytest.raises(RuntimeError):
        stream.registerProducer(StringTransport(), True)
    stream.unregisterProducer()
    stream.registerProducer(StringTransport(), True)


def test_stalledStreamDoesNotBlockOthers() -> None:
    """
    The key property: a stream whose receiver has stopped reading holds back
    only its own bytes; another stream on the same link delivers everything,
    both ways.
    """
    pair = Pair(window=1024)
    slow, _, slowTheirs, slowProtocol = pair.open()
    fast, fastMine, fastTheirs, fastProtocol = pair.open()
    slowProducer = StringTransport()
    fastProducer = StringTransport()
    slow.registerProducer(slowProducer, True)
    fast.registerProducer(fastProducer, True)
    slowTheirs.pauseProducing()
    for i in range(20):
        slow.write(pattern(1000, i))
        fast.write(pattern(1000, i))
        fastTheirs.write(pattern(500, i))
        pair.pump()
    assert bytes(fastProtocol.data) == b"".join(pattern(1000, i) for i in range(20))
    assert bytes(fastMine.data) == b"".join(pattern(500, i) for i in range(20))
    assert fastProducer.producerState == "producing"
    assert slowProducer.producerState == "paused"
    assert bytes(slowProtocol.data) == b""
    slowTheirs.resumeProducing()
    pair.pump()
    assert bytes(slowProtocol.data) == b"".join(pattern(1000, i) for i in range(20))
    assert slowProducer.producerState == "producing"


def test_receiverPausingInsideDataReceived() -> None:
    """
    A protocol that pauses its stream from C{dataReceived} gets no more
    bytes until it resumes, and the rest is queued, not lost.
    """

    class Pauser(Recorder):
        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            assert self.transport is not None
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    pair = Pair(window=4096, protocolFactory=Pauser)
    stream, _, theirs, protocol = pair.open()
    for i in range(3):
        stream.write(pattern(100, i))
    pair.pump()
    assert bytes(protocol.data) == pattern(100, 0)
    theirs.resumeProducing()
    assert bytes(protocol.data) == pattern(100, 0) + pattern(100, 1)
    theirs.resumeProducing()
    theirs.resumeProducing()
    assert bytes(protocol.data) == b"".join(pattern(100, i) for i in range(3))


def test_linkBackpressureQueuesAndFlushes() -> None:
    """
    While the carrier is full (the link paused), streams queue their bytes
    and pause their producers; resuming the link flushes every blocked
    stream and resumes their producers.
    """
    pair = Pair(window=4096)
    ends = [pair.open() for _ in range(3)]
    producers = []
    for stream, *_ in ends:
        producer = StringTransport()
        stream.registerProducer(producer, True)
        producers.append(producer)
    before = len(pair.relayCarrier.sent)
    pair.relay.pauseProducing()
    for i, (stream, *_) in enumerate(ends):
        stream.write(pattern(300, i))
    assert len(pair.relayCarrier.sent) == before
    assert [p.producerState for p in producers] == ["paused"] * 3
    pair.relay.resumeProducing()
    assert [p.producerState for p in producers] == ["producing"] * 3
    pair.pump()
    for i, (_, _, _, protocol) in enumerate(ends):
        assert bytes(protocol.data) == pattern(300, i)


def test_linkPausedAgainDuringFlush() -> None:
    """
    If the carrier fills up again while the link flushes blocked streams, the
    flush stops there and the rest waits for the next resume.
    """
    pair = Pair(window=4096)
    ends = [pair.open() for _ in range(3)]
    pair.relay.pauseProducing()
    for i, (stream, *_) in enumerate(ends):
        stream.write(pattern(300, i))

    def full(data: bytes) -> None:
        pair.relay.pauseProducing()

    pair.relayCarrier.onSend = full
    before = len(pair.relayCarrier.sent)
    pair.relay.resumeProducing()
    assert len(pair.relayCarrier.sent) == before + 1
    pair.relayCarrier.onSend = None
    pair.relay.resumeProducing()
    pair.pump()
    for i, (_, _, _, protocol) in enumerate(ends):
        assert bytes(protocol.data) == pattern(300, i)


# -- FIN and close


def test_halfClose() -> None:
    """
    C{loseWriteConnection} is a half-close: the peer's half-closeable
    protocol gets C{readConnectionLost} and may still send; once both sides
    have sent FIN, both protocols see C{ConnectionDone} and the streams are
    gone from both links.
    """
    pair = Pair()
    stream, mine, theirs, protocol = pair.open()
    stream.write(b"request")
    stream.loseWriteConnection()
    pair.pump()
    assert protocol.events == ["made", "readLost"]
    assert bytes(protocol.data) == b"request"
    assert not theirs.closed and not stream.closed
    theirs.write(b"response")
    stream.write(b"ignored after FIN")
    pair.pump()
    assert bytes(mine.data) == b"response"
    assert bytes(protocol.data) == b"request"
    theirs.loseWriteConnection()
    pair.pump()
    assert mine.events == ["made", "readLost", "lost"]
    assert protocol.events == ["made", "readLost", "lost"]
    assert mine.reason is not None and mine.reason.check(ConnectionDone)
    assert protocol.reason is not None and protocol.reason.check(ConnectionDone)
    assert stream.closed and theirs.closed
    assert pair.relay.streams == {} and pair.agent.streams == {}
    assert pair.relayCarrier.kinds().count(FrameType.FIN) == 1
    assert pair.agentCarrier.kinds().count(FrameType.FIN) == 1


def test_finWaitsForQueuedData() -> None:
    """
    FIN is sent only after every queued byte, even when the window makes the
    bytes wait.
    """
    pair = Pair(window=100)
    stream, _, theirs, protocol = pair.open()
    theirs.pauseProducing()
    stream.write(pattern(450))
    stream.loseWriteConnection()
    pair.pump()
    assert FrameType.FIN not in pair.relayCarrier.kinds()
    theirs.resumeProducing()
    pair.pump()
    kinds = pair.relayCarrier.kinds()
    assert kinds[-1] is FrameType.FIN
    assert bytes(protocol.data) == pattern(450)
    assert protocol.events == ["made", "readLost"]


def test_finDeliveredAfterPausedData() -> None:
    """
    A FIN that arrives while the receiver is paused with queued bytes is
    delivered after those bytes, on resume.
    """
    pair = Pair(window=1000)
    stream, _, theirs, protocol = pair.open()
    theirs.pauseProducing()
    stream.write(b"abc")
    stream.loseWriteConnection()
    pair.pump()
    assert protocol.events == ["made"]
    theirs.resumeProducing()
    assert bytes(protocol.data) == b"abc"
    assert protocol.events == ["made", "readLost"]


def test_finToPlainProtocolClosesBothWays() -> None:
    """
    A protocol that does not understand half-close is closed when FIN
    arrives, and the close completes on both sides.
    """
    pair = Pair(protocolFactory=Recorder)
    stream, mine, theirs, protocol = pair.open()
    stream.loseWriteConnection()
    pair.pump()
    assert protocol.events == ["made", "lost"]
    assert protocol.reason is not None and protocol.reason.check(ConnectionDone)
    assert mine.events == ["made", "readLost", "lost"]
    assert stream.closed and theirs.closed


def test_loseConnectionDropsLaterBytesButReturnsCredit() -> None:
    """
    After C{loseConnection}, bytes still arriving are not delivered, but
    credit is returned so the peer can finish sending and close.
    """
    pair = Pair(window=500)
    stream, mine, theirs, protocol = pair.open()
    stream.loseConnection()
    theirs.write(pattern(5000))
    pair.pump()
    assert bytes(mine.data) == b""
    assert theirs._outBytes == 0
    theirs.loseConnection()
    pair.pump()
    assert stream.closed and theirs.closed
    assert mine.reason is not None and mine.reason.check(ConnectionDone)
    assert pair.relay.streams == {} and pair.agent.streams == {}


def test_loseConnectionWhilePausedDoesNotWedgePeer() -> None:
    """
    A stream paused by its consumer and then closed (a slow visitor that
    hangs up mid-download) still returns credit for the bytes it holds and
    drops, so the peer's queued bytes and its FIN go out and both ends close.
    """
    pair = Pair(window=1000)
    stream, mine, theirs, protocol = pair.open()
    origin = StringTransport()
    theirs.registerProducer(origin, True)
    stream.pauseProducing()
    theirs.write(pattern(5000))
    pair.pump()
    assert origin.producerState == "paused"
    stream.loseConnection()  # e.g. the visitor's transport called stopProducing
    pair.pump()
    assert protocol.events == ["made", "readLost"]
    theirs.loseConnection()
    pair.pump()
    assert theirs._outBytes == 0
    assert stream.closed and theirs.closed
    assert bytes(mine.data) == b""
    assert pair.relay.streams == {} and pair.agent.streams == {}


def test_writeAfterCloseIgnored() -> None:
    """
    Writing to a closed or closing stream sends nothing.
    """
    pair = Pair()
    stream, _, theirs, protocol = pair.open()
    stream.loseConnection()
    stream.write(b"late")
    pair.pump()
    assert bytes(protocol.data) == b""
    stream.reset("x", "y")
    stream.write(b"later")
    assert FrameType.DATA not in pair.relayCarrier.kinds()


def test_stopProducingClosesGracefully() -> None:
    """
    A consumer that calls C{stopProducing} on the stream closes it like
    C{loseConnection}: FIN, not RESET, and a clean close once the peer's
    protocol closes in turn.
    """
    pair = Pair(protocolFactory=Recorder)
    stream, mine, _, protocol = pair.open()
    stream.stopProducing()
    pair.pump()
    assert FrameType.FIN in pair.relayCarrier.kinds()
    assert FrameType.RESET not in pair.relayCarrier.kinds() + pair.agentCarrier.kinds()
    assert stream.closed
    assert mine.reason is not None and mine.reason.check(ConnectionDone)
    assert protocol.reason is not None and protocol.reason.check(ConnectionDone)


# -- reset


def test_resetDeliversCodeAndReason() -> None:
    """
    C{reset} aborts both ends at once: each protocol's C{connectionLost} gets
    a L{StreamReset} with the code and reason; the producer is stopped.
    """
    pair = Pair()
    stream, mine, theirs, protocol = pair.open()
    producer = StringTransport()
    theirs.registerProducer(producer, True)
    stream.write(b"some")
    stream.reset("timeout", "origin took too long")
    pair.pump()
    for recorder in (mine, protocol):
        error = resetOf(recorder)
        assert (error.code, error.reason) == ("timeout", "origin took too long")
        assert isinstance(error, ConnectionLost)
    assert producer.producerState == "stopped"
    assert stream.closed and theirs.closed
    assert pair.relay.streams == {} and pair.agent.streams == {}
    assert pair.relayCarrier.closed == pair.agentCarrier.closed == []


def test_abortConnectionResets() -> None:
    """
    C{abortConnection} is a reset with code C{aborted}.
    """
    pair = Pair()
    stream, _, _, protocol = pair.open()
    stream.abortConnection()
    pair.pump()
    assert resetOf(protocol).code == "aborted"


def test_lateFramesForClosedStreamIgnored() -> None:
    """
    Frames still in flight for a stream that was just reset are dropped
    quietly; the link stays up.
    """
    pair = Pair()
    stream, mine, theirs, protocol = pair.open()
    theirs.write(b"in flight")
    theirs.loseWriteConnection()
    stream.reset("refused", "nope")
    pair.pump()
    assert pair.relayCarrier.closed == pair.agentCarrier.closed == []
    assert bytes(mine.data) == b""
    assert resetOf(mine).code == "refused"


# -- link loss and protocol errors


def test_linkLossResetsAllStreams() -> None:
    """
    When the carrier goes away every open stream is reset with code
    C{link-lost}, and the link refuses new streams.
    """
    pair = Pair()
    ends = [pair.open() for _ in range(3)]
    pair.relay.connectionLost("websocket closed")
    for _, mine, _, _ in ends:
        error = resetOf(mine)
        assert error.code == "link-lost" and error.reason == "websocket closed"
    assert pair.relay.streams == {}
    with pytest.raises(ConnectionLost):
        pair.relay.openStream({})
    pair.relay.connectionLost("again")  # idempotent


def expectProtocolError(pair: Pair, data: bytes, match: str) -> None:
    """
    Feed C{data} to the agent link and check it closed the link (only that
    one) with a reason matching C{match}, resetting its streams.
    """
    stream, _, _, protocol = pair.open()
    other = Pair()
    _, _, _, otherProtocol = other.open()
    pair.agent.dataReceived(data)
    assert len(pair.agentCarrier.closed) == 1
    assert pair.agentCarrier.closed[0].startswith("protocol error: ")
    assert match in pair.agentCarrier.closed[0]
    assert pair.agent.closed
    error = resetOf(protocol)
    assert error.code == "link-lost" and match in error.reason
    assert pair.relayCarrier.closed == []
    assert otherProtocol.events == ["made"]
    # nothing more is processed
    before = len(pair.agentCarrier.sent)
    pair.agent.dataReceived(encodeFrame(FrameType.PING, 0, b"12345678"))
    assert len(pair.agentCarrier.sent) == before


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\xff" * 10, "unknown frame type 0xff"),
        (encodeFrame(FrameType.DATA, 101, b"x"), "DATA for stream 101, which was never opened"),
        (encodeFrame(FrameType.DATA, 102, b"x"), "DATA for stream 102, which was never opened"),
        (encodeJSON(FrameType.OPEN, 2, {}), "peer opened stream 2, an id only we may use"),
        (encodeJSON(FrameType.OPEN, 1, {}), "peer opened stream 1 twice"),
        (encodeFrame(FrameType.OPEN, 3, b"[1]"), "OPEN payload must be a JSON object"),
        (encodeFrame(FrameType.RESET, 1, b"not json"), "RESET payload is not valid JSON"),
        (encodeFrame(FrameType.CONTROL, 0, b"[]"), "CONTROL payload must be a JSON object"),
        (encodeFrame(FrameType.FIN, 1) * 2, "second FIN on stream 1"),
        (encodeFrame(FrameType.FIN, 1) + encodeFrame(FrameType.DATA, 1, b"x"), "DATA after FIN on stream 1"),
    ],
    ids=[
        "garbage",
        "data-never-opened-theirs",
        "data-never-opened-ours",
        "open-our-parity",
        "open-twice",
        "open-not-object",
        "reset-not-json",
        "control-not-object",
        "second-fin",
        "data-after-fin",
    ],
)
def test_protocolErrors(data: bytes, match: str) -> None:
    """
    Each protocol violation by the peer closes that link (and only that
    link) through C{carrier.closeLink} with a reason naming the problem.
    """
    expectProtocolError(Pair(), data, match)


def test_reusedStreamIdIsProtocolError() -> None:
    """
    A peer may not open an id again after the stream closed: stream ids
    only grow, so late frames can never be confused with a new stream.
    """
    pair = Pair()
    stream, *_ = pair.open()
    stream.reset("done", "")
    pair.pump()
    assert pair.agent.streams == {}
    pair.agent.dataReceived(encodeJSON(FrameType.OPEN, stream.id, {}))
    assert pair.agentCarrier.closed and "peer opened stream 1 twice" in pair.agentCarrier.closed[0]


def test_flowControlViolationResetsOnlyThatStream() -> None:
    """
    A peer sending more than the window on a stream gets that stream reset
    with C{flow-control}; the link and its other streams carry on.
    """
    pair = Pair(window=100)
    _, _, victim, victimProtocol = pair.open()
    other, _, _, otherProtocol = pair.open()
    victim.pauseProducing()
    pair.agent.dataReceived(encodeFrame(FrameType.DATA, victim.id, b"x" * 60))
    pair.agent.dataReceived(encodeFrame(FrameType.DATA, victim.id, b"x" * 41))
    error = resetOf(victimProtocol)
    assert error.code == "flow-control"
    assert "41 bytes with 40 of credit" in error.reason
    reset = pair.agentCarrier.sent[-1]
    assert reset.type is FrameType.RESET and reset.stream == victim.id
    assert b'"flow-control"' in reset.payload
    assert pair.agentCarrier.closed == []
    other.write(b"still fine")
    pair.pump()
    assert bytes(otherProtocol.data) == b"still fine"


def test_windowOverflowResets() -> None:
    """
    Credit that would push a send window past 2**31-1 resets the stream.
    """
    pair = Pair()
    stream, mine, _, _ = pair.open()
    pair.relay.dataReceived(encodeFrame(FrameType.WINDOW, stream.id, (0xFFFFFFFF).to_bytes(4, "big")))
    assert resetOf(mine).code == "flow-control"
    assert pair.relayCarrier.closed == []


def test_unknownStreamControlFramesIgnored() -> None:
    """
    WINDOW, FIN and RESET for streams the link does not know are ignored
    (they race with closes); PONG is accepted.
    """
    pair = Pair()
    pair.agent.dataReceived(
        encodeFrame(FrameType.WINDOW, 9, b"\x00\x00\x00\x01")
        + encodeFrame(FrameType.FIN, 11)
        + encodeJSON(FrameType.RESET, 13, {"code": "x"})
        + encodeFrame(FrameType.PONG, 0, b"12345678")
    )
    assert pair.agentCarrier.closed == []
    assert not pair.agent.closed


def test_protocolRaisingDoesNotDropOtherStreams() -> None:
    """
    Frames after one whose handler raised, in the same carrier message, are
    still processed: a bug in one stream's protocol does not drop another
    stream's bytes.
    """

    class Exploding(Recorder):
        def dataReceived(self, data: bytes) -> None:
            raise ZeroDivisionError("bug in one protocol")

    pair = Pair()
    bad, _, badTheirs, _ = pair.open(protocol=None)
    good, _, goodTheirs, goodProtocol = pair.open()
    badTheirs.protocol = Exploding()
    badTheirs.protocol.makeConnection(badTheirs)
    bad.write(b"boom")
    good.write(b"fine")
    data = b"".join(pair.relayCarrier.queue)
    pair.relayCarrier.queue.clear()
    with capturedLogs() as events:
        pair.agent.dataReceived(data)
    assert bytes(goodProtocol.data) == b"fine"
    assert badTheirs.closed
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1 and failures[0]["log_failure"].check(ZeroDivisionError)
    assert pair.agentCarrier.closed == []
    pair.pump()
    assert bad.closed
    assert resetOf(bad.protocol).code == "internal-error"  # type: ignore[arg-type]


def test_controlCallbackRaisingIsContained() -> None:
    """
    A C{controlReceived} that raises is logged; the link and the frames after
    it carry on.
    """
    pair = Pair()
    got: list[dict[str, Any]] = []

    def control(message: dict[str, Any]) -> None:
        got.append(message)
        if message.get("op") == "bad":
            raise KeyError("op")

    pair.agent.controlReceived = control
    pair.relay.sendControl({"op": "bad"})
    pair.relay.sendControl({"op": "good"})
    data = b"".join(pair.relayCarrier.queue)
    pair.relayCarrier.queue.clear()
    with capturedLogs() as events:
        pair.agent.dataReceived(data)
    assert got == [{"op": "bad"}, {"op": "good"}]
    assert pair.agentCarrier.closed == [] and not pair.agent.closed
    assert [e["log_failure"].type for e in events if "log_failure" in e] == [KeyError]


# -- keepalive


def test_pingEveryInterval() -> None:
    """
    After C{start}, the link sends a PING every C{keepalive} seconds while it
    hears from the peer.
    """
    clock = Clock()
    carrier = QueueCarrier()
    link = Link(carrier, role="agent", clock=clock, keepalive=10, keepaliveTimeout=25)
    link.start()
    assert carrier.sent == []
    clock.advance(9.9)
    assert carrier.sent == []
    for n in range(1, 6):
        clock.advance(10 if n > 1 else 0.1)
        link.dataReceived(encodeFrame(FrameType.PONG, 0, b"\x00" * 8))
        pings = [f for f in carrier.sent if f.type is FrameType.PING]
        assert len(pings) == n
        assert len(pings[-1].payload) == 8
    assert carrier.closed == []
    link.connectionLost()
    assert clock.getDelayedCalls() == []


def test_pongAnswersPing() -> None:
    """
    A PING from the peer is answered with a PONG carrying the same 8 bytes.
    """
    clock = Clock()
    carrier = QueueCarrier()
    link = Link(carrier, role="relay", clock=clock)
    link.dataReceived(encodeFrame(FrameType.PING, 0, b"abcdefgh"))
    assert carrier.sent == [Frame(FrameType.PONG, 0, b"abcdefgh")]


def test_keepaliveTimeoutClosesLink() -> None:
    """
    After C{keepaliveTimeout} seconds of silence the link asks its carrier to
    close, schedules nothing more, and leaves no delayed call once the
    carrier reports the loss.
    """
    clock = Clock()
    carrier = QueueCarrier()
    link = Link(carrier, role="relay", clock=clock, keepalive=10, keepaliveTimeout=25)
    link.start()
    clock.advance(10)
    clock.advance(10)
    assert carrier.closed == []
    clock.advance(4.9)
    assert carrier.closed == []
    clock.advance(0.1)
    assert carrier.closed == ["keepalive timeout"]
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert carrier.closed == ["keepalive timeout"]
    link.connectionLost("keepalive timeout")
    assert clock.getDelayedCalls() == []


def test_halfOpenLinkNoticedWithinTwoIntervals() -> None:
    """
    With the default factor, a link that goes quiet at any moment between
    pings is closed within twice the keepalive interval of the last byte
    heard (the deadline runs from that byte, not from the next ping).
    """
    from txtunnel.link import KEEPALIVE_TIMEOUT_FACTOR

    for quietAt in (0.3, 4.0, 9.99):
        clock = Clock()
        carrier = QueueCarrier()
        link = Link(carrier, role="agent", clock=clock, keepalive=10, keepaliveTimeout=10 * KEEPALIVE_TIMEOUT_FACTOR)
        link.start()
        clock.advance(quietAt)
        link.dataReceived(encodeFrame(FrameType.PONG, 0, b"\x00" * 8))
        heard = clock.seconds()
        while not carrier.closed:
            clock.advance(0.01)
        assert clock.seconds() - heard <= 2 * 10
        assert clock.seconds() - heard >= 10
        link.connectionLost()
        assert clock.getDelayedCalls() == []


def test_probeClosesASilentLink() -> None:
    """
    L{Link.probe} sends a PING at once and closes the link if nothing is
    heard within its timeout, long before the keepalive would.
    """
    clock = Clock()
    carrier = QueueCarrier()
    link = Link(carrier, role="agent", clock=clock, keepalive=10, keepaliveTimeout=15)
    link.start()
    clock.advance(1)
    link.probe(2.0)
    assert [f.type for f in carrier.sent] == [FrameType.PING]
    clock.advance(1.9)
    assert carrier.closed == []
    clock.advance(0.1)
    assert carrier.closed == ["probe timeout"]
    assert clock.getDelayedCalls() == []


def test_probeAnsweredKeepsTheLink() -> None:
    """
    A probe that is answered (any bytes) leaves the link open.
    """
    clock = Clock()
    carrier = QueueCarrier()
    link = Link(carrier, role="agent", clock=clock, keepalive=10, keepaliveTimeout=15)
    link.start()
    link.probe(2.0)
    clock.advance(0.5)
    link.dataReceived(encodeFrame(FrameType.PONG, 0, b"\x00" * 8))
    clock.advance(5)
    assert carrier.closed == []
    link.connectionLost()
    assert clock.getDelayedCalls() == []


def test_anyBytesCountAsLife() -> None:
    """
    Hearing anything (not only PONG) resets the silence timer.
    """
    clock = Clock()
    carrier = QueueCarrier()
    link = Link(carrier, role="relay", clock=clock, keepalive=10, keepaliveTimeout=25)
    link.start()
    for _ in range(20):
        clock.advance(10)
        link.dataReceived(encodeJSON(FrameType.CONTROL, 0, {"op": "noop"}))
    assert carrier.closed == []
    link.connectionLost()
    assert clock.getDelayedCalls() == []


def test_keepaliveBetweenPeers() -> None:
    """
    Two started links that pump to each other keep each other alive
    indefinitely; after both are lost no delayed call is left.
    """
    pair = Pair()
    pair.relay.start()
    pair.agent.start()
    for _ in range(50):
        pair.clock.advance(5)
        pair.pump()
    assert pair.relayCarrier.closed == pair.agentCarrier.closed == []
    assert FrameType.PONG in pair.agentCarrier.kinds() and FrameType.PONG in pair.relayCarrier.kinds()
    pair.relay.connectionLost()
    pair.agent.connectionLost()
    assert pair.clock.getDelayedCalls() == []


def test_noKeepaliveWhenDisabled() -> None:
    """
    C{keepalive=0} schedules nothing.
    """
    clock = Clock()
    link = Link(QueueCarrier(), role="relay", clock=clock, keepalive=0)
    link.start()
    assert clock.getDelayedCalls() == []


def test_badRole() -> None:
    """
    The role decides stream id parity, so it must be relay or agent.
    """
    with pytest.raises(ValueError, match="role"):
        Link(QueueCarrier(), role="peer", clock=Clock())


def test_byteCounters() -> None:
    """
    The link counts the bytes it sends and receives.
    """
    pair = Pair()
    stream, *_ = pair.open()
    stream.write(b"x" * 100)
    pair.pump()
    assert pair.relay.bytesOut == sum(len(encodeFrame(f.type, f.stream, f.payload)) for f in pair.relayCarrier.sent)
    assert pair.agent.bytesIn == pair.relay.bytesOut


def test_pull_producer_with_tiny_writes_does_not_recurse() -> None:
    """
    A pull (non-streaming) producer writing 10 bytes per call fills the
    whole window without recursing, and resumes when credit returns.
    """
    from twisted.internet.task import Clock

    from txtunnel.link import DEFAULT_WINDOW, Link

    class Sink:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def sendLinkBytes(self, data: bytes) -> None:
            self.sent.append(data)

        def closeLink(self, reason: str) -> None:
            pass

    link = Link(Sink(), role="relay", clock=Clock(), keepalive=0)
    stream = link.openStream({"tunnel": 1})

    class Tiny:
        calls = 0

        def resumeProducing(self) -> None:
            self.calls += 1
            stream.write(b"x" * 10)

        def stopProducing(self) -> None:
            pass

    producer = Tiny()
    stream.registerProducer(producer, False)
    assert producer.calls >= DEFAULT_WINDOW // 10
    assert stream._outBytes <= 10
    before = producer.calls
    stream._windowFrame(1000)
    assert producer.calls > before
