"""
Unit and property tests for L{txtunnel.frames}, the sans-IO link frame codec.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txtunnel.frames import (
    HEADER,
    MAX_FRAME_PAYLOAD,
    MAX_JSON_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    decodeJSON,
    encodeFrame,
    encodeJSON,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STREAM_ZERO = (FrameType.CONTROL, FrameType.PING, FrameType.PONG)
STREAM_IDS = st.integers(min_value=1, max_value=0xFFFFFFFF)

jsonObjects = st.dictionaries(
    st.text(max_size=8),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=16),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
        max_leaves=6,
    ),
    max_size=4,
)


@st.composite
def validFrames(draw: st.DrawFn) -> Frame:
    """
    Any frame a conforming peer may send, with a payload valid for its type.
    """
    kind = draw(st.sampled_from(list(FrameType)))
    stream = 0 if kind in STREAM_ZERO else draw(STREAM_IDS)
    if kind in (FrameType.CONTROL, FrameType.OPEN, FrameType.RESET):
        payload = json.dumps(draw(jsonObjects), separators=(",", ":")).encode("utf-8")
    elif kind is FrameType.DATA:
        payload = draw(st.binary(max_size=300))
    elif kind is FrameType.WINDOW:
        payload = draw(st.integers(0, 0xFFFFFFFF)).to_bytes(4, "big")
    elif kind in (FrameType.PING, FrameType.PONG):
        payload = draw(st.binary(min_size=8, max_size=8))
    else:
        payload = b""
    return Frame(kind, stream, payload)


def encode(frame: Frame) -> bytes:
    return encodeFrame(frame.type, frame.stream, frame.payload)


def rawFrame(rawType: int, stream: int, payload: bytes, flags: int = 0, length: int | None = None) -> bytes:
    """
    Bytes of a frame built by hand, bypassing L{encodeFrame}'s checks.
    """
    return HEADER.pack(rawType, flags, stream, len(payload) if length is None else length) + payload


def splitAt(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    pieces = []
    start = 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def feedAll(decoder: FrameDecoder, pieces: list[bytes]) -> list[Frame]:
    frames: list[Frame] = []
    for piece in pieces:
        frames.extend(decoder.feed(piece))
    return frames


def expectError(data: bytes, match: str, limit: int = MAX_FRAME_PAYLOAD) -> FrameError:
    """
    Feed C{data} to a fresh decoder and return the L{FrameError} it raises.
    """
    decoder = FrameDecoder(limit)
    with pytest.raises(FrameError, match=match) as info:
        decoder.feed(data)
    return info.value


# -- round trips


@SETTINGS
@given(validFrames())
def test_roundTripEveryType(frame: Frame) -> None:
    """
    Every valid frame of every type decodes to exactly what was encoded, with
    the header announcing the payload length.
    """
    data = encode(frame)
    assert len(data) == HEADER.size + len(frame.payload)
    decoder = FrameDecoder()
    assert decoder.feed(data) == [frame]
    assert decoder.buffered == 0


@SETTINGS
@given(frames=st.lists(validFrames(), max_size=12), data=st.data())
def test_splitStreamDecodesSame(frames: list[Frame], data: st.DataObject) -> None:
    """
    The concatenated encoding of many frames, cut at arbitrary points, decodes
    to the same frames in the same order, and nothing is left buffered.
    """
    stream = b"".join(encode(f) for f in frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    decoder = FrameDecoder()
    assert feedAll(decoder, splitAt(stream, cuts)) == frames
    assert decoder.buffered == 0


@SETTINGS
@given(frames=st.lists(validFrames(), min_size=1, max_size=6))
def test_byteAtATime(frames: list[Frame]) -> None:
    """
    Feeding one byte at a time yields each frame exactly when its last byte
    arrives, and C{buffered} counts the bytes of the incomplete frame.
    """
    stream = b"".join(encode(f) for f in frames)
    ends = set()
    total = 0
    for f in frames:
        total += HEADER.size + len(f.payload)
        ends.add(total)
    decoder = FrameDecoder()
    got: list[Frame] = []
    pending = 0
    for i in range(len(stream)):
        out = decoder.feed(stream[i : i + 1])
        pending += 1
        if i + 1 in ends:
            assert len(out) == 1
            pending = 0
        else:
            assert out == []
        assert decoder.buffered == pending
        got.extend(out)
    assert got == frames


@SETTINGS
@given(jsonObjects, st.sampled_from([FrameType.CONTROL, FrameType.OPEN, FrameType.RESET]), STREAM_IDS)
def test_jsonRoundTrip(message: dict[str, Any], kind: FrameType, stream: int) -> None:
    """
    C{encodeJSON} and C{decodeJSON} round-trip any JSON object.
    """
    sid = 0 if kind is FrameType.CONTROL else stream
    (frame,) = FrameDecoder().feed(encodeJSON(kind, sid, message))
    assert frame.type is kind and frame.stream == sid
    assert decodeJSON(frame) == message


def test_payloadIsBytesNotView() -> None:
    """
    Decoded payloads are real C{bytes}, unaffected by later feeds reusing the
    decoder's buffer.
    """
    decoder = FrameDecoder()
    (frame,) = decoder.feed(encodeFrame(FrameType.DATA, 3, b"abc") + b"\x03")
    decoder.feed(encodeFrame(FrameType.DATA, 3, b"xyz")[1:])
    assert type(frame.payload) is bytes and frame.payload == b"abc"


def test_emptyJSONPayloadIsEmptyObject() -> None:
    """
    An OPEN frame with no payload stands for the empty object.
    """
    assert decodeJSON(Frame(FrameType.OPEN, 1, b"")) == {}


# -- the decoder rejects garbage with a clear message


def test_unknownType() -> None:
    """
    A frame type outside the enum is rejected, naming the type in hex.
    """
    expectError(rawFrame(0x09, 0, b""), r"unknown frame type 0x09")
    expectError(rawFrame(0x00, 1, b""), r"unknown frame type 0x00")


def test_reservedFlags() -> None:
    """
    Any flag bit set is rejected in protocol version 1.
    """
    expectError(rawFrame(FrameType.DATA, 1, b"x", flags=0x80), r"DATA frame has reserved flags 0x80 set")


def test_oversizedLengthRejectedFromHeaderAlone() -> None:
    """
    A length over the limit is rejected as soon as the header arrives, before
    any payload is buffered.
    """
    header = rawFrame(FrameType.DATA, 1, b"", length=MAX_FRAME_PAYLOAD + 1)
    assert len(header) == HEADER.size
    expectError(header, r"DATA frame of 1048577 bytes exceeds the limit of 1048576")
    expectError(rawFrame(FrameType.DATA, 1, b"", length=101), r"exceeds the limit of 100", limit=100)


def test_partialHeaderIsBuffered() -> None:
    """
    Fewer than 10 bytes are only buffered, never judged.
    """
    decoder = FrameDecoder()
    assert decoder.feed(b"\xff" * (HEADER.size - 1)) == []
    assert decoder.buffered == HEADER.size - 1


@pytest.mark.parametrize("kind", STREAM_ZERO)
def test_linkFramesOffStreamZero(kind: FrameType) -> None:
    """
    CONTROL, PING and PONG belong on stream 0 only.
    """
    payload = b"{}" if kind is FrameType.CONTROL else b"12345678"
    expectError(rawFrame(kind, 5, payload), rf"{kind.name} frame on stream 5; it belongs on stream 0")


@pytest.mark.parametrize("kind", [FrameType.OPEN, FrameType.DATA, FrameType.WINDOW, FrameType.FIN, FrameType.RESET])
def test_streamFramesOnStreamZero(kind: FrameType) -> None:
    """
    Stream frames need a non-zero stream id.
    """
    payload = b"\x00\x00\x00\x01" if kind is FrameType.WINDOW else b""
    expectError(rawFrame(kind, 0, payload), rf"{kind.name} frame on stream 0; it needs a stream id")


@pytest.mark.parametrize("size", [0, 3, 5, 8])
def test_windowPayloadSize(size: int) -> None:
    """
    WINDOW carries exactly 4 bytes.
    """
    expectError(rawFrame(FrameType.WINDOW, 1, b"\x01" * size), rf"WINDOW frame must carry 4 bytes, got {size}")


@pytest.mark.parametrize("kind", [FrameType.PING, FrameType.PONG])
@pytest.mark.parametrize("size", [0, 7, 9])
def test_pingPayloadSize(kind: FrameType, size: int) -> None:
    """
    PING and PONG carry exactly 8 bytes.
    """
    expectError(rawFrame(kind, 0, b"p" * size), rf"{kind.name} frame must carry 8 bytes, got {size}")


def test_finMustBeEmpty() -> None:
    """
    FIN has no payload.
    """
    expectError(rawFrame(FrameType.FIN, 7, b"x"), r"FIN frame must be empty, got 1 bytes")


def test_errorAfterGoodFrames() -> None:
    """
    An invalid frame after valid ones raises; the valid ones before it in the
    same feed are lost with it, because the link is closing anyway.
    """
    decoder = FrameDecoder()
    good = encodeFrame(FrameType.DATA, 1, b"ok")
    assert decoder.feed(good) == [Frame(FrameType.DATA, 1, b"ok")]
    with pytest.raises(FrameError, match="unknown frame type"):
        decoder.feed(good + rawFrame(0x7F, 0, b""))


@SETTINGS
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_staysFailed(after: bytes, more: bytes) -> None:
    """
    Once a decoder has failed it raises the same error for every later feed,
    however good the bytes, and keeps nothing buffered.
    """
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as first:
        decoder.feed(rawFrame(FrameType.DATA, 1, b"x", flags=1))
    assert decoder.buffered == 0
    for data in (after, encodeFrame(FrameType.DATA, 1, b"fine"), more, b""):
        with pytest.raises(FrameError) as again:
            decoder.feed(data)
        assert again.value is first.value
    assert decoder.buffered == 0


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_randomBytesOnlyFrameError(chunks: list[bytes]) -> None:
    """
    Arbitrary bytes, fed in arbitrary pieces, either decode into frames that
    re-encode to a prefix of the input or raise L{FrameError}; never anything
    else.
    """
    decoder = FrameDecoder(limit=64)
    frames: list[Frame] = []
    try:
        for chunk in chunks:
            frames.extend(decoder.feed(chunk))
    except FrameError:
        return
    stream = b"".join(chunks)
    encoded = b"".join(encodeFrame(f.type, f.stream, f.payload) for f in frames)
    assert stream.startswith(encoded)
    assert decoder.buffered == len(stream) - len(encoded)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 20), st.binary(max_size=24))
def test_randomHeadersOnlyFrameError(rawType: int, flags: int, stream: int, payload: bytes) -> None:
    """
    Headers with any type, flags and stream around the valid ones produce a
    frame equal to their input or a L{FrameError}.
    """
    data = HEADER.pack(rawType, flags, stream, len(payload)) + payload
    try:
        frames = FrameDecoder().feed(data)
    except FrameError:
        return
    assert frames == [Frame(FrameType(rawType), stream, payload)]
    assert flags == 0


# -- decodeJSON


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"{not json", r"CONTROL payload is not valid JSON"),
        (b"\xff\xfe{}", r"CONTROL payload is not valid JSON"),
        (b"[1, 2]", r"CONTROL payload must be a JSON object"),
        (b'"op"', r"CONTROL payload must be a JSON object"),
        (b"null", r"CONTROL payload must be a JSON object"),
        (b"42", r"CONTROL payload must be a JSON object"),
    ],
)
def test_decodeJSONRejects(payload: bytes, match: str) -> None:
    """
    Non-JSON and JSON that is not an object are a L{FrameError} naming the
    frame type.
    """
    with pytest.raises(FrameError, match=match):
        decodeJSON(Frame(FrameType.CONTROL, 0, payload))


def test_decodeJSONTooLarge() -> None:
    """
    JSON payloads over the JSON cap are refused before being parsed.
    """
    payload = b'{"a":"' + b"x" * MAX_JSON_PAYLOAD + b'"}'
    with pytest.raises(FrameError, match=r"OPEN payload of \d+ bytes is too large for JSON"):
        decodeJSON(Frame(FrameType.OPEN, 1, payload))


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_decodeJSONDeepNesting(opener: bytes) -> None:
    """
    Deeply nested JSON within the size cap is a L{FrameError}, not a
    C{RecursionError} escaping into the link.
    """
    payload = opener * (MAX_JSON_PAYLOAD // len(opener) - 1)
    assert len(payload) <= MAX_JSON_PAYLOAD
    with pytest.raises(FrameError, match=r"RESET payload is not valid JSON"):
        decodeJSON(Frame(FrameType.RESET, 1, payload))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=60).map(lambda t: t.encode("utf-8")))
def test_decodeJSONOnlyFrameError(payload: bytes) -> None:
    """
    Whatever the payload, C{decodeJSON} returns a dict or raises L{FrameError}.
    """
    try:
        value = decodeJSON(Frame(FrameType.CONTROL, 0, payload))
    except FrameError:
        return
    assert isinstance(value, dict)


# -- encodeFrame refuses what a peer would reject


@pytest.mark.parametrize("stream", [-1, 1 << 32])
def test_encodeStreamOutOfRange(stream: int) -> None:
    """
    Stream ids must fit in 32 bits.
    """
    with pytest.raises(FrameError, match=rf"stream id {stream} is out of range"):
        encodeFrame(FrameType.DATA, stream, b"x")


def test_encodeRefusesInvalidFrames() -> None:
    """
    L{encodeFrame} applies the decoder's rules, so we never send a frame the
    peer must reject.
    """
    with pytest.raises(FrameError, match="belongs on stream 0"):
        encodeFrame(FrameType.PING, 1, b"12345678")
    with pytest.raises(FrameError, match="needs a stream id"):
        encodeFrame(FrameType.DATA, 0, b"x")
    with pytest.raises(FrameError, match="WINDOW frame must carry 4 bytes"):
        encodeFrame(FrameType.WINDOW, 1, b"\x00")
    with pytest.raises(FrameError, match="FIN frame must be empty"):
        encodeFrame(FrameType.FIN, 1, b"x")
    with pytest.raises(FrameError, match="exceeds the limit of 4"):
        encodeFrame(FrameType.DATA, 1, b"12345", limit=4)


@pytest.mark.parametrize("flags", [1, 0x80, 0xFF, 256])
def test_encodeRefusesFlags(flags: int) -> None:
    """
    Flags are reserved; encoding a frame with any set is a L{FrameError}
    (the peer would reject it), not a frame on the wire or a C{struct.error}.
    """
    with pytest.raises(FrameError, match="reserved flags"):
        encodeFrame(FrameType.DATA, 1, b"x", flags=flags)


def test_headerLayout() -> None:
    """
    The header is type, flags, stream id and length, big-endian, 10 bytes.
    """
    data = encodeFrame(FrameType.WINDOW, 0x01020304, b"\x00\x00\x10\x00")
    assert data[:10] == struct.pack(">BBII", 4, 0, 0x01020304, 4)
    assert HEADER.size == 10
