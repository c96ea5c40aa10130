# -*- test-case-name: tests.test_responses -*-
"""
Sans-IO HTTP/1.1 response framing: where each response on a connection ends.

The relay's edge passes response bytes to the visitor unchanged, but it must
know when the responses to the requests it forwarded are complete: to switch
a keep-alive connection to another tunnel, to answer a visitor who half-closed
only after the last response, and to tell whether a response had started when
a stream fails (a 502 can only be sent before the first byte).  Heads are
parsed by C{httptools}; bodies are counted, never copied or decoded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import httptools

from txtunnel.chunked import ChunkError, ChunkScanner

__all__ = ["ResponseFramer"]

MAX_RESPONSE_HEAD = 64 * 1024

_HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _RAW, _OPAQUE = range(6)

_FRAMING = {
    _HEAD: "head",
    _LENGTH: "length",
    _CHUNKED: "chunked",
    _UNTIL_CLOSE: "close",
    _RAW: "raw",
    _OPAQUE: "opaque",
}


class _Head:
    __slots__ = ("headers", "codings", "lengths")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.codings: list[bytes] = []
        self.lengths: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.headers.append((name, value))
        if name == b"content-length":
            self.lengths.append(value)
        elif name == b"transfer-encoding":
            self.codings.append(value)


class ResponseFramer:
    """
    Count complete responses in the bytes a server sends back.

    Call L{expect} with each request's method as it is forwarded and
    L{feed} with the response bytes; L{feed} returns the status codes of the
    responses the bytes completed.  A response the framer cannot make sense
    of turns it I{opaque}: from then on the connection is treated as
    close-delimited, which is always safe.

    @ivar started: bytes of the current (not yet complete) response have
        been seen.
    @ivar raw: the connection has switched protocols (101, or a 2xx to
        CONNECT); bytes are no longer HTTP.
    @ivar headers: the header fields (names lower-cased) of the response
        whose body is being read, a new list for each response.
    @ivar onBody: if set, called with C{(data, start, end)} for each run of
        body bytes C{data[start:end]}: the content of a chunked body without
        its framing, or the bytes as they are otherwise.  It costs nothing
        when unset.
    @ivar onHead: if set, called with C{(status, headers)} as each response
        head (interim ones included) is parsed, before any of its body.
    @ivar closing: a final response said the server ends the connection
        after it (C{Connection: close}, or HTTP/1.0 without keep-alive);
        once set it stays set, since no response follows that one.
    """

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.onBody: Callable[[bytes, int, int], None] | None = None
        self.onHead: Callable[[int, list[tuple[bytes, bytes]]], None] | None = None
        self._methods: deque[bytes] = deque()
        self._state = _HEAD
        self._head = bytearray()
        self._remaining = 0
        self._chunks: ChunkScanner | None = None
        self._status = 0
        self.started = False
        self.closing = False

    @property
    def outstanding(self) -> int:
        """
        Requests forwarded whose responses are not complete yet.
        """
        return len(self._methods)

    @property
    def status(self) -> int:
        """
        The status code of the response being read or last read (0 before
        any).
        """
        return self._status

    @property
    def raw(self) -> bool:
        return self._state == _RAW

    @property
    def opaque(self) -> bool:
        return self._state in (_OPAQUE, _UNTIL_CLOSE)

    @property
    def framing(self) -> str:
        """
        Where the framer is: C{"head"} (between responses or in a head),
        in a body delimited by C{"length"}, C{"chunked"} or C{"close"}, or
        past HTTP: C{"raw"} or C{"opaque"}.
        """
        return _FRAMING[self._state]

    @property
    def betweenChunks(self) -> bool:
        """
        In a chunked body, on a chunk boundary (see
        L{ChunkScanner.betweenChunks}).
        """
        return self._chunks is not None and self._chunks.betweenChunks

    def expect(self, method: bytes) -> None:
        self._methods.append(method)

    def feed(self, data: bytes) -> list[int]:
        done: list[int] = []
        self._feed(data, done, False)
        return done

    def feedBody(self, data: bytes) -> int:
        """
        Feed the body bytes at the start of C{data} and stop where the next
        response head would begin; return how many bytes were taken.  For
        a caller that rewrites heads (L{txtunnel.rewrite}).
        """
        return self._feed(data, [], True)

    def _feed(self, data: bytes, done: list[int], stopAtHead: bool) -> int:
        if data:
            self.started = True
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if stopAtHead and state == _HEAD:
                return pos
            if state == _UNTIL_CLOSE and self.onBody is not None:
                self.onBody(data, pos, end)
            if state in (_RAW, _OPAQUE, _UNTIL_CLOSE):
                break
            if state == _LENGTH:
                n = min(self._remaining, end - pos)
                if self.onBody is not None:
                    self.onBody(data, pos, pos + n)
                pos += n
                self._remaining -= n
                if self._remaining == 0:
                    self._complete(done)
            elif state == _CHUNKED:
                assert self._chunks is not None
                spans: list[tuple[int, int]] | None = [] if self.onBody is not None else None
                try:
                    pos = self._chunks.feed(data, pos, spans)
                except ChunkError:
                    self._state = _OPAQUE
                    break
                if spans and self.onBody is not None:
                    for start, stop in spans:
                        self.onBody(data, start, stop)
                if self._chunks.done:
                    self._chunks = None
                    self._complete(done)
            else:
                pos = self._feedHead(data, pos, done)
        return end if self._state in (_RAW, _OPAQUE, _UNTIL_CLOSE) else pos

    def eof(self) -> list[int]:
        """
        The server closed: a close-delimited response is complete.
        """
        if self._state == _UNTIL_CLOSE and self._methods:
            done: list[int] = []
            self._complete(done)
            return done
        return []

    def _complete(self, done: list[int]) -> None:
        done.append(self._status)
        if self._methods:
            self._methods.popleft()
        self.started = False
        self._state = _HEAD

    def _feedHead(self, data: bytes, pos: int, done: list[int]) -> int:
        if not self._methods:
            # Bytes nobody asked for: the server is not speaking request/response.
            self._state = _OPAQUE
            return len(data)
        if not self._head:
            # The usual case: the whole head is in this read.
            end = data.find(b"\r\n\r\n", pos)
            if 0 <= end and end + 4 - pos <= MAX_RESPONSE_HEAD:
                self._startBody(data[pos : end + 4], done)
                return end + 4
        startLen = len(self._head)
        self._head += data[pos:]
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_RESPONSE_HEAD:
                self._state = _OPAQUE
            return len(data)
        used = end + 4 - startLen
        head = bytes(self._head[: end + 4])
        del self._head[:]
        self._startBody(head, done)
        return pos + used

    def _startBody(self, head: bytes, done: list[int]) -> None:
        collector = _Head()
        parser = httptools.HttpResponseParser(collector)
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            # llhttp also stops at a 101 without "Connection: upgrade",
            # reporting an error; that is still a switch.
            if parser.get_status_code() != 101:
                self._state = _OPAQUE
                return
        status = parser.get_status_code()
        self._status = status
        self.headers = collector.headers
        if self.onHead is not None:
            self.onHead(status, collector.headers)
        method = self._methods[0]
        if status >= 200 and not parser.should_keep_alive():
            self.closing = True
        if 100 <= status < 200:
            if status == 101:
                self._state = _RAW
                self._methods.clear()
            # Interim responses do not answer the request.
            return
        if method == b"CONNECT" and 200 <= status < 300:
            self._state = _RAW
            self._methods.clear()
            return
        if method == b"HEAD" or status in (204, 304):
            self._complete(done)
            return
        codings = collector.codings
        lengths = collector.lengths
        if codings:
            if b",".join(codings).split(b",")[-1].strip().lower() == b"chunked":
                self._state = _CHUNKED
                self._chunks = ChunkScanner()
            else:
                self._state = _UNTIL_CLOSE
        elif lengths:
            values = {v.strip() for v in b",".join(lengths).split(b",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                self._state = _OPAQUE
                return
            self._remaining = int(next(iter(values)))
            if self._remaining == 0:
                self._complete(done)
            else:
                self._state = _LENGTH
        else:
            self._state = _UNTIL_CLOSE
