"""
Unit and property tests for L{txtunnel.http1}: HTTP/1.1 request framing that
passes body bytes through unchanged, checked against C{h11} as an oracle.
"""

from __future__ import annotations

from typing import Any

import attrs
import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txtunnel.http1 import (
    MAX_HEAD,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    BodyBytes,
    HTTPError,
    RawBytes,
    RequestEnd,
    RequestFramer,
    RequestHead,
    errorResponse,
    parseHead,
)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Event = Any

# -- request generation


TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=12)
FRAMING_NAMES = {"content-length", "transfer-encoding", "host", "connection", "upgrade", "expect", "te", "trailer"}
headerNames = TOKEN.filter(lambda n: n.lower() not in FRAMING_NAMES and not n.lower().startswith("x-forwarded"))
headerValues = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20).map(str.strip)
targets = st.builds(
    lambda path, query: "/" + path + (("?" + query) if query else ""),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-._~/%", max_size=20),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789=&", max_size=10),
)


def caseVariant(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper()])


@attrs.frozen
class Req:
    """
    One generated request: its wire bytes, and what it means.
    """

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    data: bytes  # the body content, de-chunked
    trailers: tuple[tuple[str, str], ...]
    head: bytes
    rawBody: bytes  # the body as sent, chunk framing included

    @property
    def wire(self) -> bytes:
        return self.head + self.rawBody


@st.composite
def chunkedBodies(draw: st.DrawFn) -> tuple[bytes, bytes, tuple[tuple[str, str], ...]]:
    """
    A chunked body with random chunk sizes, hex case, extensions and trailers.
    """
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=5))
    raw = b""
    for chunk in chunks:
        size = f"{len(chunk):x}"
        if draw(st.booleans()):
            size = size.upper()
        if draw(st.booleans()):
            size = "0" * draw(st.integers(1, 3)) + size
        ext = ""
        if draw(st.booleans()):
            ext = ";" + draw(TOKEN) + draw(st.sampled_from(["", "=" + draw(TOKEN), '="q v"']))
        raw += f"{size}{ext}\r\n".encode() + chunk + b"\r\n"
    raw += b"0" + (b";last" if draw(st.booleans()) else b"") + b"\r\n"
    trailers = tuple(draw(st.lists(st.tuples(headerNames, headerValues), max_size=3)))
    for name, value in trailers:
        raw += f"{name}: {value}\r\n".encode()
    raw += b"\r\n"
    return raw, b"".join(chunks), trailers


@st.composite
def requests(draw: st.DrawFn) -> Req:
    """
    A valid HTTP/1.1 request with no body, a Content-Length body or a chunked body.
    """
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    target = draw(targets)
    headers: list[tuple[str, str]] = [
        (draw(caseVariant("Host")), draw(st.sampled_from(["a.localhost", "b.localhost:8080", "127.0.0.1"])))
    ]
    headers += draw(st.lists(st.tuples(headerNames, headerValues), max_size=6))
    kind = draw(st.sampled_from(["none", "length", "chunked"]))
    trailers: tuple[tuple[str, str], ...] = ()
    if kind == "length":
        data = draw(st.binary(max_size=200))
        rawBody = data
        headers.append((draw(caseVariant("Content-Length")), str(len(data))))
    elif kind == "chunked":
        rawBody, data, trailers = draw(chunkedBodies())
        headers.append((draw(caseVariant("Transfer-Encoding")), draw(caseVariant("chunked"))))
    else:
        data = rawBody = b""
    headers = draw(st.permutations(headers))
    head = f"{method} {target} HTTP/1.1\r\n".encode()
    for name, value in headers:
        sep = draw(st.sampled_from([": ", ":", ":  "]))
        head += f"{name}{sep}{value}\r\n".encode()
    head += b"\r\n"
    return Req(method, target, tuple(headers), data, trailers, head, rawBody)


def headOf(event: Event) -> RequestHead:
    assert isinstance(event, RequestHead), event
    return event


def splitAt(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(set(cuts))
    pieces = []
    start = 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def feedPieces(pieces: list[bytes], framer: RequestFramer | None = None) -> list[Event]:
    framer = framer or RequestFramer()
    events: list[Event] = []
    for piece in pieces:
        events.extend(framer.feed(piece))
    return events


def group(events: list[Event]) -> list[tuple[RequestHead, bytes, bool]]:
    """
    Group framer events into (head, raw body, ended) per request, checking
    that they come in a valid order.
    """
    out: list[tuple[RequestHead, bytes, bool]] = []
    current: list[Any] | None = None
    for event in events:
        if isinstance(event, RequestHead):
            assert current is None, "a head before the previous request ended"
            current = [event, b"", False]
        elif isinstance(event, BodyBytes):
            assert current is not None, "body bytes outside a request"
            current[1] += event.data
        elif isinstance(event, RequestEnd):
            assert current is not None, "RequestEnd outside a request"
            current[2] = True
            out.append((current[0], current[1], True))
            current = None
        else:
            raise AssertionError(f"unexpected {event!r}")
    if current is not None:
        out.append((current[0], current[1], False))
    return out


def dechunk(raw: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """
    Decode a complete, valid chunked body: (data, trailers).
    """
    data = b""
    pos = 0
    while True:
        end = raw.index(b"\r\n", pos)
        size = int(raw[pos:end].split(b";", 1)[0], 16)
        pos = end + 2
        if size == 0:
            break
        data += raw[pos : pos + size]
        assert raw[pos + size : pos + size + 2] == b"\r\n"
        pos += size + 2
    trailers = []
    while True:
        end = raw.index(b"\r\n", pos)
        line = raw[pos:end]
        pos = end + 2
        if not line:
            break
        name, value = line.split(b":", 1)
        trailers.append((name.lower(), value.strip()))
    assert pos == len(raw)
    return data, trailers


def h11Parse(wire: bytes) -> list[dict[str, Any]]:
    """
    What h11's server side makes of C{wire}: one dict per request.
    """
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(wire)
    out: list[dict[str, Any]] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            break
        if isinstance(event, h11.Request):
            out.append({"request": event, "data": b"", "trailers": []})
        elif isinstance(event, h11.Data):
            out[-1]["data"] += event.data
        elif isinstance(event, h11.EndOfMessage):
            out[-1]["trailers"] = list(event.headers)
            conn.send(h11.Response(status_code=204, headers=[]))
            conn.send(h11.EndOfMessage())
            conn.start_next_cycle()
        else:
            raise AssertionError(f"h11 gave {event!r}")
    return out


# -- the oracle property


@SETTINGS
@given(reqs=st.lists(requests(), min_size=1, max_size=4), data=st.data())
def test_framingMatchesH11(reqs: list[Req], data: st.DataObject) -> None:
    """
    A keep-alive sequence of requests, fed in arbitrary pieces: the framer's
    heads and raw bodies reproduce the input byte for byte, and it sees the
    same requests, bodies and trailers that h11 parses from the same bytes.
    """
    wire = b"".join(r.wire for r in reqs)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
    events = feedPieces(splitAt(wire, cuts))

    # (a) nothing added, nothing lost
    raw = b"".join(e.raw if isinstance(e, RequestHead) else e.data for e in events if not isinstance(e, RequestEnd))
    assert raw == wire

    # (b) same request boundaries as h11, and the same meaning
    grouped = group(events)
    oracle = h11Parse(wire)
    assert len(grouped) == len(oracle) == len(reqs)
    assert (
        sum(isinstance(e, RequestHead) for e in events) == sum(isinstance(e, RequestEnd) for e in events) == len(reqs)
    )
    for (head, body, ended), parsed, req in zip(grouped, oracle, reqs, strict=True):
        assert ended
        assert head.raw == req.head
        assert body == req.rawBody
        request = parsed["request"]
        assert head.method == request.method
        assert head.target == request.target
        # h11 lower-cases names, and Transfer-Encoding's value
        ours = [(k.lower(), v.lower() if k.lower() == b"transfer-encoding" else v) for k, v in head.headers]
        assert ours == list(request.headers)
        assert head.upgrade is False
        if head.header(b"transfer-encoding") is not None:
            content, trailers = dechunk(body)
            assert trailers == parsed["trailers"]
        else:
            content = body
        assert content == parsed["data"] == req.data


@SETTINGS
@given(reqs=st.lists(requests(), min_size=1, max_size=3), cut=st.integers(0, 10**6))
def test_incompleteInputWaits(reqs: list[Req], cut: int) -> None:
    """
    A prefix of a request sequence never raises and never reports more than
    it holds: every event is backed by bytes of the prefix, and C{idle} is
    true exactly at request boundaries.
    """
    wire = b"".join(r.wire for r in reqs)
    prefix = wire[: cut % (len(wire) + 1)]
    framer = RequestFramer()
    events = framer.feed(prefix)
    raw = b"".join(e.raw if isinstance(e, RequestHead) else e.data for e in events if not isinstance(e, RequestEnd))
    assert prefix.startswith(raw)
    boundaries = {0}
    total = 0
    for r in reqs:
        total += len(r.wire)
        boundaries.add(total)
    assert framer.idle == (len(prefix) in boundaries)


@SETTINGS
@given(
    req=requests(), clientIP=st.sampled_from(["203.0.113.9", "2001:db8::1"]), proto=st.sampled_from(["http", "https"])
)
def test_withForwardedProperty(req: Req, clientIP: str, proto: str) -> None:
    """
    C{withForwarded} keeps the request line and every other header line byte
    for byte, in order, and adds exactly one of each X-Forwarded header.
    """
    head = parseHead(req.head)
    out = head.withForwarded(clientIP, proto, b"a.localhost")
    lines = out.split(b"\r\n")
    assert out.endswith(b"\r\n\r\n")
    original = req.head[:-4].split(b"\r\n")
    assert lines[: len(original)] == original
    assert lines[len(original) :] == [
        b"X-Forwarded-For: " + clientIP.encode(),
        f"X-Forwarded-Proto: {proto}".encode(),
        b"X-Forwarded-Host: a.localhost",
        b"",
        b"",
    ]
    reparsed = parseHead(out)
    assert reparsed.method == head.method and reparsed.target == head.target


# -- simple cases


GET = b"GET /x?y=1 HTTP/1.1\r\nHost: demo.localhost\r\n\r\n"


def test_simpleGet() -> None:
    """
    A GET with no body is a head and an end, with its fields parsed.
    """
    events = RequestFramer().feed(GET)
    assert len(events) == 2
    head, end = events
    assert isinstance(head, RequestHead) and isinstance(end, RequestEnd)
    assert head.method == b"GET" and head.target == b"/x?y=1" and head.version == "1.1"
    assert head.path == b"/x"
    assert head.header(b"host") == b"demo.localhost"
    assert head.header(b"missing") is None
    assert head.raw == GET


def test_http10Accepted() -> None:
    """
    HTTP/1.0 requests are framed too.
    """
    (head, _end) = RequestFramer().feed(b"GET / HTTP/1.0\r\n\r\n")
    assert headOf(head).version == "1.0"


def test_emptyFeedMidBody() -> None:
    """
    Feeding no bytes in the middle of a body produces no event at all (not an
    empty L{BodyBytes}).
    """
    framer = RequestFramer()
    framer.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    assert framer.feed(b"") == []
    assert framer.feed(b"12345") == [BodyBytes(b"12345")]
    assert framer.feed(b"") == []
    assert framer.feed(b"67890GET") == [BodyBytes(b"67890"), RequestEnd()]
    assert not framer.idle


def test_largeBodyPassesThroughInPieces() -> None:
    """
    A large body fed in pieces comes out as the same pieces, with no
    buffering, then the request ends exactly at its length.
    """
    framer = RequestFramer()
    framer.feed(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n")
    piece = b"z" * 65536
    for _ in range(4):
        assert framer.feed(piece) == [BodyBytes(piece)]
    rest = b"z" * (300000 - 4 * 65536)
    assert framer.feed(rest + GET) == [BodyBytes(rest), RequestEnd(), parseHead(GET), RequestEnd()]
    assert framer.idle


# -- bad input


def errorOf(data: bytes, *, byteByByte: bool = False) -> HTTPError:
    framer = RequestFramer()
    with pytest.raises(HTTPError) as info:
        if byteByByte:
            for i in range(len(data)):
                framer.feed(data[i : i + 1])
        else:
            framer.feed(data)
    return info.value


CHUNKED = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
BAD_INPUTS = {
    "bare LF in request line": (b"GET / HTTP/1.1\nHost: x\r\n\r\n", 400),
    "bare LF in a header": (b"GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", 400),
    "bare LF ending the head": (b"GET / HTTP/1.1\r\nHost: x\r\n\nGET /y HTTP/1.1\r\nHost: y\r\n\r\n", 400),
    "CL and TE": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    "TE and CL": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
    "conflicting CL": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    "CL list": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\n", 400),
    "CL not a number": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: five\r\n\r\n", 400),
    "TE not ending chunked": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
    "TE in HTTP/1.0": (b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "bad chunk size": (CHUNKED + b"zz\r\nhi\r\n0\r\n\r\n", 400),
    "empty chunk size": (CHUNKED + b"\r\nhi\r\n0\r\n\r\n", 400),
    "negative chunk size": (CHUNKED + b"-1\r\n", 400),
    "huge chunk size": (CHUNKED + b"1000000000000000\r\n", 400),
    "bare LF after chunk size": (CHUNKED + b"5\n\r\nhello\r\n0\r\n\r\n", 400),
    "missing CRLF after chunk": (CHUNKED + b"5\r\nhelloXX0\r\n\r\n", 400),
    "bare LF after chunk": (CHUNKED + b"5\r\nhello\n0\r\n\r\n", 400),
    "bare LF in trailers": (CHUNKED + b"0\r\nX-T: a\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "chunk size line too long": (CHUNKED + b"5;" + b"e" * 5000, 400),
    "long request line": (b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "long request line, incomplete": (b"GET /" + b"a" * (MAX_REQUEST_LINE + 10), 414),
    "head too big": (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
    "head too big, incomplete": (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HEAD, 431),
    "too many headers": (
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS)) + b"\r\n",
        431,
    ),
    "HTTP/2.0 request line": (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    "space in header name": (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
@pytest.mark.parametrize("byteByByte", [False, True], ids=["whole", "bytewise"])
def test_badInput(name: str, byteByByte: bool) -> None:
    """
    Each kind of bad input is an L{HTTPError} with the right status and a
    reason, however it is split.
    """
    data, status = BAD_INPUTS[name]
    if byteByByte and len(data) > 20000:
        pieces = [data[:-3], data[-3:]]
        framer = RequestFramer()
        with pytest.raises(HTTPError) as info:
            for piece in pieces:
                framer.feed(piece)
        error = info.value
    else:
        error = errorOf(data, byteByByte=byteByByte)
    assert error.status == status
    assert error.reason
    assert str(error) == f"{status} {error.reason}"


def test_exactlyMaxHeadersAccepted() -> None:
    """
    The header-count limit is inclusive: C{MAX_HEADERS} fields are fine.
    """
    data = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS)) + b"\r\n"
    (head, _end) = RequestFramer().feed(data)
    assert len(headOf(head).headers) == MAX_HEADERS


def test_smallerMaxHead() -> None:
    """
    The head limit is the framer's own setting.
    """
    with pytest.raises(HTTPError) as info:
        RequestFramer(maxHead=64).feed(b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 64 + b"\r\n\r\n")
    assert info.value.status == 431


def test_contentLengthListRefused() -> None:
    """
    A Content-Length list is refused rather than guessed at, even when its
    values agree.
    """
    error = errorOf(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc")
    assert error.status == 400


# -- upgrades


def test_upgradeSwitchesToRaw() -> None:
    """
    After an upgrade request every byte is L{RawBytes}, as it came, even if
    it looks like HTTP.
    """
    framer = RequestFramer()
    head = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    events = framer.feed(head + b"\x81\x05hello")
    assert isinstance(events[0], RequestHead) and events[0].upgrade
    assert events[1:] == [RequestEnd(), RawBytes(b"\x81\x05hello")]
    assert framer.feed(GET) == [RawBytes(GET)]
    assert framer.feed(b"\n\n\x00") == [RawBytes(b"\n\n\x00")]
    assert framer.feed(b"") == []


def test_upgradeWithBodyThenRaw() -> None:
    """
    An upgrade request's own body is framed first; what follows it is raw.
    """
    framer = RequestFramer()
    head = b"POST / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: foo\r\nContent-Length: 3\r\n\r\n"
    events = framer.feed(head + b"ab")
    assert events[1:] == [BodyBytes(b"ab")]
    assert framer.feed(b"cRAW") == [BodyBytes(b"c"), RequestEnd(), RawBytes(b"RAW")]


def test_upgradeHeaderWithoutConnectionIsNotUpgrade() -> None:
    """
    C{Upgrade} without C{Connection: upgrade} is an ordinary request.
    """
    events = RequestFramer().feed(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n" + GET)
    assert [type(e) for e in events] == [RequestHead, RequestEnd, RequestHead, RequestEnd]
    assert not headOf(events[0]).upgrade


def test_connectSwitchesToRaw() -> None:
    """
    CONNECT is a tunnel: after its head the bytes are raw.
    """
    framer = RequestFramer()
    events = framer.feed(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01")
    assert headOf(events[0]).method == b"CONNECT" and headOf(events[0]).upgrade
    assert events[1:] == [RequestEnd(), RawBytes(b"\x16\x03\x01")]
    assert framer.feed(b"more") == [RawBytes(b"more")]


# -- withForwarded


def test_withForwardedAppends() -> None:
    """
    An existing X-Forwarded-For (all of them, in any case) is extended with
    the client address; X-Forwarded-Proto/Host are replaced; every other line
    keeps its bytes and order.
    """
    raw = (
        b"GET /p HTTP/1.1\r\n"
        b"hOsT:   demo.localhost  \r\n"
        b"x-forwarded-for: 10.0.0.1\r\n"
        b"X-Forwarded-Proto: gopher\r\n"
        b"Accept:*/*\r\n"
        b"X-FORWARDED-FOR: 10.0.0.2, 10.0.0.3\r\n"
        b"X-Forwarded-Host: evil.example\r\n"
        b"X-Forwarded-Port: 1\r\n"
        b"\r\n"
    )
    out = parseHead(raw).withForwarded("198.51.100.7", "https", b"demo.localhost")
    assert out == (
        b"GET /p HTTP/1.1\r\n"
        b"hOsT:   demo.localhost  \r\n"
        b"Accept:*/*\r\n"
        b"X-Forwarded-Port: 1\r\n"
        b"X-Forwarded-For: 10.0.0.1, 10.0.0.2, 10.0.0.3, 198.51.100.7\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: demo.localhost\r\n"
        b"\r\n"
    )


def test_withForwardedEmptyExisting() -> None:
    """
    An empty X-Forwarded-For adds no empty list element.
    """
    out = parseHead(b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For:\r\n\r\n").withForwarded("1.2.3.4", "http", b"x")
    assert b"X-Forwarded-For: 1.2.3.4\r\n" in out
    assert out.count(b"X-Forwarded-For") == 1


def test_withForwardedParsesWithH11() -> None:
    """
    The rewritten head is a request h11 accepts, with the added headers.
    """
    out = parseHead(GET).withForwarded("192.0.2.1", "http", b"demo.localhost")
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(out)
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    headers = dict(request.headers)
    assert headers[b"x-forwarded-for"] == b"192.0.2.1"
    assert headers[b"x-forwarded-proto"] == b"http"
    assert headers[b"x-forwarded-host"] == b"demo.localhost"


# -- errorResponse


@pytest.mark.parametrize("status", [400, 404, 414, 418, 426, 431, 502, 503, 504, 505])
@pytest.mark.parametrize(
    "reason", ["no tunnel named 'x' on this relay", "naïve ünïcode reason", "line\r\nbreak: in reason"]
)
def test_errorResponseIsValid(status: int, reason: str) -> None:
    """
    C{errorResponse} is a complete HTTP/1.1 response that an h11 client reads
    to its end by Content-Length, carrying the reason, and closing the
    connection.
    """
    data = errorResponse(status, reason)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    response = conn.next_event()
    assert isinstance(response, h11.Response)
    assert response.status_code == status
    headers = dict(response.headers)
    assert headers[b"connection"] == b"close"
    assert headers[b"content-type"].startswith(b"text/plain")
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            assert isinstance(event, h11.EndOfMessage)
            break
    assert int(headers[b"content-length"]) == len(body)
    assert reason.encode("utf-8") in body
    assert body.startswith(f"{status} ".encode())
    assert conn.their_state is h11.MUST_CLOSE or conn.their_state is h11.DONE
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), h11.ConnectionClosed)


# -- fuzzing: arbitrary and mutated bytes


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """
    C{data} with each edit applied: (0, i, b) replaces a byte, (1, i, b)
    inserts one, (2, i, _) deletes one, (3, i, n) repeats a slice.
    """
    out = bytearray(data)
    for op, where, value in edits:
        i = where % (len(out) + 1)
        if op == 0 and i < len(out):
            out[i] = value
        elif op == 1:
            out.insert(i, value)
        elif op == 2 and i < len(out):
            del out[i]
        elif op == 3:
            out[i:i] = out[i : i + 16] * (value % 64)
    return bytes(out)


def fuzzFeed(framer: RequestFramer, pieces: list[bytes]) -> list[Event]:
    """
    Feed C{pieces}; return the events of the calls that did not raise.
    Anything but L{HTTPError} fails the test, and between calls the framer
    never buffers more than a head's worth (plus the piece just given).
    """
    events: list[Event] = []
    for piece in pieces:
        try:
            events.extend(framer.feed(piece))
        except HTTPError as e:
            assert 400 <= e.status < 600, e
            break
        assert len(framer._buf) <= MAX_HEAD + len(piece), len(framer._buf)
    return events


@SETTINGS
@given(data=st.binary(max_size=2048), cuts=st.lists(st.integers(0, 2048), max_size=8))
def test_arbitraryBytesOnlyHTTPError(data: bytes, cuts: list[int]) -> None:
    """
    Any bytes at all, in any pieces: the framer answers with events or an
    L{HTTPError}, never another exception, and its buffer stays bounded.
    """
    fuzzFeed(RequestFramer(), splitAt(data, cuts))


@SETTINGS
@given(
    reqs=st.lists(requests(), min_size=1, max_size=3),
    edits=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    data=st.data(),
)
def test_mutatedRequestsOnlyHTTPError(reqs: list[Req], edits: list[tuple[int, int, int]], data: st.DataObject) -> None:
    """
    Valid requests followed by a mutated copy of them, in pieces: the valid
    requests come out whole (every head and body byte, in order, before
    anything from the mutated part), and the mutated part yields events
    or an L{HTTPError}, nothing else.
    """
    wire = b"".join(r.wire for r in reqs)
    framer = RequestFramer()
    good = fuzzFeed(framer, splitAt(wire, data.draw(st.lists(st.integers(0, len(wire)), max_size=6))))
    raw = b"".join(e.raw if isinstance(e, RequestHead) else e.data for e in good if not isinstance(e, RequestEnd))
    assert raw == wire
    assert sum(isinstance(e, RequestEnd) for e in good) == len(reqs) and framer.idle
    bad = mutate(wire, edits)
    fuzzFeed(framer, splitAt(bad, data.draw(st.lists(st.integers(0, len(bad)), max_size=6))))


def test_hugeGarbageStaysBounded() -> None:
    """
    A megabyte without a line end is refused once the head limit is
    passed, fed all at once or in pieces, with no more than a head's worth
    kept in between.
    """
    for pieces in ([b"G" * 1_000_000], [b"G" * 1000] * 1000):
        framer = RequestFramer()
        with pytest.raises(HTTPError) as info:
            for piece in pieces:
                framer.feed(piece)
                assert len(framer._buf) <= MAX_HEAD
        assert info.value.status in (400, 414, 431)
