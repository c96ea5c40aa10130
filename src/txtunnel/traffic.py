# -*- test-case-name: tests.test_traffic -*-
"""
What passes through an agent's HTTP tunnels, request by request: the
traffic inspector's, the console's and the agent's metrics' source.

L{Follower} is sans-IO: the HTTP forwarder feeds it the bytes of one
connection each way, as they pass (they are never held back or changed),
and it turns them into L{Capture} records -- heads in full, bodies up to a
cap -- handed to the agent's L{Traffic}.  L{Traffic} keeps the last N
captures in a ring and tells its listeners about each one as it starts and
ends.  Memory stays bounded: at most C{size} captures of at most two
C{bodyCap} bodies each, whatever the traffic.

Parsing is the project's own framers (L{txtunnel.http1.RequestFramer},
L{txtunnel.responses.ResponseFramer}), so the inspector sees requests as the
relay framed them.  A connection the framers cannot follow just stops
being captured.
"""

from __future__ import annotations

import binascii
import importlib
import io
import json
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl

from twisted.logger import Logger

from txtunnel.access import logCapture
from txtunnel.chunked import ChunkError, ChunkScanner
from txtunnel.http1 import MAX_HEAD, HTTPError, RawBytes, RequestEnd, RequestFramer, RequestHead
from txtunnel.responses import ResponseFramer

__all__ = ["BODY_CAP", "RING_SIZE", "Capture", "Follower", "Traffic", "describeBody"]

#: Body bytes kept of each request and each response.
BODY_CAP = 64 * 1024
#: Captures kept.
RING_SIZE = 200
#: Bytes a compressed body may expand to for display.
DECODED_CAP = 1024 * 1024

Listener = Callable[[str, "Capture"], None]

_log = Logger()


class Capture:
    """
    One request and its response as the agent saw them.

    @ivar requestBody: the first L{BODY_CAP} bytes of the request body as
        sent (chunk framing included when C{requestChunked}).
    @ivar responseBody: the first L{BODY_CAP} bytes of the response body's
        content (chunk framing removed).
    @ivar status: 0 until the response head has come.
    """

    def __init__(self, id: int, tunnel: str, head: RequestHead, started: float, wallStarted: float) -> None:
        self.id = id
        self.tunnel = tunnel
        self.method = head.method.decode("ascii", "replace")
        self.target = head.target.decode("utf-8", "replace")
        self.version = head.version
        # Header fields are kept as parsed and decoded only when shown:
        # most captures are never looked at.
        self._requestFields = head.headers
        self._requestHeaders: list[tuple[str, str]] | None = None
        self.requestChunked = b"transfer-encoding" in head.index and any(
            k.lower() == b"transfer-encoding" and b"chunked" in v.lower() for k, v in head.headers
        )
        self.requestBody = bytearray()
        self.requestSize = 0
        self.status = 0
        self._responseFields: Sequence[tuple[bytes, bytes]] = ()
        self._responseHeaders: list[tuple[str, str]] | None = None
        self.responseBody = bytearray()
        self.responseSize = 0
        self.started = started
        self.wallStarted = wallStarted
        self.duration: float | None = None
        self.done = False
        self.replayOf: int | None = None
        forwarded = head.header(b"x-forwarded-for") or b""
        self.clientIP = forwarded.split(b",")[-1].strip().decode("ascii", "replace") or "-"

    @property
    def requestHeaders(self) -> list[tuple[str, str]]:
        if self._requestHeaders is None:
            self._requestHeaders = _decoded(self._requestFields)
        return self._requestHeaders

    @property
    def responseHeaders(self) -> list[tuple[str, str]]:
        if self._responseHeaders is None:
            self._responseHeaders = _decoded(self._responseFields)
        return self._responseHeaders

    def setResponseFields(self, fields: Sequence[tuple[bytes, bytes]]) -> None:
        """
        The response head's fields (names lower-cased), as parsed.
        """
        self._responseFields = fields
        self._responseHeaders = None

    def requestContent(self) -> tuple[bytes, bool]:
        """
        The request body as the server reads it (chunk framing removed),
        and whether all of it was captured.
        """
        raw = bytes(self.requestBody)
        complete = self.requestSize <= len(raw)
        if not self.requestChunked:
            return raw, complete
        scanner = ChunkScanner()
        spans: list[tuple[int, int]] = []
        try:
            scanner.feed(raw, 0, spans)
        except ChunkError:
            return raw, False
        return b"".join(raw[a:b] for a, b in spans), complete and scanner.done

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tunnel": self.tunnel,
            "method": self.method,
            "target": self.target,
            "status": self.status,
            "clientIP": self.clientIP,
            "started": self.wallStarted,
            "duration": self.duration,
            "done": self.done,
            "requestSize": self.requestSize,
            "responseSize": self.responseSize,
            "contentType": _header(self.responseHeaders, "content-type"),
            "replayOf": self.replayOf,
        }

    def detail(self) -> dict[str, Any]:
        content, complete = self.requestContent()
        request = {
            "method": self.method,
            "target": self.target,
            "version": self.version,
            "headers": self.requestHeaders,
            "size": self.requestSize,
            "body": describeBody(content, self.requestHeaders, complete),
        }
        response = {
            "status": self.status,
            "headers": self.responseHeaders,
            "size": self.responseSize,
            "body": describeBody(
                bytes(self.responseBody), self.responseHeaders, self.responseSize <= len(self.responseBody)
            ),
        }
        return dict(self.summary(), request=request, response=response)


def _decoded(fields: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in fields]


def _header(headers: list[tuple[str, str]], name: str) -> str:
    for key, value in headers:
        if key.lower() == name:
            return value
    return ""


def _decompress(data: bytes, coding: str) -> bytes | None:
    """
    Decode C{gzip}, C{deflate}, C{br} or C{zstd} content, at most
    L{DECODED_CAP} bytes of it (a small body may claim to expand
    enormously).  C{br} needs the C{brotli} module (1.2 or later, which can
    bound its output) and C{zstd} the C{zstandard} one: C{pip install
    'txtunnel[decode]'}; without them such bodies are shown as hex.
    """
    if coding == "br":
        return _brotli(data)
    if coding == "zstd":
        return _zstd(data)
    if coding in ("gzip", "x-gzip"):
        windows = [16 + zlib.MAX_WBITS]
    elif coding == "deflate":
        # RFC 9110 says zlib-wrapped; some servers send raw deflate.
        windows = [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    else:
        return None
    for wbits in windows:
        try:
            return zlib.decompressobj(wbits).decompress(data, DECODED_CAP)
        except zlib.error:
            continue
    return None


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _brotli(data: bytes) -> bytes | None:
    brotli = _optional("brotli")
    if brotli is None:
        return None
    try:
        decoded = brotli.Decompressor().process(data, output_buffer_limit=DECODED_CAP)
    except TypeError:
        # A brotli older than 1.2 cannot bound what it expands to.
        return None
    except brotli.error:
        return None
    return bytes(decoded[:DECODED_CAP]) or None


def _zstd(data: bytes) -> bytes | None:
    zstandard = _optional("zstandard")
    if zstandard is None:
        return None
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
        decoded = reader.read(DECODED_CAP)
    except zstandard.ZstdError:
        return None
    # Nothing decoded from something (a first block cut off by the capture) is not an empty body.
    return bytes(decoded) or None


def describeBody(data: bytes, headers: list[tuple[str, str]], complete: bool) -> dict[str, Any]:
    """
    A body ready to show: decoded from its content coding, then pretty JSON, form
    fields, text, or a hex dump for binary content.
    """
    info: dict[str, Any] = {"captured": len(data), "truncated": not complete}
    coding = _header(headers, "content-encoding").strip().lower()
    if coding and coding != "identity" and data:
        decoded = _decompress(data, coding)
        if decoded is None:
            info["encoding"] = coding
            info["kind"] = "hex"
            info["text"] = _hex(data)
            return info
        info["decodedFrom"] = coding
        data = decoded
    contentType = _header(headers, "content-type").split(";", 1)[0].strip().lower()
    info["contentType"] = contentType
    if not data:
        info["kind"] = "empty"
        info["text"] = ""
        return info
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and (contentType.endswith("json") or contentType.endswith("+json")):
        try:
            info["kind"] = "json"
            info["text"] = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
            return info
        except ValueError:
            pass
    if text is not None and contentType == "application/x-www-form-urlencoded":
        info["kind"] = "form"
        info["fields"] = parse_qsl(text, keep_blank_values=True)
        info["text"] = text
        return info
    if text is not None and ("\x00" not in text):
        info["kind"] = "text"
        info["text"] = text
        return info
    info["kind"] = "hex"
    info["text"] = _hex(data)
    return info


def _hex(data: bytes) -> str:
    """
    C{offset  hex bytes  ascii}, 16 bytes a line.
    """
    lines = []
    for offset in range(0, len(data), 16):
        row = data[offset : offset + 16]
        hexed = binascii.hexlify(row, " ").decode()
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{offset:08x}  {hexed:<47}  {text}")
    return "\n".join(lines)


class Traffic:
    """
    The agent's captures: a bounded ring, and listeners told of each
    capture as it C{"start"}s and is C{"done"}.

    Following costs a parse of every head, so it happens only while someone
    listens, the ring is wanted, the access log is on, or an admin site
    serves the metrics it counts (L{enabled}).
    """

    def __init__(self, clock: Any, size: int = RING_SIZE, bodyCap: int = BODY_CAP, metrics: Any = None) -> None:
        self.clock = clock
        #: Told of each finished request (C{requestDone}), when following.
        self.metrics = metrics
        self.size = size
        self.bodyCap = bodyCap
        self.captures: deque[Capture] = deque(maxlen=size)
        self.listeners: list[Listener] = []
        self.keep = False
        #: Log an access event (L{txtunnel.access}) for each request.
        self.accessLog = False
        self._nextId = 1

    @property
    def enabled(self) -> bool:
        counting = self.metrics is not None and bool(getattr(self.metrics, "served", False))
        return self.keep or self.accessLog or counting or bool(self.listeners)

    def follow(self, tunnel: str, responses: ResponseFramer | None = None) -> Follower | None:
        """
        A L{Follower} for a new connection of C{tunnel}, or C{None} when
        nobody wants its traffic.  With C{responses}, the connection is
        parsed by another (see L{Follower.requestEvents}).
        """
        return Follower(self, tunnel, responses=responses) if self.enabled else None

    def get(self, id: int) -> Capture | None:
        for capture in self.captures:
            if capture.id == id:
                return capture
        return None

    def _start(self, tunnel: str, head: RequestHead, replayOf: int | None = None) -> Capture:
        now = float(self.clock.seconds())
        # The reactor's clock is the wall clock in production; tests inject one.
        capture = Capture(self._nextId, tunnel, head, now, now)
        capture.replayOf = replayOf
        self._nextId += 1
        if self.keep:
            self.captures.append(capture)
        self._tell("start", capture)
        return capture

    def _done(self, capture: Capture) -> None:
        capture.done = True
        capture.duration = max(0.0, float(self.clock.seconds()) - capture.started)
        if self.metrics is not None:
            self.metrics.requestDone(capture.tunnel, capture.method, capture.status, capture.duration)
        if self.accessLog:
            logCapture(capture)
        self._tell("done", capture)

    def _tell(self, event: str, capture: Capture) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, capture)
            except Exception:
                # A broken view must not break the tunnel it watches.
                _log.failure("traffic listener {listener!r} failed; removed", listener=listener)
                if listener in self.listeners:
                    self.listeners.remove(listener)


class Follower:
    """
    Follows one HTTP/1.1 connection through the agent (see the module
    docstring).  Feed it L{requestData} and L{responseData} as bytes pass,
    and L{connectionLost} at the end.
    """

    def __init__(
        self, traffic: Traffic, tunnel: str, replayOf: int | None = None, responses: ResponseFramer | None = None
    ) -> None:
        self.traffic = traffic
        self.tunnel = tunnel
        self.replayOf = replayOf
        self.cap = traffic.bodyCap
        if responses is None:
            # Heads arrive as the relay let them through, plus X-Forwarded-*.
            self._requests: RequestFramer | None = RequestFramer(maxHead=2 * MAX_HEAD)
            self._responses = ResponseFramer()
            self._responses.onBody = self._responseBody
        else:
            # Another follower of the connection parses it (the SSE
            # heartbeat) and hands its events on: see L{requestEvents}.
            self._requests = None
            self._responses = responses
        #: Whether the responses' framer is another's, which also tells it
        #: what each request expects.
        self._shared = responses is not None
        #: Captures whose responses are not complete, oldest first.
        self._waiting: deque[Capture] = deque()
        self._reading: Capture | None = None
        self._lost = False
        #: The last capture on this connection, and a replay hook.
        self.last: Capture | None = None

    def requestData(self, data: bytes) -> None:
        try:
            self._requestData(data)
        except Exception:
            self._broken()

    def responseData(self, data: bytes) -> None:
        try:
            self._responseData(data)
        except Exception:
            self._broken()

    def connectionLost(self) -> None:
        try:
            self._connectionLost()
        except Exception:
            self._broken()

    def _broken(self) -> None:
        """
        A bug here must cost the capture, never the connection it follows.
        """
        _log.failure("stopped following a connection of tunnel {tunnel!r}", tunnel=self.tunnel)
        self._requests = None
        self._lost = True
        self._waiting.clear()

    def requestEvents(self, events: list[Any] | None, failed: bool = False) -> None:
        """
        Follow a connection whose requests another parses: its framer's
        C{events} for the bytes just sent, or C{failed} when they could not
        be parsed.
        """
        try:
            if failed:
                self._giveUp()
            elif events:
                self._requestEvents(events)
        except Exception:
            self._broken()

    def responseBody(self, data: bytes, start: int, end: int) -> None:
        """
        A piece of response body (C{data[start:end]}), from the shared
        framer's C{onBody}.
        """
        try:
            self._responseBody(data, start, end)
        except Exception:
            self._broken()

    def responseCompleted(self, statuses: list[int]) -> None:
        """
        Follow a connection whose responses another parses (with the
        L{ResponseFramer} given to this follower): C{statuses} are those
        completed by the bytes just received.
        """
        try:
            self._responsesFed(statuses)
        except Exception:
            self._broken()

    def _requestData(self, data: bytes) -> None:
        requests = self._requests
        if requests is None or self._lost:
            return
        try:
            events = requests.feed(data)
        except HTTPError:
            self._giveUp()
            return
        self._requestEvents(events)

    def _requestEvents(self, events: list[Any]) -> None:
        if self._lost:
            return
        for event in events:
            if isinstance(event, RequestHead):
                capture = self.traffic._start(self.tunnel, event, self.replayOf)
                self.last = capture
                if not self._shared:
                    self._responses.expect(event.method)
                self._waiting.append(capture)
                self._reading = capture
            elif isinstance(event, RequestEnd):
                self._reading = None
            elif isinstance(event, RawBytes):
                # An upgraded connection: no more requests to follow.
                self._requests = None
                return
            else:
                reading = self._reading
                if reading is not None:
                    reading.requestSize += len(event.data)
                    room = self.cap - len(reading.requestBody)
                    if room > 0:
                        reading.requestBody += event.data[:room]

    def _responseData(self, data: bytes) -> None:
        if self._lost:
            return
        self._responsesFed(self._responses.feed(data))

    def _responsesFed(self, statuses: list[int]) -> None:
        if self._lost:
            return
        responses = self._responses
        self._completed(statuses)
        waiting = self._waiting
        if waiting and responses.framing != "head":
            # The head of the response being read has been parsed.
            self._heads(waiting[0])
        if responses.raw or responses.framing == "opaque":
            # Switched protocols (or lost track): what follows is not HTTP.
            self._finishAll()
            self._lost = True

    def _connectionLost(self) -> None:
        if not self._lost:
            self._completed(self._responses.eof())
        self._finishAll()
        self._lost = True

    def _heads(self, capture: Capture) -> None:
        responses = self._responses
        if not capture._responseFields and responses.headers:
            capture.setResponseFields(responses.headers)
        if responses.status and not capture.status:
            capture.status = responses.status

    def _completed(self, statuses: list[int]) -> None:
        for status in statuses:
            if not self._waiting:
                break
            capture = self._waiting.popleft()
            self._heads(capture)
            capture.status = status
            self.traffic._done(capture)

    def _responseBody(self, data: bytes, start: int, end: int) -> None:
        if not self._waiting:
            return
        capture = self._waiting[0]
        self._heads(capture)
        capture.responseSize += end - start
        room = self.cap - len(capture.responseBody)
        if room > 0:
            capture.responseBody += data[start : min(end, start + room)]

    def _finishAll(self) -> None:
        while self._waiting:
            capture = self._waiting.popleft()
            self.traffic._done(capture)

    def _giveUp(self) -> None:
        self._requests = None
        self._finishAll()
        self._lost = True
