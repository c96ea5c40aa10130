# -*- test-case-name: tests.test_frames -*-
"""
Sans-IO codec for the frames carried on a txtunnel link.

The link between an agent and a relay is a byte stream of frames (in practice
the concatenated payloads of WebSocket binary messages).  This module only
turns frames into bytes and bytes into frames; it does no I/O, keeps no
sockets and knows nothing about streams or windows, so it can be fuzzed and
property-tested on its own.  The wire format is specified in
``docs/protocol.rst``; keep the two in step.

Every frame is a 10-byte header followed by its payload::

    +--------+--------+--------------------+--------------------+
    | type 1 | flags 1|  stream id 4 (BE)  |   length 4 (BE)    |  payload ...
    +--------+--------+--------------------+--------------------+
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any, NamedTuple

__all__ = [
    "HEADER",
    "MAX_FRAME_PAYLOAD",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "decodeJSON",
    "encodeFrame",
    "encodeJSON",
]

PROTOCOL_VERSION = 1

HEADER = struct.Struct(">BBII")

#: The largest payload a peer may put in one frame unless the hello says
#: less.  DATA frames are cut well below this; control frames are small.
MAX_FRAME_PAYLOAD = 1 << 20

#: Control messages are JSON objects; this caps what a peer can make us parse.
MAX_JSON_PAYLOAD = 64 * 1024


class FrameType(enum.IntEnum):
    """
    The kinds of frame.  Values are fixed by the protocol version.
    """

    CONTROL = 0x01  # stream 0; a JSON object with an "op" key
    OPEN = 0x02  # open stream N; JSON object describing it
    DATA = 0x03  # bytes for stream N
    WINDOW = 0x04  # 4-byte big-endian credit increment for stream N
    FIN = 0x05  # sender will send no more DATA on stream N
    RESET = 0x06  # stream N is aborted; JSON {"code": ..., "reason": ...}
    PING = 0x07  # stream 0; 8 opaque bytes to be echoed in a PONG
    PONG = 0x08  # stream 0; the PING's 8 bytes


_STREAM_ZERO = frozenset({FrameType.CONTROL, FrameType.PING, FrameType.PONG})
_EMPTY = frozenset({FrameType.FIN})


class FrameError(Exception):
    """
    The bytes are not a valid frame sequence.  The message says why in words
    fit for a log line naming the peer; the link closes with it.
    """


class Frame(NamedTuple):
    """
    One decoded frame.  A named tuple: the decoder makes one for every
    frame on the link, and a tuple costs a fraction of a frozen class.

    @ivar type: what kind of frame this is.
    @ivar stream: the stream it belongs to; 0 for link-level frames.
    @ivar payload: the payload bytes (a C{bytes}, never a view).
    @ivar flags: reserved; 0 in protocol version 1.
    """

    type: FrameType
    stream: int
    payload: bytes = b""
    flags: int = 0


#: Frame types by their byte (L{FrameType} is an enum: calling it costs more).
_TYPES = {int(t): t for t in FrameType}


def _check(type: FrameType, stream: int, payload: bytes, limit: int) -> None:
    if type in _STREAM_ZERO:
        if stream != 0:
            raise FrameError(f"{type.name} frame on stream {stream}; it belongs on stream 0")
    elif stream == 0:
        raise FrameError(f"{type.name} frame on stream 0; it needs a stream id")
    if len(payload) > limit:
        raise FrameError(f"{type.name} frame of {len(payload)} bytes exceeds the limit of {limit}")
    if type in _EMPTY and payload:
        raise FrameError(f"{type.name} frame must be empty, got {len(payload)} bytes")
    if type is FrameType.WINDOW and len(payload) != 4:
        raise FrameError(f"WINDOW frame must carry 4 bytes, got {len(payload)}")
    if type in (FrameType.PING, FrameType.PONG) and len(payload) != 8:
        raise FrameError(f"{type.name} frame must carry 8 bytes, got {len(payload)}")


def encodeFrame(
    type: FrameType,
    stream: int,
    payload: bytes = b"",
    flags: int = 0,
    *,
    limit: int = MAX_FRAME_PAYLOAD,
) -> bytes:
    """
    Serialize one frame.

    @raise FrameError: if the frame would be invalid for its peer to decode
        (wrong stream for its type, payload too large or of the wrong size).
    """
    if not 0 <= stream <= 0xFFFFFFFF:
        raise FrameError(f"stream id {stream} is out of range")
    if flags:
        raise FrameError(f"{type.name} frame has reserved flags 0x{flags:02x} set")
    _check(type, stream, payload, limit)
    return HEADER.pack(type, flags, stream, len(payload)) + payload


def encodeJSON(type: FrameType, stream: int, message: dict[str, Any]) -> bytes:
    """
    Serialize a frame whose payload is a JSON object (CONTROL, OPEN, RESET).
    """
    return encodeFrame(type, stream, json.dumps(message, separators=(",", ":")).encode("utf-8"))


def decodeJSON(frame: Frame) -> dict[str, Any]:
    """
    Parse the JSON object a CONTROL, OPEN or RESET frame carries.

    @raise FrameError: if the payload is not a JSON object of sane size.
    """
    if len(frame.payload) > MAX_JSON_PAYLOAD:
        raise FrameError(f"{frame.type.name} payload of {len(frame.payload)} bytes is too large for JSON")
    try:
        value = json.loads(frame.payload.decode("utf-8")) if frame.payload else {}
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # RecursionError: nesting deep enough to exhaust the parser's stack.
        raise FrameError(f"{frame.type.name} payload is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise FrameError(f"{frame.type.name} payload must be a JSON object")
    return value


class FrameDecoder:
    """
    Incremental decoder: feed it bytes split anywhere, take whole frames out.

    Once it has raised L{FrameError} it stays broken: a peer that sent garbage
    is not trusted to resynchronise.
    """

    def __init__(self, limit: int = MAX_FRAME_PAYLOAD) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._failed: FrameError | None = None

    def feed(self, data: bytes) -> list[Frame]:
        """
        Add C{data} and return every frame it completes, in order.

        Each payload is copied out of C{data} once; only the bytes of a frame
        still incomplete are kept, for the next call (a link carrier that
        sends whole frames per message, as the WebSocket one does, leaves
        none).

        @raise FrameError: on the first invalid frame.
        """
        if self._failed is not None:
            raise self._failed
        buf: bytes | bytearray
        if self._buffer:
            self._buffer += data
            buf = self._buffer
        else:
            buf = data
        view = memoryview(buf)
        total = len(buf)
        offset = 0
        size = HEADER.size
        limit = self._limit
        frames: list[Frame] = []
        try:
            while total - offset >= size:
                rawType, flags, stream, length = HEADER.unpack_from(buf, offset)
                type = _TYPES.get(rawType)
                if type is None:
                    raise FrameError(f"unknown frame type 0x{rawType:02x}")
                if flags:
                    raise FrameError(f"{type.name} frame has reserved flags 0x{flags:02x} set")
                if length > limit:
                    raise FrameError(f"{type.name} frame of {length} bytes exceeds the limit of {limit}")
                end = offset + size + length
                if total < end:
                    break
                payload = bytes(view[offset + size : end])
                _check(type, stream, payload, limit)
                offset = end
                frames.append(Frame(type, stream, payload))
        except FrameError as e:
            self._failed = e
            view.release()
            self._buffer = bytearray()
            raise
        view.release()
        if buf is self._buffer:
            del self._buffer[:offset]
        elif offset < total:
            self._buffer = bytearray(data[offset:])
        return frames

    @property
    def buffered(self) -> int:
        """
        How many bytes wait for the rest of their frame.
        """
        return len(self._buffer)
