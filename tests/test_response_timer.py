"""
The agent's response timer for HTTP streams (L{txtunnel.forwarders.http._Watch}):
one lazy delayed call per connection, moved by request bytes and cleared by
response bytes, which answers 504 only when the local service stays silent.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from txtunnel.forwarders.http import _Watch
from txtunnel.sse import SSEHeartbeat


class Tunnel:
    def __init__(self, clock: Clock) -> None:
        self.reactor = clock
        self.target = ("127.0.0.1", 8000)
        self.breaker = None


class Stream:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.resets: list[tuple[str, str]] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def loseConnection(self) -> None:
        self.closed = True

    def reset(self, code: str, reason: str) -> None:
        self.resets.append((code, reason))


def watch(timeout: float = 10.0) -> tuple[Clock, Stream, _Watch]:
    clock = Clock()
    stream = Stream()
    heartbeat = SSEHeartbeat(clock, 0, stream.write)
    return clock, stream, _Watch(Tunnel(clock), stream, timeout, heartbeat)  # type: ignore[arg-type]


def test_silent_service_gets_504_after_the_last_request_bytes() -> None:
    clock, stream, w = watch()
    w.requestBytes()
    clock.advance(6)
    w.requestBytes()  # more of the request: the deadline moves
    clock.advance(6)
    assert stream.written == []
    clock.advance(4)
    assert stream.written and stream.written[0].startswith(b"HTTP/1.1 504 ")
    assert b"did not answer within 10s" in stream.written[0] and stream.closed
    assert not clock.getDelayedCalls()


def test_answers_clear_it_without_a_call_per_request() -> None:
    """
    On a keep-alive connection each request and answer moves the deadline;
    the one delayed call stays, and goes once nothing waits for an answer.
    """
    clock, stream, w = watch()
    calls: set[Any] = set()
    for _ in range(100):
        w.requestBytes()
        calls.update(clock.getDelayedCalls())
        clock.advance(0.05)
        w.responseBytes()
    assert len(calls) == 1
    clock.advance(11)
    assert stream.written == [] and not stream.closed
    assert not clock.getDelayedCalls()


def test_timeout_after_an_answer_resets_the_stream() -> None:
    """
    A later request on a connection whose service answered before: the
    visitor may hold part of a response, so the stream is reset, not 504.
    """
    clock, stream, w = watch()
    w.requestBytes()
    w.responseBytes()
    w.requestBytes()
    clock.advance(10)
    assert stream.written == [] and stream.resets and stream.resets[0][0] == "timeout"


def test_cancel_and_no_timeout() -> None:
    clock, stream, w = watch()
    w.requestBytes()
    w.cancel()
    assert not clock.getDelayedCalls()
    clock, stream, w = watch(timeout=0)
    w.requestBytes()
    assert not clock.getDelayedCalls()
