# -*- test-case-name: tests.test_http1 -*-
"""
Find where a chunked HTTP/1.1 body ends without decoding it.

A tunnel passes chunk framing through as it came; it only needs to know
where the body stops so that the next message on the connection can be
found.  C{httptools} and C{h11} hand out de-chunked data with no raw
offsets, so this small scanner does the counting.
"""

from __future__ import annotations

__all__ = ["ChunkError", "ChunkScanner"]

MAX_CHUNK_LINE = 4 * 1024
MAX_TRAILERS = 64 * 1024
_HEX = frozenset(b"0123456789abcdefABCDEF")

_SIZE, _DATA, _CRLF, _TRAILERS, _DONE = range(5)


class ChunkError(ValueError):
    """
    The bytes are not a valid chunked body.
    """


class ChunkScanner:
    """
    Feed it the bytes of one chunked body (and possibly what follows);
    L{feed} says how many of them belong to the body.
    """

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._line = bytearray()

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def betweenChunks(self) -> bool:
        """
        The bytes so far end on a chunk boundary (or none have come yet):
        a whole chunk may be inserted here without changing the body's
        framing.  False once the last chunk has begun.
        """
        return self._state == _SIZE and not self._line

    @property
    def dataRemaining(self) -> int:
        """
        Bytes of chunk data still expected in the current chunk (0 between
        chunks): a caller may pass that many on without scanning them.
        """
        return self._remaining if self._state == _DATA else 0

    def skip(self, n: int) -> None:
        """
        Account for C{n} (at most L{dataRemaining}) bytes of chunk data that
        the caller passed on without scanning.
        """
        if not 0 <= n <= self.dataRemaining:
            raise ValueError(f"cannot skip {n} bytes of {self.dataRemaining}")
        self._remaining -= n

    def feed(self, data: bytes | bytearray, start: int = 0, spans: list[tuple[int, int]] | None = None) -> int:
        """
        Scan C{data[start:]}.

        @param spans: if given, C{(start, end)} offsets in C{data} of each
            run of chunk data (the body without its framing) are appended.
        @return: the offset just past the last byte that belongs to the body
            (C{len(data)} if the body has not ended yet).
        @raise ChunkError: on a malformed chunk size line, a missing CRLF or
            oversized lines.
        """
        pos = start
        end = len(data)
        while pos < end and self._state != _DONE:
            state = self._state
            if state == _DATA:
                n = min(self._remaining, end - pos)
                if spans is not None and n:
                    spans.append((pos, pos + n))
                pos += n
                self._remaining -= n
                if self._remaining == 0:
                    self._state = _CRLF
            elif state == _CRLF:
                take = data[pos : pos + 2 - len(self._line)]
                self._line += take
                pos += len(take)
                if len(self._line) == 2:
                    if self._line != b"\r\n":
                        raise ChunkError("chunk data not followed by CRLF")
                    del self._line[:]
                    self._state = _SIZE
            else:
                limit = MAX_CHUNK_LINE if state == _SIZE else MAX_TRAILERS
                newline = data.find(b"\n", pos, min(end, pos + limit + 2))
                if newline < 0:
                    self._line += data[pos : min(end, pos + limit + 2)]
                    pos = end
                    if len(self._line) > limit:
                        raise ChunkError("chunk size line too long" if state == _SIZE else "trailer section too large")
                    break
                self._line += data[pos : newline + 1]
                pos = newline + 1
                line = bytes(self._line)
                del self._line[:]
                if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                    raise ChunkError("bare CR or LF in chunked body")
                if state == _SIZE:
                    self._sizeLine(line[:-2])
                elif line == b"\r\n":
                    self._state = _DONE
        return pos

    def _sizeLine(self, line: bytes) -> None:
        if len(line) > MAX_CHUNK_LINE:
            raise ChunkError("chunk size line too long")
        text = line.split(b";", 1)[0].strip()
        if not text or len(text) > 15 or not set(text) <= _HEX:
            raise ChunkError("invalid chunk size")
        size = int(text, 16)
        if size == 0:
            self._state = _TRAILERS
        else:
            self._state = _DATA
            self._remaining = size
