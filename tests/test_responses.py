"""
What L{ResponseFramer} and L{ChunkScanner} tell a caller that follows the
bodies (the SSE heartbeat does): body runs, framing, chunk boundaries.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txtunnel.chunked import ChunkScanner
from txtunnel.responses import ResponseFramer


def test_chunk_spans_and_boundaries() -> None:
    """
    C{spans} locates the chunk data in the bytes fed; C{betweenChunks} is
    true only where a whole chunk could be inserted.
    """
    scanner = ChunkScanner()
    assert scanner.betweenChunks
    data = b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    spans: list[tuple[int, int]] = []
    assert scanner.feed(data[:5], 0, spans) == 5
    assert not scanner.betweenChunks
    assert scanner.feed(data[5:7], 0, spans) == 2
    assert not scanner.betweenChunks  # half of the CRLF after the data
    assert spans == [(3, 5), (0, 1)]
    spans.clear()
    rest = data[7:]
    assert scanner.feed(rest[:1], 0, spans) == 1
    assert scanner.betweenChunks
    assert scanner.feed(rest[:3], 1, spans) == 3
    assert not scanner.betweenChunks  # in a chunk size line
    assert scanner.feed(rest, 3, spans) == len(rest)
    assert [rest[a:b] for a, b in spans] == [b"de"]
    assert scanner.done and not scanner.betweenChunks


def response(status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    head = b"HTTP/1.1 %d X\r\n" % status + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
    return head + body


@pytest.mark.parametrize(
    "raw, framing",
    [
        (response(200, [(b"Content-Length", b"5")], b"ab"), "length"),
        (response(200, [(b"Transfer-Encoding", b"chunked")], b"2\r\nab"), "chunked"),
        (response(200, [(b"Connection", b"close")], b"ab"), "close"),
        (response(101, [(b"Upgrade", b"websocket")]), "raw"),
        (response(200, [(b"Content-Length", b"0")]), "head"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r", "head"),
        (b"GARBAGE\r\n\r\n", "opaque"),
    ],
)
def test_framing(raw: bytes, framing: str) -> None:
    framer = ResponseFramer()
    framer.expect(b"GET")
    framer.feed(raw)
    assert framer.framing == framing


def test_headers_are_per_response() -> None:
    framer = ResponseFramer()
    framer.expect(b"GET")
    framer.expect(b"GET")
    framer.feed(response(200, [(b"Content-Type", b"text/plain"), (b"Content-Length", b"1")], b"x"))
    first = framer.headers
    assert (b"content-type", b"text/plain") in first
    framer.feed(response(200, [(b"Content-Type", b"text/event-stream"), (b"Transfer-Encoding", b"chunked")]))
    assert framer.headers is not first
    assert (b"content-type", b"text/event-stream") in framer.headers


bodies = st.lists(st.binary(min_size=1, max_size=30), max_size=5)


@given(bodies, st.sampled_from(["length", "chunked", "close"]), st.data())
def test_on_body_sees_the_content(parts: list[bytes], kind: str, data: st.DataObject) -> None:
    """
    However the bytes are split, C{onBody} hands over exactly the content
    of the body (de-chunked) and nothing of the heads around it.
    """
    content = b"".join(parts)
    if kind == "length":
        raw = response(200, [(b"Content-Length", b"%d" % len(content))], content)
    elif kind == "chunked":
        raw = response(200, [(b"Transfer-Encoding", b"chunked")])
        raw += b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-Trailer: t\r\n\r\n"
    else:
        raw = response(200, [(b"Connection", b"close")], content)
    if kind != "close":
        raw += response(204, [])
    seen: list[bytes] = []
    framer = ResponseFramer()
    framer.onBody = lambda d, a, b: seen.append(bytes(d[a:b]))
    framer.expect(b"GET")
    framer.expect(b"GET")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    done: list[int] = []
    for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        done += framer.feed(raw[a:b])
    assert b"".join(seen) == content
    assert done == ([200, 204] if kind != "close" else [])
