# -*- test-case-name: tests.test_http1 -*-
"""
Sans-IO HTTP/1.1 request framing for the relay's edge.

The relay must find where each request's head starts and ends (to route it by
C{Host} and add C{X-Forwarded-*}) and where its body ends (so the next request
on a keep-alive connection is routed too), while passing the body bytes,
chunk framing included, through unchanged.

Heads are parsed by C{httptools} (llhttp, in C).  Bodies are only I{framed}
here: C{httptools} and C{h11} both hand out de-chunked data with no raw
offsets, which would force the relay to re-encode every chunked body; the
chunk-boundary scanner (L{txtunnel.chunked}) keeps the bytes as they came and is
property-tested against C{h11} as an oracle.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Union

import attrs
import httptools

from txtunnel.chunked import ChunkError, ChunkScanner

__all__ = [
    "STATUS_TEXT",
    "Answer",
    "BodyBytes",
    "HTTPError",
    "RawBytes",
    "RequestEnd",
    "RequestFramer",
    "RequestHead",
    "errorResponse",
]

MAX_HEAD = 64 * 1024
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADERS = 100


class HTTPError(Exception):
    """
    A request the relay will not pass on; answered with C{status}.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@attrs.frozen
class RequestHead:
    """
    A parsed request head.  C{raw} is exactly the bytes received, ending with
    the blank line.
    """

    method: bytes
    target: bytes
    version: str
    headers: tuple[tuple[bytes, bytes], ...]
    raw: bytes
    upgrade: bool
    #: The first value of each header by lower-case name (built from
    #: C{headers}): the relay asks for C{Host} and others several times a
    #: request.
    index: dict[bytes, bytes] = attrs.field(eq=False, repr=False, init=False)

    @index.default
    def _index(self) -> dict[bytes, bytes]:
        index: dict[bytes, bytes] = {}
        for key, value in self.headers:
            index.setdefault(key.lower(), value)
        return index

    def header(self, name: bytes) -> bytes | None:
        """
        The first value of header C{name} (lower-case), or C{None}.
        """
        return self.index.get(name)

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]

    @property
    def keepAlive(self) -> bool:
        """
        Whether the client means to send more requests on this connection
        (RFC 9112 section 9.3): not after C{Connection: close}, nor from an
        HTTP/1.0 client that did not ask for C{keep-alive}.
        """
        tokens: set[bytes] = set()
        if b"connection" in self.index:
            for key, value in self.headers:
                if key.lower() == b"connection":
                    tokens.update(t.strip().lower() for t in value.split(b","))
        if b"close" in tokens:
            return False
        return self.version != "1.0" or b"keep-alive" in tokens

    def withForwarded(
        self,
        clientIP: str,
        proto: str,
        host: bytes,
        add: Sequence[tuple[bytes, bytes]] = (),
        drop: Collection[bytes] = (),
    ) -> bytes:
        """
        The head with C{X-Forwarded-For} extended by C{clientIP} and
        C{X-Forwarded-Proto}/C{-Host} set; every other byte unchanged but
        for headers named (lower-case) in C{drop}, which are removed, and
        those in C{add}, which are appended after removing any the visitor
        sent under the same names (so a visitor cannot forge them).
        """
        for name, value in add:
            if any(c in name + value for c in b"\r\n\0"):
                raise ValueError(f"header {name!r} holds a line break")
        ours = b"X-Forwarded-Proto: " + proto.encode("ascii") + b"\r\nX-Forwarded-Host: " + host
        if not drop and not add and not self.index.keys() & _FORWARDED:
            # The usual case: nothing to remove, so the head is kept as it came.
            return b"".join((self.raw[:-2], b"X-Forwarded-For: ", clientIP.encode("ascii"), b"\r\n", ours, b"\r\n\r\n"))
        replaced = {b"x-forwarded-proto", b"x-forwarded-host", *drop, *(name.lower() for name, _ in add)}
        lines = self.raw[:-4].split(b"\r\n")
        kept = [lines[0]]
        forwardedFor: list[bytes] = []
        for line in lines[1:]:
            name = line.split(b":", 1)[0].strip().lower()
            if name == b"x-forwarded-for":
                forwardedFor.append(line.split(b":", 1)[1].strip())
            elif name not in replaced:
                kept.append(line)
        forwardedFor.append(clientIP.encode("ascii"))
        kept.append(b"X-Forwarded-For: " + b", ".join(v for v in forwardedFor if v))
        kept.append(ours + b"".join(b"\r\n" + name + b": " + value for name, value in add))
        return b"\r\n".join(kept) + b"\r\n\r\n"


#: Header names that make L{RequestHead.withForwarded} rewrite the head.
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})


@attrs.frozen
class BodyBytes:
    """
    Raw bytes of the current request's body (chunk framing included).
    """

    data: bytes


@attrs.frozen
class RequestEnd:
    """
    The current request's body is complete.
    """


@attrs.frozen
class RawBytes:
    """
    Bytes after an upgrade or CONNECT: no longer HTTP/1.1, passed as they are.
    """

    data: bytes


Event = Union[RequestHead, BodyBytes, RequestEnd, RawBytes]

#: Every request ends the same way: one event for all of them.
_END = RequestEnd()


class _HeadCollector:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if len(self.headers) > MAX_HEADERS:
            raise HTTPError(431, f"more than {MAX_HEADERS} header fields")

    def on_headers_complete(self) -> None:
        self.complete = True


def parseHead(raw: bytes) -> RequestHead:
    """
    Parse one request head (ending in CRLF CRLF) with C{httptools}.

    @raise HTTPError: 400, 414 or 431 with a reason.
    """
    lineEnd = raw.find(b"\r\n")
    if lineEnd > MAX_REQUEST_LINE:
        raise HTTPError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
    if raw.count(b"\n") != raw.count(b"\r\n"):
        raise HTTPError(400, "bare LF in request head")
    collector = _HeadCollector()
    parser = httptools.HttpRequestParser(collector)
    upgrade = False
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        upgrade = True
    except httptools.HttpParserCallbackError as e:
        cause = e.__context__
        if isinstance(cause, HTTPError):
            raise cause from None
        raise HTTPError(400, f"malformed request head: {e}") from None
    except httptools.HttpParserError as e:
        raise HTTPError(400, f"malformed request head: {e}") from None
    if not collector.complete:
        raise HTTPError(400, "incomplete request head")
    method = parser.get_method()
    version = parser.get_http_version()
    if version not in ("1.0", "1.1"):
        raise HTTPError(505, f"HTTP/{version} is not supported here")
    return RequestHead(
        method=method,
        target=collector.url,
        version=version,
        headers=tuple(collector.headers),
        raw=raw,
        upgrade=upgrade or method == b"CONNECT",
    )


def bodyFraming(head: RequestHead) -> int | None:
    """
    How the body of C{head} is framed: a byte count, or C{None} for chunked.

    @raise HTTPError: for ambiguous or invalid framing (the kinds of
        request that smuggling relies on).
    """
    index = head.index
    lengths = [v for k, v in head.headers if k.lower() == b"content-length"] if b"content-length" in index else []
    codings = [v for k, v in head.headers if k.lower() == b"transfer-encoding"] if b"transfer-encoding" in index else []
    if codings:
        if lengths:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if head.version == "1.0":
            # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has
            # faulty framing; an origin may well read it differently.
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        last = b",".join(codings).split(b",")[-1].strip().lower()
        if last != b"chunked":
            raise HTTPError(400, "Transfer-Encoding must end with chunked")
        return None
    if not lengths:
        return 0
    values = {v.strip() for v in b",".join(lengths).split(b",")}
    if len(values) != 1:
        raise HTTPError(400, "conflicting Content-Length values")
    (value,) = values
    if not value.isdigit() or len(value) > 18:
        raise HTTPError(400, "invalid Content-Length")
    return int(value)


_HEAD, _LENGTH, _CHUNKED, _RAW = range(4)


class RequestFramer:
    """
    Turn a visitor's bytes into a sequence of L{RequestHead}, L{BodyBytes},
    L{RequestEnd} and, after an upgrade, L{RawBytes} events.
    """

    def __init__(self, maxHead: int = MAX_HEAD) -> None:
        self._maxHead = maxHead
        self._buf = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self._upgradeAfterBody = False
        self._chunks: ChunkScanner | None = None

    @property
    def partialHead(self) -> bool:
        """
        Part of a request head has arrived, not all of it.
        """
        return self._state == _HEAD and bool(self._buf)

    @property
    def idle(self) -> bool:
        """
        Between requests, with nothing buffered.
        """
        return self._state == _HEAD and not self._buf

    def feed(self, data: bytes) -> list[Event]:
        """
        @raise HTTPError: when the bytes are not acceptable HTTP/1.1.
        """
        events: list[Event] = []
        if self._state == _RAW:
            if data:
                events.append(RawBytes(bytes(data)))
            return events
        if not self._buf and data:
            # Fast path for the middle of a large body: no copy, no scan.
            if self._state == _LENGTH and len(data) < self._remaining:
                self._remaining -= len(data)
                return [BodyBytes(data)]
            if self._chunks is not None and len(data) < self._chunks.dataRemaining:
                self._chunks.skip(len(data))
                return [BodyBytes(data)]
        # Bytes are read where they are; only what a later call must see
        # again (a partial head or chunk line) is kept in the buffer.
        buf: bytes | bytearray
        if self._buf or not isinstance(data, bytes):
            self._buf += data
            buf = self._buf
        else:
            buf = data
        pos = 0
        body: list[bytes] = []

        def flushBody() -> None:
            if body:
                events.append(BodyBytes(b"".join(body)))
                body.clear()

        while True:
            state = self._state
            if state == _HEAD:
                newline = buf.find(b"\n", pos)
                if newline == pos or (newline > pos and buf[newline - 1] != 13):
                    raise HTTPError(400, "bare LF in request head")
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if len(buf) - pos > self._maxHead:
                        raise HTTPError(431, f"request head larger than {self._maxHead} bytes")
                    if buf.find(b"\r\n", pos, pos + MAX_REQUEST_LINE + 2) < 0 and len(buf) - pos > MAX_REQUEST_LINE:
                        raise HTTPError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
                    break
                if end + 4 - pos > self._maxHead:
                    raise HTTPError(431, f"request head larger than {self._maxHead} bytes")
                head = parseHead(bytes(buf[pos : end + 4]))
                pos = end + 4
                events.append(head)
                framing = bodyFraming(head)
                self._upgradeAfterBody = head.upgrade
                if framing is None:
                    self._state = _CHUNKED
                    self._chunks = ChunkScanner()
                elif framing > 0:
                    self._state = _LENGTH
                    self._remaining = framing
                else:
                    self._endRequest(events)
            elif state == _LENGTH:
                n = min(self._remaining, len(buf) - pos)
                if n == 0:
                    break
                body.append(bytes(buf[pos : pos + n]))
                pos += n
                self._remaining -= n
                if self._remaining == 0:
                    flushBody()
                    self._endRequest(events)
            elif state == _CHUNKED:
                chunks = self._chunks
                assert chunks is not None
                try:
                    end = chunks.feed(buf, pos)
                except ChunkError as e:
                    raise HTTPError(431 if "too large" in str(e) else 400, str(e)) from None
                if end > pos:
                    body.append(bytes(buf[pos:end]))
                    pos = end
                if not chunks.done:
                    break
                self._chunks = None
                flushBody()
                self._endRequest(events)
            else:  # _RAW
                if pos < len(buf):
                    flushBody()
                    events.append(RawBytes(bytes(buf[pos:])))
                    pos = len(buf)
                break
        flushBody()
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < len(buf):
            self._buf = bytearray(buf[pos:])
        return events

    def _endRequest(self, events: list[Event]) -> None:
        events.append(_END)
        if self._upgradeAfterBody:
            self._state = _RAW
        else:
            self._state = _HEAD


STATUS_TEXT = {
    302: "Found",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Content Too Large",
    414: "URI Too Long",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


@attrs.frozen
class Answer:
    """
    A response the relay or agent gives itself, in place of the local
    service's: a status, a short reason (the plain-text body when no
    C{body} is given) and any extra headers (C{WWW-Authenticate},
    C{Retry-After}, C{Location}, C{Set-Cookie}).  It always closes the
    connection, so nothing after it is ever read as the next response.
    """

    status: int
    reason: str
    headers: Sequence[tuple[str, str]] = ()
    body: bytes | None = None
    contentType: str = "text/plain; charset=utf-8"

    def toBytes(self) -> bytes:
        """
        The complete response, self-delimited.

        @raise ValueError: if a header name or value holds a line break.
        """
        text = STATUS_TEXT.get(self.status, "Error")
        body = self.body if self.body is not None else f"{self.status} {text}: {self.reason}\n".encode()
        lines = [
            f"HTTP/1.1 {self.status} {text}",
            f"Content-Type: {self.contentType}",
            f"Content-Length: {len(body)}",
            "Connection: close",
            "X-Txtunnel-Error: 1",
        ]
        for name, value in self.headers:
            if any(c in name + value for c in "\r\n\0"):
                raise ValueError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


def errorResponse(status: int, reason: str) -> bytes:
    """
    A complete, self-delimited plain-text response that closes the connection.
    """
    return Answer(status, reason).toBytes()
