# -*- test-case-name: tests.test_sse -*-
"""
The SSE heartbeat: a comment line written into an idle event stream.

Proxies, load balancers and browsers on the visitor's side close HTTP
connections that carry nothing for a while (nginx after 60 s, many cloud
load balancers after 60-100 s).  An event stream is often quiet for longer
than that.  The agent can keep it alive: when a C{text/event-stream}
response has carried nothing for N seconds and sits between two events, it
writes the comment C{:} and a blank line, which every EventSource ignores
(the HTML standard, "Parsing an event stream": a line that starts with a
colon is ignored; a blank line with no data dispatches nothing).

The heartbeat is only ever inserted where it cannot change the meaning of
the stream:

 - only in a response whose C{Content-Type} is C{text/event-stream} and
   which has no C{Content-Encoding} (compressed bytes cannot take a plain
   comment);
 - only when the last event is complete: the body so far is empty or ends
   with a blank line;
 - in a chunked body, only between chunks, as one whole chunk of its own;
   in a close-delimited body, as plain bytes; never in a body with a
   C{Content-Length}, whose length it would break.

L{SSEHeartbeat} is sans-IO: it is fed the request and response bytes of
one HTTP/1.1 connection, as they pass, and writes through a callable on a
clock it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from txtunnel.http1 import MAX_HEAD, HTTPError, RequestEnd, RequestFramer, RequestHead
from txtunnel.responses import ResponseFramer

__all__ = ["DEFAULT_INTERVAL", "SSEHeartbeat", "atEventBoundary", "isEventStream"]

#: Seconds an event stream may be idle before a heartbeat comment is sent.
DEFAULT_INTERVAL = 15.0

#: What is written: a comment line and the blank line that ends it.
COMMENT = b":\n\n"
#: The same as one chunk of a chunked body.
COMMENT_CHUNK = b"%x\r\n%s\r\n" % (len(COMMENT), COMMENT)


def isEventStream(headers: list[tuple[bytes, bytes]]) -> bool:
    """
    Whether response header fields (names lower-cased) describe an event
    stream the heartbeat may write into: C{text/event-stream}, with no
    content coding and no transfer coding but C{chunked}.
    """
    types = [v for k, v in headers if k == b"content-type"]
    if len(types) != 1:
        return False
    mediaType = types[0].split(b";", 1)[0].strip().lower()
    if mediaType != b"text/event-stream":
        return False
    for name, value in headers:
        if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return False
        if name == b"transfer-encoding":
            codings = {c.strip().lower() for c in value.split(b",")}
            if not codings <= {b"chunked", b"identity", b""}:
                return False
    return True


def atEventBoundary(tail: bytes) -> bool:
    """
    Whether an event stream whose last bytes are C{tail} (at least three of
    them, or all of the stream if it is shorter) stands between events:
    empty, or ending with a blank line.  Lines end with CRLF, LF or CR.
    """
    if not tail:
        return True
    if tail.endswith(b"\r\n"):
        rest = tail[:-2]
    elif tail[-1:] in (b"\n", b"\r"):
        rest = tail[:-1]
    else:
        return False
    # The line just ended is blank when another line ending precedes it
    # (or nothing does).  "\r" then "\n" would be one CRLF, handled above.
    return not rest or rest[-1:] in (b"\n", b"\r")


class SSEHeartbeat:
    """
    Follow the requests and responses on one HTTP/1.1 connection; while the
    response being sent is an idle event stream between events, write a
    heartbeat comment every C{interval} seconds.

    Call L{requestData} with every byte sent to the server and
    L{responseData} with every byte it answers (before or after passing
    them on, but before anything else is written after them), and L{stop}
    when the connection ends.

    @ivar responses: the L{ResponseFramer} that follows the responses;
        C{responses.raw} tells that the connection has switched protocols.
    @ivar beats: how many heartbeats were written.
    """

    def __init__(self, clock: IReactorTime, interval: float, write: Callable[[bytes], object]) -> None:
        self.clock = clock
        self.interval = interval
        self.write = write
        self.responses = ResponseFramer()
        self.responses.onBody = self._body
        #: Also told of each piece of response body (the traffic follower).
        self.bodyListener: Callable[[bytes, int, int], object] | None = None
        self.beats = 0
        # Heads arrive as the relay let them through, plus X-Forwarded-*.
        self._requests: RequestFramer | None = RequestFramer(maxHead=2 * MAX_HEAD)
        self._upgrading = False
        self._lost = False
        self._stopped = False
        self._tail = b""
        self._tailOf: list[tuple[bytes, bytes]] | None = None
        self._call: IDelayedCall | None = None

    @property
    def switched(self) -> bool:
        """
        The connection now carries another protocol (WebSocket, CONNECT):
        no more HTTP responses will come.
        """
        return self.responses.raw

    def requestData(self, data: bytes) -> list[Any] | None:
        """
        Follow request bytes; return the framer's events for them (which
        the agent's traffic follower reads too, so each head is parsed once),
        or C{None} once requests are no longer followed (see L{lost}).
        """
        requests = self._requests
        if requests is None:
            return None
        try:
            events = requests.feed(data)
        except HTTPError:
            # Not HTTP we can follow: give up on this connection, safely.
            self._giveUp()
            return None
        for event in events:
            if isinstance(event, RequestHead):
                self.responses.expect(event.method)
                self._upgrading = event.upgrade
            elif isinstance(event, RequestEnd) and self._upgrading:
                # What follows is not HTTP requests; stop reading it.
                self._requests = None
                break
        return events

    def responseData(self, data: bytes) -> list[int]:
        """
        Follow response bytes; return the statuses of the responses they
        complete (L{ResponseFramer.feed}).
        """
        if self._lost:
            return []
        completed = self.responses.feed(data)
        self._arm()
        return completed

    @property
    def lost(self) -> bool:
        """
        The requests could not be followed (not HTTP/1.1 this can read).
        """
        return self._lost

    def stop(self) -> None:
        """
        The connection is closed: cancel the timer, write nothing more.
        """
        self._stopped = True
        self._cancel()

    # -- internals

    def _giveUp(self) -> None:
        self._lost = True
        self._requests = None
        self._cancel()

    def _body(self, data: bytes, start: int, end: int) -> None:
        if self.bodyListener is not None:
            self.bodyListener(data, start, end)
        if end <= start:
            return
        if self._tailOf is not self.responses.headers:
            self._tailOf = self.responses.headers
            self._tail = b""
        if end - start >= 3:
            self._tail = bytes(data[end - 3 : end])
        else:
            self._tail = (self._tail + bytes(data[start:end]))[-3:]

    def _streaming(self) -> str | None:
        """
        The framing of the current response if it is an event stream the
        heartbeat may write into, else C{None}.
        """
        if self._lost or self._stopped:
            return None
        responses = self.responses
        framing = responses.framing
        if framing not in ("chunked", "close") or not isEventStream(responses.headers):
            return None
        return framing

    def _ready(self) -> bytes | None:
        """
        What to write now, if this is a place for a heartbeat.
        """
        framing = self._streaming()
        if framing is None:
            return None
        tail = self._tail if self._tailOf is self.responses.headers else b""
        if not atEventBoundary(tail):
            return None
        if framing == "chunked":
            return COMMENT_CHUNK if self.responses.betweenChunks else None
        return COMMENT

    def _arm(self) -> None:
        self._cancel()
        if self.interval > 0 and self._streaming() is not None:
            self._call = self.clock.callLater(self.interval, self._beat)

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _beat(self) -> None:
        self._call = None
        beat = self._ready()
        if beat is None:
            # In the middle of an event (or the stream ended): the next
            # response bytes start the count again.
            return
        self.beats += 1
        self.write(beat)
        self._arm()
