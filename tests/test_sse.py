"""
The SSE heartbeat (L{txtunnel.sse}), sans-IO on a L{task.Clock}: where a
comment may go into an event stream, and where it must never go.
"""

from __future__ import annotations

import re

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task

from txtunnel.sse import COMMENT, COMMENT_CHUNK, SSEHeartbeat, atEventBoundary, isEventStream

GET = b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n"
HEAD = b"HEAD /events HTTP/1.1\r\nHost: x\r\n\r\n"
SSE_CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
SSE_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Beating:
    """
    One heartbeat under test: what it wrote, on a clock we move.
    """

    def __init__(self, interval: float = 15.0) -> None:
        self.clock = task.Clock()
        self.written: list[bytes] = []
        self.heartbeat = SSEHeartbeat(self.clock, interval, self.written.append)

    def request(self, data: bytes = GET) -> None:
        self.heartbeat.requestData(data)

    def response(self, data: bytes) -> None:
        self.heartbeat.responseData(data)

    def idle(self, seconds: float) -> list[bytes]:
        """
        Let time pass in one-second steps; return what was written.
        """
        before = len(self.written)
        for _ in range(int(seconds)):
            self.clock.advance(1)
        return self.written[before:]


# -- where an event ends


@pytest.mark.parametrize(
    "tail, between",
    [
        (b"", True),
        (b"\n", True),
        (b"\r\n", True),
        (b"\r", True),
        (b"x\n\n", True),
        (b"\r\n\r\n", True),
        (b"\n\r\n", True),
        (b"\r\r", True),
        (b"\n\r", True),
        (b"\r\r\n", True),
        (b"x\r\n", False),
        (b"x\n", False),
        (b"x\r", False),
        (b"abc", False),
        (b"\n\nx", False),
        (b"\r\nx", False),
    ],
)
def test_event_boundary(tail: bytes, between: bool) -> None:
    assert atEventBoundary(tail) is between


def referenceLines(stream: bytes) -> tuple[list[bytes], bool]:
    """
    Split an event stream into lines as the HTML standard does (CRLF, LF
    or CR end a line); also say whether the stream ends with a line ending.
    """
    lines = re.split(rb"\r\n|\n|\r", stream)
    return lines[:-1], lines[-1] == b""


def referenceBetween(stream: bytes) -> bool:
    """
    Between events: nothing yet, or the last complete line is blank and
    nothing of a next line has begun.
    """
    if not stream:
        return True
    lines, ended = referenceLines(stream)
    return ended and lines[-1] == b""


pieces = st.lists(st.sampled_from([b"data: x", b"id: 1", b":c", b"", b"\r\n", b"\n", b"\r", b"d"]), max_size=12)


@given(pieces)
def test_event_boundary_matches_reference(parts: list[bytes]) -> None:
    """
    The three-byte tail test agrees with a reference split into lines
    (a trailing CR counts as a line end here; see L{test_comment_after_cr}).
    """
    stream = b"".join(parts)
    assert atEventBoundary(stream[-3:]) is referenceBetween(stream)


def parseEvents(stream: bytes) -> tuple[list[tuple[str, str, str]], int]:
    """
    A reference EventSource parser: the events it dispatches as
    (type, data, last id) and how many comment lines it ignored.
    """
    if stream.startswith(b"\xef\xbb\xbf"):
        stream = stream[3:]
    lines, ended = referenceLines(stream)
    events: list[tuple[str, str, str]] = []
    comments = 0
    data: list[str] = []
    kind = ""
    lastId = ""
    for raw in lines:
        line = raw.decode("utf-8", "replace")
        if line == "":
            if data:
                events.append((kind or "message", "\n".join(data), lastId))
            data, kind = [], ""
            continue
        if line.startswith(":"):
            comments += 1
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "event":
            kind = value
        elif name == "id" and "\0" not in value:
            lastId = value
    return events, comments


def test_comment_after_cr() -> None:
    """
    A stream that pauses after a CR (perhaps the first half of a CRLF) may
    take a comment: whether the LF that may follow joins the CR or ends a
    blank line of its own, the events are the same.
    """
    stream = b"data: one\r\n\r"
    rest = b"\ndata: two\r\n\r\n"
    assert atEventBoundary(stream[-3:])
    assert parseEvents(stream + COMMENT + rest) == (parseEvents(stream + rest)[0], 1)


# -- which responses


@pytest.mark.parametrize(
    "headers, yes",
    [
        ([(b"content-type", b"text/event-stream")], True),
        ([(b"content-type", b"text/event-stream; charset=utf-8")], True),
        ([(b"content-type", b"Text/Event-Stream ;charset=UTF-8")], True),
        ([(b"content-type", b"text/event-stream"), (b"content-encoding", b"identity")], True),
        ([(b"content-type", b"text/event-stream"), (b"content-encoding", b"gzip")], False),
        ([(b"content-type", b"text/event-streams")], False),
        ([(b"content-type", b"application/x-ndjson")], False),
        ([(b"content-type", b"text/plain"), (b"content-type", b"text/event-stream")], False),
        ([], False),
    ],
)
def test_is_event_stream(headers: list[tuple[bytes, bytes]], yes: bool) -> None:
    assert isEventStream(headers) is yes


# -- when and how


def test_chunked_stream_gets_a_whole_chunk_between_events() -> None:
    """
    After N idle seconds between events, a whole chunk holding a comment;
    again every N seconds; the count starts over when the server writes.
    """
    b = Beating(interval=15)
    b.request()
    b.response(SSE_CHUNKED)
    b.response(chunk(b"data: one\n\n"))
    assert b.idle(14) == []
    assert b.idle(1) == [COMMENT_CHUNK]
    assert COMMENT_CHUNK == b"3\r\n:\n\n\r\n"
    assert b.idle(15) == [COMMENT_CHUNK]
    b.idle(10)
    b.response(chunk(b"data: two\n\n"))
    assert b.idle(14) == []
    assert b.idle(1) == [COMMENT_CHUNK]
    assert b.heartbeat.beats == 3


def test_start_of_stream_is_between_events() -> None:
    """
    A stream whose head has gone out but no event yet gets heartbeats.
    """
    b = Beating(interval=5)
    b.request()
    b.response(SSE_CHUNKED)
    assert b.idle(5) == [COMMENT_CHUNK]


def test_never_inside_an_event() -> None:
    """
    A server that pauses in the middle of an event (between its lines, or
    in the middle of a line) gets no heartbeat until the event is complete.
    """
    b = Beating(interval=5)
    b.request()
    b.response(SSE_CHUNKED)
    b.response(chunk(b"event: update\ndata: first line\n"))
    assert b.idle(60) == []
    b.response(chunk(b"data: sec"))
    assert b.idle(60) == []
    b.response(chunk(b"ond line\n"))
    assert b.idle(60) == []
    b.response(chunk(b"\n"))
    assert b.idle(5) == [COMMENT_CHUNK]


def test_never_inside_a_chunk() -> None:
    """
    A chunk that has arrived only in part holds the heartbeat back even if
    its data so far ends an event.
    """
    b = Beating(interval=5)
    b.request()
    b.response(SSE_CHUNKED)
    whole = chunk(b"data: one\n\ndata: two\n\n")
    cut = whole.index(b"\n\n") + 2
    b.response(whole[:cut])
    assert b.idle(60) == []
    b.response(whole[cut:-1])  # all but the chunk's final LF
    assert b.idle(60) == []
    b.response(whole[-1:])
    assert b.idle(5) == [COMMENT_CHUNK]


def test_close_delimited_stream_gets_plain_bytes() -> None:
    b = Beating(interval=5)
    b.request()
    b.response(SSE_CLOSE + b"data: one\r\n\r\n")
    assert b.idle(5) == [COMMENT]
    b.response(b"data: two\r\n")
    assert b.idle(30) == []


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 100\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n",
    ],
)
def test_no_heartbeat_where_it_would_change_the_body(head: bytes) -> None:
    """
    Never with a Content-Length (it would break the count), a content or
    transfer coding (the body is not plain text), or another media type.
    """
    b = Beating(interval=5)
    b.request()
    b.response(head)
    b.response(b"\n\n" if b"gzip" not in head else chunk(b"\n\n"))
    assert b.idle(60) == []
    assert b.clock.getDelayedCalls() == []


def test_no_heartbeat_for_head_or_after_the_end() -> None:
    """
    A response to HEAD has no body; a finished stream takes nothing more.
    """
    b = Beating(interval=5)
    b.request(HEAD)
    b.response(SSE_CHUNKED)
    assert b.idle(60) == []
    b.request()
    b.response(SSE_CHUNKED + chunk(b"data: x\n\n") + b"0\r\n\r\n")
    assert b.idle(60) == []
    assert b.clock.getDelayedCalls() == []


def test_pipelined_responses() -> None:
    """
    The heartbeat follows the response being sent: a plain one first, then
    an event stream on the same connection.
    """
    b = Beating(interval=5)
    b.request(GET + GET)
    b.response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab")
    assert b.idle(30) == []
    b.response(b"c" + SSE_CHUNKED + chunk(b"data: y\n"))
    assert b.idle(30) == []
    b.response(chunk(b"\n"))
    assert b.idle(5) == [COMMENT_CHUNK]


def test_stale_tail_of_an_earlier_response() -> None:
    """
    A response that ended in the middle of an event does not hold back the
    heartbeat of the next one.
    """
    b = Beating(interval=5)
    b.request(GET + GET)
    b.response(SSE_CHUNKED + chunk(b"data: cut off") + b"0\r\n\r\n")
    b.response(SSE_CHUNKED)
    assert b.idle(5) == [COMMENT_CHUNK]


def test_disabled() -> None:
    b = Beating(interval=0)
    b.request()
    b.response(SSE_CHUNKED + chunk(b"data: one\n\n"))
    assert b.clock.getDelayedCalls() == []
    assert b.idle(600) == []


def test_stop_cancels() -> None:
    b = Beating(interval=5)
    b.request()
    b.response(SSE_CHUNKED)
    assert len(b.clock.getDelayedCalls()) == 1
    b.heartbeat.stop()
    assert b.clock.getDelayedCalls() == []
    b.response(chunk(b"data: one\n\n"))
    assert b.idle(60) == []


def test_switched_protocols() -> None:
    """
    After a 101 the bytes are not HTTP: nothing is written, and the tracker
    says the connection has switched.
    """
    b = Beating(interval=5)
    b.request(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello")
    assert not b.heartbeat.switched
    b.response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert b.heartbeat.switched
    b.response(b"\n\n")
    b.request(b"GET / HTTP/1.1\r\n\r\n")  # WebSocket bytes, not a request
    assert b.idle(60) == []


def test_refused_upgrade_then_event_stream_is_left_alone() -> None:
    """
    After an upgrade request the agent no longer reads requests; if the
    server refused and the client went on with HTTP, the responses cannot
    be followed, so no heartbeat is written.
    """
    b = Beating(interval=5)
    b.request(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    b.response(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    b.request(GET)
    b.response(SSE_CHUNKED)
    assert b.idle(60) == []
    assert not b.heartbeat.switched


def test_garbage_requests_turn_it_off() -> None:
    b = Beating(interval=5)
    b.request(b"NOT HTTP AT ALL\n\n")
    b.response(SSE_CHUNKED)
    assert b.idle(60) == []


def dechunk(raw: bytes) -> bytes:
    """
    The content of a chunked response, through h11 as an oracle.
    """
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return body
        elif event is h11.NEED_DATA:
            raise AssertionError("incomplete chunked response")


events = st.lists(
    st.tuples(
        st.lists(
            st.sampled_from(["data: a", "data: β", "event: e", "id: 7", ": note", "data"]), min_size=1, max_size=3
        ),
        st.sampled_from(["\n", "\r\n", "\r"]),
    ),
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(events, st.data())
def test_heartbeats_never_change_the_events(streamEvents: list[tuple[list[str], str]], data: st.DataObject) -> None:
    """
    Whatever way an event stream is cut into chunks and TCP reads, and
    however long the server pauses after each, what the visitor's
    EventSource dispatches is the same as without heartbeats, and the
    chunked framing stays valid.
    """
    encoded = [("".join(line + end for line in lines) + end).encode() for lines, end in streamEvents]
    content = b"".join(encoded)
    eventEnds = [sum(len(e) for e in encoded[: i + 1]) for i in range(len(encoded))]
    # Cut the content into chunks (often where events end), and the whole
    # response into reads (often where chunks end).
    anywhere = st.integers(0, len(content))
    cuts = sorted(
        set(data.draw(st.lists(st.sampled_from(eventEnds) | anywhere if eventEnds else anywhere, max_size=6)))
    )
    bounds = [0, *cuts, len(content)]
    chunks = [chunk(content[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    raw = SSE_CHUNKED + b"".join(chunks) + b"0\r\n\r\n"
    chunkEnds = [len(SSE_CHUNKED) + sum(len(c) for c in chunks[: i + 1]) for i in range(len(chunks))]
    anyRead = st.integers(0, len(raw))
    readCuts = sorted(
        set(data.draw(st.lists(st.sampled_from(chunkEnds) | anyRead if chunkEnds else anyRead, max_size=8)))
    )
    readBounds = [0, *readCuts, len(raw)]

    b = Beating(interval=1)
    out: list[bytes] = []
    b.heartbeat.write = lambda beat: out.append(beat)
    b.request()
    for a, z in zip(readBounds, readBounds[1:], strict=False):
        piece = raw[a:z]
        b.response(piece)
        out.append(piece)
        b.clock.advance(data.draw(st.sampled_from([0, 1, 3])))
    sent = b"".join(out)
    assert b.clock.getDelayedCalls() == []
    received = dechunk(sent)
    assert parseEvents(received)[0] == parseEvents(content)[0]
    assert parseEvents(received)[1] == parseEvents(content)[1] + b.heartbeat.beats
