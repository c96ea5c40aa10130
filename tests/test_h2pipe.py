"""
L{txtunnel.h2pipe.H2Pipe} between a real C{h2} connection and a link
stream in memory (the link pair of C{test_link}): messages become HTTP/2
frames and back, and a hostile peer on the link gets its stream reset
without touching the HTTP/2 connection's other streams.
"""

from __future__ import annotations

from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset, TrailersReceived

from tests.test_link import Pair
from txtunnel.h2messages import MessageDecoder, encodeData, encodeHeaders, encodeTrailers
from txtunnel.h2pipe import H2Pipe
from txtunnel.link import StreamReset as LinkStreamReset


class Owner:
    """
    The relay's side of an HTTP/2 connection, as a pipe sees it.
    """

    def __init__(self) -> None:
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.conn.initiate_connection()
        self.paused = False
        self.sent = bytearray()
        self.done: list[H2Pipe] = []
        self.flush()

    def flush(self) -> None:
        self.sent += self.conn.data_to_send()

    def newStream(self, pipe: H2Pipe) -> int:
        raise AssertionError("not used on the relay's side")

    def pipeDone(self, pipe: H2Pipe) -> None:
        self.done.append(pipe)


class Visitor:
    """
    An HTTP/2 client talking to the L{Owner}.
    """

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.events: list[Any] = []

    def request(self, end: bool = True) -> int:
        sid = int(self.conn.get_next_available_stream_id())
        head = [(b":method", b"POST"), (b":path", b"/s/M"), (b":scheme", b"http"), (b":authority", b"a.localhost")]
        self.conn.send_headers(sid, head, end_stream=end)
        self.owner.conn.receive_data(self.conn.data_to_send())
        return sid

    def read(self) -> list[Any]:
        data, self.owner.sent[:] = bytes(self.owner.sent), b""
        events = self.conn.receive_data(data)
        self.owner.conn.receive_data(self.conn.data_to_send())
        self.events += events
        return events


def _setUp() -> tuple[Pair, Owner, Visitor, H2Pipe, int]:
    pair = Pair(window=1 << 20)
    owner = Owner()
    visitor = Visitor(owner)
    sid = visitor.request()
    pipe = H2Pipe(owner, sid, responseSide=True)
    pipe.h2Headers([(b":method", b"POST"), (b":path", b"/s/M")])
    pipe.h2Ended()
    pair.relay.openStream({"tunnel": 1, "h2": 1}, pipe)
    pair.pump()
    visitor.read()
    return pair, owner, visitor, pipe, sid


def test_messages_become_frames() -> None:
    """
    The request head reaches the agent as a HEADERS message and a FIN; the
    agent's head, body and trailers reach the visitor as HTTP/2 frames
    ending the stream.
    """
    pair, owner, visitor, pipe, sid = _setUp()
    agentSide = pair.protocols[0]
    decoder = MessageDecoder()
    events = decoder.feed(bytes(agentSide.data))
    assert [type(e).__name__ for e in events] == ["Headers"]
    assert "readLost" in agentSide.events
    stream = pair.accepted[0]
    stream.write(encodeHeaders([(b":status", b"200"), (b"content-type", b"application/grpc")]))
    stream.write(encodeData(b"\x00\x00\x00\x00\x02hi"))
    stream.write(encodeTrailers([(b"grpc-status", b"0")]))
    stream.loseWriteConnection()
    pair.pump()
    got = [e for e in visitor.read() if hasattr(e, "stream_id")]
    kinds = [type(e) for e in got]
    assert kinds[:1] == [ResponseReceived]
    assert DataReceived in kinds and TrailersReceived in kinds and StreamEnded in kinds
    assert pipe.finished and owner.done == [pipe]


def test_trailers_only_response() -> None:
    """
    A lone TRAILERS message (gRPC's trailers-only answer) is one HEADERS
    frame that ends the stream.
    """
    pair, owner, visitor, pipe, sid = _setUp()
    stream = pair.accepted[0]
    stream.write(encodeTrailers([(b":status", b"200"), (b"grpc-status", b"5"), (b"grpc-message", b"nope")]))
    stream.loseWriteConnection()
    pair.pump()
    got = [e for e in visitor.read() if hasattr(e, "stream_id")]
    assert isinstance(got[0], ResponseReceived)
    assert got[0].stream_ended is not None
    assert (b"grpc-status", b"5") in got[0].headers


@pytest.mark.parametrize(
    "hostile",
    [
        b"\x09\x00\x00\x00\x01x",  # unknown kind
        b"\x01\x00\x10\x00\x01",  # a header block over 64 KiB
        encodeData(b"body first"),  # DATA before the head
        b"\x01\x00\x00\x00\x05\x00\x00\x00\x00\x00",  # an empty field name
        encodeHeaders([(b":status", b"200")]) + encodeHeaders([(b":status", b"200")]),  # two heads
        encodeHeaders([(b":status", b"200"), (b"x-bad", b"a\r\nb")]),  # a line break in a value
    ],
)
def test_hostile_agent_resets_only_its_stream(hostile: bytes) -> None:
    """
    Bad messages from the link reset the visitor's stream (PROTOCOL_ERROR)
    and the link stream (code C{protocol}); the connection lives on.
    """
    pair, owner, visitor, pipe, sid = _setUp()
    stream = pair.accepted[0]
    stream.write(hostile)
    pair.pump()
    got = visitor.read()
    resets = [e for e in got if isinstance(e, StreamReset)]
    assert resets and resets[0].error_code == ErrorCodes.PROTOCOL_ERROR
    reason = pair.protocols[0].reason
    assert reason is not None and isinstance(reason.value, LinkStreamReset) and reason.value.code == "protocol"
    assert pipe.finished
    # The HTTP/2 connection still serves another stream.
    other = visitor.request()
    assert other == sid + 2
    assert not any(type(e).__name__ == "ConnectionTerminated" for e in visitor.read())


def test_visitor_reset_resets_the_link_stream() -> None:
    """
    RST_STREAM from the visitor becomes a link RESET with code C{cancel}.
    """
    pair, owner, visitor, pipe, sid = _setUp()
    pipe.h2Reset(ErrorCodes.CANCEL)
    pair.pump()
    reason = pair.protocols[0].reason
    assert reason is not None and isinstance(reason.value, LinkStreamReset) and reason.value.code == "cancel"
    assert pipe.finished


def test_link_fin_inside_a_message_is_an_error() -> None:
    """
    A link stream that ends halfway through a message resets the visitor's
    stream rather than ending it cleanly.
    """
    pair, owner, visitor, pipe, sid = _setUp()
    stream = pair.accepted[0]
    stream.write(encodeHeaders([(b":status", b"200")]) + encodeData(b"12345")[:-2])
    stream.loseWriteConnection()
    pair.pump()
    got = visitor.read()
    assert any(isinstance(e, StreamReset) for e in got)
    assert not any(isinstance(e, StreamEnded) for e in got)


@pytest.mark.parametrize(
    "code, linkCode",
    [
        (ErrorCodes.CANCEL, "cancel"),
        (ErrorCodes.REFUSED_STREAM, "refused"),
        (ErrorCodes.ENHANCE_YOUR_CALM, "h2-11"),
        (ErrorCodes.INTERNAL_ERROR, "h2-2"),
    ],
)
def test_reset_codes_cross_the_link(code: ErrorCodes, linkCode: str) -> None:
    """
    An HTTP/2 peer's RST_STREAM code crosses the link (as a reset code of
    its own, or C{h2-N}) and the pipe on the far side resets its HTTP/2
    stream with the same code: a local gRPC server's C{REFUSED_STREAM}
    reaches the visitor as C{REFUSED_STREAM}, not as C{CANCEL}.
    """
    pair, owner, visitor, pipe, sid = _setUp()
    pipe.h2Reset(code)
    pair.pump()
    reason = pair.protocols[0].reason
    assert reason is not None and isinstance(reason.value, LinkStreamReset) and reason.value.code == linkCode

    pair, owner, visitor, pipe, sid = _setUp()
    pair.accepted[0].reset(linkCode, "from the local service")
    pair.pump()
    resets = [e for e in visitor.read() if isinstance(e, StreamReset)]
    assert resets and resets[0].error_code == code


def test_unknown_reset_codes() -> None:
    """
    Link reset codes that name no HTTP/2 code become INTERNAL_ERROR, and
    an HTTP/2 code outside RFC 9113's list an internal error on the link.
    """
    from txtunnel.h2pipe import h2Code, linkCode

    assert h2Code("h2-99") == h2Code("h2-x") == h2Code("timeout") == ErrorCodes.INTERNAL_ERROR
    assert h2Code("aborted") == h2Code("link-lost") == ErrorCodes.CANCEL
    assert linkCode(0x999) == "internal-error"
