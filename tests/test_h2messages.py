"""
The HTTP/2 message codec on link streams: round trips under any split of
the bytes, and every malformed input is a L{MessageError}, never anything
else.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txtunnel.h2messages import (
    Data,
    Headers,
    MessageDecoder,
    MessageError,
    Trailers,
    encodeData,
    encodeHeaders,
    encodeTrailers,
)

_name = st.binary(min_size=1, max_size=30).filter(
    lambda b: not any(c in b for c in (b"\r", b"\n", b"\x00")) and b":" not in b[1:]
)
_value = st.binary(max_size=200).filter(lambda b: not any(c in b for c in (b"\r", b"\n", b"\x00")))
_fields = st.lists(st.tuples(_name, _value), max_size=10)


def _collect(events: list[object]) -> list[object]:
    """
    Merge adjacent Data events: how body bytes are cut is not part of the contract.
    """
    merged: list[object] = []
    for event in events:
        if isinstance(event, Data) and merged and isinstance(merged[-1], Data):
            merged[-1] = Data(merged[-1].data + event.data)
        elif not (isinstance(event, Data) and not event.data):
            merged.append(event)
    return merged


@given(
    head=_fields,
    bodies=st.lists(st.binary(max_size=3000), max_size=5),
    trailers=st.one_of(st.none(), _fields),
    cuts=st.lists(st.integers(min_value=1, max_value=500), max_size=30),
)
def test_round_trip_any_split(
    head: list[tuple[bytes, bytes]], bodies: list[bytes], trailers: list[tuple[bytes, bytes]] | None, cuts: list[int]
) -> None:
    """
    Whatever the fields and however the bytes are cut, the decoder gives
    back the head, the body bytes in order and the trailers.
    """
    wire = encodeHeaders(head) + b"".join(encodeData(b) for b in bodies)
    if trailers is not None:
        wire += encodeTrailers(trailers)
    decoder = MessageDecoder()
    events: list[object] = []
    pos = 0
    for cut in cuts:
        events += decoder.feed(wire[pos : pos + cut])
        pos += cut
    events += decoder.feed(wire[pos:])
    expected: list[object] = [Headers(head)]
    body = b"".join(bodies)
    if body:
        expected.append(Data(body))
    if trailers is not None:
        expected.append(Trailers(trailers))
    assert _collect(events) == expected
    assert decoder.idle
    assert decoder.done == (trailers is not None)


@given(st.binary(max_size=400))
def test_garbage_is_a_message_error(data: bytes) -> None:
    """
    Arbitrary bytes either decode or raise L{MessageError}; nothing else.
    """
    decoder = MessageDecoder(maxHeaderBlock=256)
    try:
        decoder.feed(data)
    except MessageError:
        pass


def test_trailers_only() -> None:
    """
    A trailers block with no head before it is a trailers-only response.
    """
    fields = [(b":status", b"200"), (b"grpc-status", b"14")]
    assert MessageDecoder().feed(encodeTrailers(fields)) == [Trailers(fields)]


def test_large_data_streams() -> None:
    """
    A DATA message is passed on as its bytes arrive, not held whole.
    """
    decoder = MessageDecoder()
    decoder.feed(encodeHeaders([(b":status", b"200")]))
    wire = encodeData(b"x" * 1_000_000)
    assert decoder.feed(wire[:1005]) == [Data(b"x" * 1000)]
    assert decoder.feed(wire[1005:2005]) == [Data(b"x" * 1000)]


@pytest.mark.parametrize(
    "wire, message",
    [
        (encodeData(b"x"), "DATA before the head"),
        (bytes([7, 0, 0, 0, 0]), "unknown message kind"),
        (encodeHeaders([]) + encodeHeaders([]), "a second head"),
        (encodeTrailers([]) + encodeData(b"x"), "after the trailers"),
        (bytes([1, 0, 1, 0, 1]), "exceeds the limit"),
        (bytes([1, 0, 0, 0, 3, 0, 5, 0]), "truncated"),
        (encodeHeaders([(b"x", b"a\r\nb")]), "invalid character"),
        (encodeHeaders([(b"x:y", b"1")]), "invalid character"),
        (bytes([1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0]), "empty or truncated"),
    ],
)
def test_malformed(wire: bytes, message: str) -> None:
    """
    Each kind of malformed input is refused with a reason.
    """
    with pytest.raises(MessageError, match=message):
        MessageDecoder().feed(wire)
