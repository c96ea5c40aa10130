# -*- test-case-name: tests.test_h2messages -*-
"""
Sans-IO codec for HTTP/2 messages carried on one link stream.

A gRPC call (or any HTTP/2 request the relay does not turn into HTTP/1.1)
travels on its own link stream as a short sequence of messages in each
direction: one header block, the body bytes, and optionally a final header
block (trailers).  HTTP/2's own frames cannot be sent as they are because
their header blocks are HPACK-compressed against per-connection state, and
the two HTTP/2 connections (visitor to relay, agent to local service) are
different connections; so header blocks are re-encoded here as plain
name/value lists.  The end of a direction is the link stream's FIN and an
abort is the link's RESET (see C{docs/protocol.rst}), so neither needs a
message of its own.

Every message is a 5-byte header and a payload::

    +--------+-----------------------+
    | kind 1 |  length 4 (BE)        |  payload ...
    +--------+-----------------------+

C{kind} is L{DATA} (body bytes), L{HEADERS} (the request or response
head, pseudo-headers included) or L{TRAILERS} (the last header block of
the direction; without a L{HEADERS} before it, a "trailers-only"
response).  A header block is a sequence of fields, each
C{name-length (2, BE) name value-length (4, BE) value}.

The decoder passes body bytes on as they arrive (a large DATA message is
never held whole); only header blocks are collected, up to a limit.
"""

from __future__ import annotations

import struct

import attrs

__all__ = [
    "DATA",
    "HEADERS",
    "MAX_HEADER_BLOCK",
    "TRAILERS",
    "Data",
    "Headers",
    "MessageDecoder",
    "MessageError",
    "Trailers",
    "encodeData",
    "encodeHeaders",
    "encodeTrailers",
]

DATA = 0x00
HEADERS = 0x01
TRAILERS = 0x02

_HEADER = struct.Struct(">BI")
_NAME = struct.Struct(">H")
_VALUE = struct.Struct(">I")

#: The largest header block a peer may send (HTTP/2 servers commonly allow
#: 16-64 KiB of headers; gRPC's default is 8 KiB).
MAX_HEADER_BLOCK = 64 * 1024

#: Bytes that may not appear in a field name or value (RFC 9113, 8.2.1).
_FORBIDDEN = (b"\r", b"\n", b"\x00")

Fields = list[tuple[bytes, bytes]]


class MessageError(ValueError):
    """
    The bytes are not a valid message sequence.
    """


@attrs.frozen
class Headers:
    """
    The head of a request or response, pseudo-headers first.
    """

    fields: Fields


@attrs.frozen
class Data:
    """
    Some body bytes (one DATA message may arrive as several of these).
    """

    data: bytes


@attrs.frozen
class Trailers:
    """
    The last header block of this direction.
    """

    fields: Fields


Event = Headers | Data | Trailers


def _block(fields: Fields) -> bytes:
    parts = []
    for name, value in fields:
        parts.append(_NAME.pack(len(name)))
        parts.append(name)
        parts.append(_VALUE.pack(len(value)))
        parts.append(value)
    return b"".join(parts)


def encodeHeaders(fields: Fields) -> bytes:
    """
    A L{HEADERS} message.
    """
    block = _block(fields)
    return _HEADER.pack(HEADERS, len(block)) + block


def encodeTrailers(fields: Fields) -> bytes:
    """
    A L{TRAILERS} message.
    """
    block = _block(fields)
    return _HEADER.pack(TRAILERS, len(block)) + block


def encodeData(data: bytes) -> bytes:
    """
    A L{DATA} message.
    """
    return _HEADER.pack(DATA, len(data)) + data


def decodeBlock(block: bytes) -> Fields:
    """
    The fields of a header block.

    @raise MessageError: when the block is truncated or a field is invalid.
    """
    fields: Fields = []
    pos = 0
    end = len(block)
    while pos < end:
        if end - pos < _NAME.size:
            raise MessageError("truncated field name length")
        (nameLength,) = _NAME.unpack_from(block, pos)
        pos += _NAME.size
        if nameLength == 0 or end - pos < nameLength + _VALUE.size:
            raise MessageError("empty or truncated field name")
        name = block[pos : pos + nameLength]
        pos += nameLength
        (valueLength,) = _VALUE.unpack_from(block, pos)
        pos += _VALUE.size
        if end - pos < valueLength:
            raise MessageError("truncated field value")
        value = block[pos : pos + valueLength]
        pos += valueLength
        if any(c in name or c in value for c in _FORBIDDEN) or b":" in name[1:]:
            raise MessageError(f"invalid character in field {name[:40]!r}")
        fields.append((name, value))
    return fields


_START, _BODY, _DONE = range(3)


class MessageDecoder:
    """
    Turn the bytes of one direction of a link stream into L{Headers},
    L{Data} and L{Trailers} events, checking their order: one L{Headers}
    first (or L{Trailers} alone), then L{Data}, then at most one
    L{Trailers}, then nothing.
    """

    def __init__(self, maxHeaderBlock: int = MAX_HEADER_BLOCK) -> None:
        self.maxHeaderBlock = maxHeaderBlock
        self._buffer = bytearray()
        self._kind: int | None = None
        self._remaining = 0
        self._state = _START

    @property
    def done(self) -> bool:
        """
        The trailers have come: nothing more may.
        """
        return self._state == _DONE

    @property
    def started(self) -> bool:
        """
        A head (or trailers-only block) has come.
        """
        return self._state != _START

    @property
    def idle(self) -> bool:
        """
        Between messages: the bytes so far end on a message boundary.
        """
        return self._kind is None and not self._buffer

    def feed(self, data: bytes) -> list[Event]:
        """
        @raise MessageError: on an unknown kind, an oversized header block,
            a malformed block or messages out of order.
        """
        events: list[Event] = []
        pos = 0
        end = len(data)
        while pos < end:
            if self._kind is None:
                need = _HEADER.size - len(self._buffer)
                self._buffer += data[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._buffer) < _HEADER.size:
                    break
                kind, length = _HEADER.unpack(self._buffer)
                del self._buffer[:]
                self._begin(kind, length, events)
            elif self._kind == DATA:
                n = min(self._remaining, end - pos)
                events.append(Data(bytes(data[pos : pos + n])))
                pos += n
                self._remaining -= n
                if self._remaining == 0:
                    self._kind = None
            else:
                n = min(self._remaining, end - pos)
                self._buffer += data[pos : pos + n]
                pos += n
                self._remaining -= n
                if self._remaining == 0:
                    self._endBlock(events)
        return events

    def _begin(self, kind: int, length: int, events: list[Event]) -> None:
        if self._state == _DONE:
            raise MessageError("a message after the trailers")
        if kind == DATA:
            if self._state != _BODY:
                raise MessageError("DATA before the head")
            if length:
                self._kind = DATA
                self._remaining = length
            return
        if kind not in (HEADERS, TRAILERS):
            raise MessageError(f"unknown message kind {kind:#x}")
        if kind == HEADERS and self._state != _START:
            raise MessageError("a second head")
        if length > self.maxHeaderBlock:
            raise MessageError(f"header block of {length} bytes exceeds the limit of {self.maxHeaderBlock}")
        self._kind = kind
        self._remaining = length
        if length == 0:
            self._endBlock(events)

    def _endBlock(self, events: list[Event]) -> None:
        fields = decodeBlock(bytes(self._buffer))
        del self._buffer[:]
        if self._kind == HEADERS:
            self._state = _BODY
            events.append(Headers(fields))
        else:
            self._state = _DONE
            events.append(Trailers(fields))
        self._kind = None
