"""
Long-lived and streamed responses through an http tunnel, end to end: SSE,
NDJSON, C{multipart/x-mixed-replace}, media with Range, long polling, and
the agent's SSE heartbeat.

The local service is plain C{twisted.web} writing each piece with a delay;
each piece carries the C{time.monotonic()} at which it was written, and the
client (a raw socket read in a thread and parsed with h11, or curl) notes
when it arrived, so every test measures how long a piece took to cross the
relay and the agent: nothing may be buffered at any hop.
"""

from __future__ import annotations

import functools
import re
import socket
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import h11
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.conftest import Relay, RunningAgent, inThread, pattern, startAgent

with warnings.catch_warnings():
    # twisted.web.static builds its own deprecated error pages at import.
    warnings.simplefilter("ignore", DeprecationWarning)
    from twisted.web.static import File

#: A bound on the time a piece may take from the local service to the
#: client: "milliseconds", with room for a loaded 2-core CI machine (the
#: median is a few ms; the medians measured are printed at the end).
MAX_LATENCY = 0.25

#: Latencies measured by the tests, printed at the end of the module.
MEASURED: dict[str, list[float]] = {}

Step = tuple[float, Callable[[], bytes]]


def stamp() -> bytes:
    """
    The time now, fixed width (so that a body's length is known ahead).
    """
    return b"%017.6f" % time.monotonic()


STAMP_WIDTH = len(stamp())


class Paced(Resource):
    """
    Answer with a script of C{(delay, data)} steps: after each delay the
    data (a callable, so it can hold the time it is written) is written as
    one piece.  A visitor who leaves cancels the rest.
    """

    isLeaf = True

    def __init__(self, script: Callable[[Any], tuple[bytes, list[Step], int | None]]) -> None:
        super().__init__()
        self.script = script

    def render_GET(self, request: Any) -> Any:
        contentType, steps, length = self.script(request)
        request.setHeader(b"content-type", contentType)
        request.setHeader(b"cache-control", b"no-cache")
        if length is not None:
            request.setHeader(b"content-length", b"%d" % length)
        request.write(b"")  # the head goes out now
        pending: list[Any] = []

        def step(i: int) -> None:
            pending.clear()
            if i == len(steps):
                request.finish()
                return
            delay, data = steps[i]

            def write() -> None:
                request.write(data())
                step(i + 1)

            pending.append(reactor.callLater(delay, write))  # type: ignore[attr-defined]

        def gone(_: Any) -> None:
            for call in pending:
                if call.active():
                    call.cancel()

        request.notifyFinish().addErrback(gone)
        step(0)
        return NOT_DONE_YET


def arg(request: Any, name: bytes, default: float) -> float:
    return float(request.args.get(name, [default])[0])


def sseScript(request: Any) -> tuple[bytes, list[Step], int | None]:
    n, gap = int(arg(request, b"n", 5)), arg(request, b"gap", 0.2)

    def event(i: int) -> Callable[[], bytes]:
        return lambda: b'id: %d\nevent: tick\ndata: {"i": %d, "t": %s}\n\n' % (i, i, stamp())

    steps = [(gap, event(i)) for i in range(n)]
    # Stamps are fixed width, so the length is known before the events are.
    length = sum(len(event(i)()) for i in range(n)) if request.args.get(b"length") else None
    return b"text/event-stream; charset=utf-8", steps, length


def ndjsonScript(request: Any) -> tuple[bytes, list[Step], int | None]:
    n, gap = int(arg(request, b"n", 5)), arg(request, b"gap", 0.2)

    def line(i: int) -> Callable[[], bytes]:
        return lambda: b'{"i": %d, "t": %s}\n' % (i, stamp())

    steps: list[Step] = [(gap, line(i)) for i in range(n)]
    return b"application/x-ndjson", steps, None


BOUNDARY = b"txtunnelframe"


def mjpegScript(request: Any) -> tuple[bytes, list[Step], int | None]:
    n, gap = int(arg(request, b"n", 5)), arg(request, b"gap", 0.2)

    def frame(i: int) -> bytes:
        jpeg = b"\xff\xd8\xff\xe0" + b"frame %d t=%s " % (i, stamp()) + pattern(2000 + 100 * i) + b"\xff\xd9"
        return b"--%s\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (BOUNDARY, len(jpeg), jpeg)

    steps: list[Step] = [(gap, functools.partial(frame, i)) for i in range(n)]
    return b"multipart/x-mixed-replace; boundary=" + BOUNDARY, steps, None


def longPollScript(request: Any) -> tuple[bytes, list[Step], int | None]:
    answer = b'{"answer": 42}\n'
    return b"application/json", [(arg(request, b"after", 3.0), lambda: answer)], len(answer)


#: The heartbeat script: idle after the head, after an event, in the middle
#: of an event (between its lines) and in the middle of a line.
PAUSED = [b"data: one\n\n", b"data: two-a\n", b"data: two-b\n\n", b"data: thr", b"ee\n\n"]


def pausedScript(request: Any) -> tuple[bytes, list[Step], int | None]:
    pause = arg(request, b"pause", 0.7)
    steps: list[Step] = [(pause, functools.partial(bytes, piece)) for piece in PAUSED] + [(pause, bytes)]
    contentType = request.args.get(b"type", [b"text/event-stream"])[0]
    length = len(b"".join(PAUSED)) if request.args.get(b"length") else None
    return contentType, steps, length


@pytest.fixture
def streamOrigin(tmp_path: Any) -> Iterator[int]:
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(pattern(4 * 1024 * 1024))
    (media / "tune.mp3").write_bytes(pattern(300 * 1024))
    root = Resource()
    root.putChild(b"sse", Paced(sseScript))
    root.putChild(b"ndjson", Paced(ndjsonScript))
    root.putChild(b"mjpeg", Paced(mjpegScript))
    root.putChild(b"longpoll", Paced(longPollScript))
    root.putChild(b"paused", Paced(pausedScript))
    root.putChild(b"media", File(str(media)))
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    port = pytest_twisted.blockon(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site))
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


class Fetched:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.raw = b""
        #: (length of the body so far, time) after each read.
        self.arrivals: list[tuple[int, float]] = []
        self.started = 0.0
        self.ended = 0.0

    def arrivedAt(self, offset: int) -> float:
        """
        When the body had reached C{offset} bytes.
        """
        for length, at in self.arrivals:
            if length >= offset:
                return at
        raise AssertionError(f"byte {offset} never arrived")

    def latencies(self, regex: bytes) -> list[float]:
        """
        For each match of C{regex} (whose group C{t} is the time it was
        written), how long it took to arrive whole.
        """
        found = [self.arrivedAt(m.end()) - float(m.group("t")) for m in re.finditer(regex, self.body)]
        assert found, f"no {regex!r} in {self.body[:200]!r}"
        return found


def fetch(
    port: int,
    host: str,
    target: str,
    headers: tuple[tuple[str, str], ...] = (),
    http10: bool = False,
    timeout: float = 20,
) -> Fetched:
    """
    One GET on a fresh connection to the relay, read as it comes.
    """
    result = Fetched()
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target=target, headers=[("Host", host), *headers]))
    conn.send(h11.EndOfMessage())
    lines = [f"GET {target} HTTP/{'1.0' if http10 else '1.1'}", f"Host: {host}"] + [f"{k}: {v}" for k, v in headers]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        result.started = time.monotonic()
        s.sendall(request)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = s.recv(65536)
                result.raw += data
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                result.status = event.status_code
                result.headers = {k.lower(): v for k, v in event.headers}
            elif isinstance(event, h11.Data):
                result.body += event.data
                result.arrivals.append((len(result.body), time.monotonic()))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    result.ended = time.monotonic()
    return result


def record(name: str, latencies: list[float]) -> None:
    MEASURED.setdefault(name, []).extend(latencies)
    assert max(latencies) < MAX_LATENCY, f"{name}: a piece took {max(latencies):.3f}s to arrive"


@pytest.fixture(scope="module", autouse=True)
def _report(request: Any) -> Iterator[None]:
    """
    Write the latencies measured (median and max per kind of stream) to
    the test run's output, uncaptured, so every run records them.
    """
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    for name, values in sorted(MEASURED.items()):
        line = (
            f"latency {name}: n={len(values)} median={statistics.median(values) * 1000:.1f}ms "
            f"max={max(values) * 1000:.1f}ms (bound {MAX_LATENCY * 1000:.0f}ms)"
        )
        if reporter is None or capture is None:
            print(line)
            continue
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)


async def startStreamAgent(agents: list[RunningAgent], relay: Relay, port: int, name: str, *args: str) -> str:
    await startAgent(agents, relay, "--http", str(port), "--subdomain", name, *args)
    return f"{name}.localhost:{relay.port}"


SSE_EVENT = rb'id: (?P<i>\d+)\nevent: tick\ndata: \{"i": (?P=i), "t": (?P<t>[0-9.]+)\}\n\n'


@pytest.mark.parametrize(
    "framing, query, http10",
    [("chunked", "", False), ("content-length", "&length=1", False), ("close-delimited", "", True)],
)
@pytest_twisted.ensureDeferred
async def test_sse_events_arrive_as_written(
    relay: Relay, agents: list[RunningAgent], streamOrigin: int, framing: str, query: str, http10: bool
) -> None:
    """
    Each event of an event stream reaches the client when it is written,
    whatever the response's framing.
    """
    host = await startStreamAgent(agents, relay, streamOrigin, "sse")
    got = await inThread(fetch, relay.port, host, f"/sse?n=8&gap=0.15{query}", (), http10)
    assert got.status == 200
    assert got.headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    if framing == "chunked":
        assert got.headers[b"transfer-encoding"] == b"chunked"
    elif framing == "content-length":
        assert int(got.headers[b"content-length"]) == len(got.body)
    else:
        assert b"content-length" not in got.headers and b"transfer-encoding" not in got.headers
    assert [int(m.group("i")) for m in re.finditer(SSE_EVENT, got.body)] == list(range(8))
    record(f"sse {framing}", got.latencies(SSE_EVENT))


class Timed(ProcessProtocol):
    """
    A child's stdout with the time each piece arrived.
    """

    def __init__(self) -> None:
        self.out = b""
        self.arrivals: list[tuple[int, float]] = []
        self.err = b""
        self.done: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self.arrivals.append((len(self.out), time.monotonic()))

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.done.callback(reason.value.exitCode)


@pytest_twisted.ensureDeferred
async def test_sse_with_curl(relay: Relay, agents: list[RunningAgent], streamOrigin: int) -> None:
    """
    curl --no-buffer, as a user would watch a stream, prints each event as
    soon as it is written.
    """
    import os

    host = await startStreamAgent(agents, relay, streamOrigin, "curl")
    child = Timed()
    reactor.spawnProcess(  # type: ignore[attr-defined]
        child,
        "curl",
        [
            "curl",
            "-sS",
            "--no-buffer",
            "--max-time",
            "30",
            "-H",
            f"Host: {host}",
            f"http://127.0.0.1:{relay.port}/sse?n=8&gap=0.15",
        ],
        env=os.environ,
    )
    code = await child.done
    assert code == 0, child.err
    got = Fetched()
    got.body, got.arrivals = child.out, child.arrivals
    assert len(re.findall(SSE_EVENT, got.body)) == 8
    record("sse curl", got.latencies(SSE_EVENT))


@pytest_twisted.ensureDeferred
async def test_ndjson_lines_arrive_as_written(relay: Relay, agents: list[RunningAgent], streamOrigin: int) -> None:
    host = await startStreamAgent(agents, relay, streamOrigin, "nd")
    got = await inThread(fetch, relay.port, host, "/ndjson?n=8&gap=0.15")
    assert got.status == 200
    assert got.headers[b"content-type"] == b"application/x-ndjson"
    lines = got.body.splitlines()
    assert [line.split(b",")[0] for line in lines] == [b'{"i": %d' % i for i in range(8)]
    record("ndjson", got.latencies(rb'\{"i": \d+, "t": (?P<t>[0-9.]+)\}\n'))


@pytest_twisted.ensureDeferred
async def test_mixed_replace_frames_arrive_as_written(
    relay: Relay, agents: list[RunningAgent], streamOrigin: int
) -> None:
    """
    An MJPEG-like C{multipart/x-mixed-replace} stream: each frame arrives
    whole, when it is written.
    """
    host = await startStreamAgent(agents, relay, streamOrigin, "cam")
    got = await inThread(fetch, relay.port, host, "/mjpeg?n=6&gap=0.15")
    assert got.status == 200
    assert got.headers[b"content-type"] == b"multipart/x-mixed-replace; boundary=" + BOUNDARY
    body, pos, latencies = got.body, 0, []
    for i in range(6):
        delimiter = b"--" + BOUNDARY + b"\r\n"
        assert body.startswith(delimiter, pos)
        headEnd = body.index(b"\r\n\r\n", pos) + 4
        length = int(re.search(rb"Content-Length: (\d+)", body[pos:headEnd]).group(1))  # type: ignore[union-attr]
        jpeg = body[headEnd : headEnd + length]
        assert jpeg.startswith(b"\xff\xd8\xff\xe0frame %d t=" % i)
        assert jpeg.endswith(pattern(2000 + 100 * i) + b"\xff\xd9")
        pos = headEnd + length + 2
        written = float(jpeg[4:].split(b" ")[2][2:])
        # A frame has arrived when its last byte has.
        latencies.append(got.arrivedAt(pos) - written)
    assert pos == len(body)
    record("mjpeg", latencies)


@pytest.mark.parametrize(
    "path, rangeHeader, start, end, contentType",
    [
        ("/media/clip.mp4", "bytes=1000-1999", 1000, 1999, b"video/mp4"),
        ("/media/clip.mp4", "bytes=1048576-", 1048576, 4 * 1024 * 1024 - 1, b"video/mp4"),
        ("/media/clip.mp4", "bytes=-500", 4 * 1024 * 1024 - 500, 4 * 1024 * 1024 - 1, b"video/mp4"),
        ("/media/tune.mp3", "bytes=0-0", 0, 0, b"audio/mpeg"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_media_range_requests(
    relay: Relay,
    agents: list[RunningAgent],
    streamOrigin: int,
    path: str,
    rangeHeader: str,
    start: int,
    end: int,
    contentType: bytes,
) -> None:
    """
    A media player's Range request gets 206, the right Content-Range and
    exactly those bytes.
    """
    host = await startStreamAgent(agents, relay, streamOrigin, "media")
    size = 4 * 1024 * 1024 if path.endswith(".mp4") else 300 * 1024
    got = await inThread(fetch, relay.port, host, path, (("Range", rangeHeader),))
    assert got.status == 206
    assert got.headers[b"content-type"] == contentType
    assert got.headers[b"content-range"] == b"bytes %d-%d/%d" % (start, end, size)
    assert got.body == pattern(size)[start : end + 1]


@pytest_twisted.ensureDeferred
async def test_media_multiple_ranges_and_bad_range(relay: Relay, agents: list[RunningAgent], streamOrigin: int) -> None:
    """
    Several ranges come back as C{multipart/byteranges}; an unsatisfiable
    one gets 416; a plain GET gets the whole file.
    """
    host = await startStreamAgent(agents, relay, streamOrigin, "media")
    data = pattern(4 * 1024 * 1024)
    got = await inThread(fetch, relay.port, host, "/media/clip.mp4", (("Range", "bytes=0-99,200000-200099"),))
    assert got.status == 206
    assert got.headers[b"content-type"].startswith(b"multipart/byteranges")
    assert data[:100] in got.body and data[200000:200100] in got.body
    got = await inThread(fetch, relay.port, host, "/media/clip.mp4", (("Range", "bytes=9999999-"),))
    assert got.status == 416
    got = await inThread(fetch, relay.port, host, "/media/clip.mp4")
    assert got.status == 200 and got.body == data
    assert got.headers[b"accept-ranges"] == b"bytes"


@pytest_twisted.ensureDeferred
async def test_long_poll_answered_after_three_seconds(
    relay: Relay, agents: list[RunningAgent], streamOrigin: int
) -> None:
    """
    A request the service holds for 3 s before answering is answered, not
    cut with a 504 (the default response timeout is 120 s).
    """
    host = await startStreamAgent(agents, relay, streamOrigin, "poll")
    got = await inThread(fetch, relay.port, host, "/longpoll?after=3")
    assert got.status == 200
    assert got.body == b'{"answer": 42}\n'
    assert 2.9 < got.ended - got.started < 10


# -- the SSE heartbeat

HEARTBEATS = re.compile(
    rb"\A(?::\n\n)+data: one\n\n(?::\n\n)+data: two-a\ndata: two-b\n\n(?::\n\n)+data: three\n\n(?::\n\n)*\Z"
)


@pytest.mark.parametrize("http10", [False, True], ids=["chunked", "close-delimited"])
@pytest_twisted.ensureDeferred
async def test_heartbeat_only_between_events(
    relay: Relay, agents: list[RunningAgent], streamOrigin: int, http10: bool
) -> None:
    """
    With --sse-heartbeat, an idle event stream gets comment lines where it
    sits between events (after the head, after a complete event), never
    while the server is in the middle of an event or of a line.
    """
    host = await startStreamAgent(agents, relay, streamOrigin, "beat", "--sse-heartbeat", "0.15")
    got = await inThread(fetch, relay.port, host, "/paused?pause=0.5", (), http10)
    assert got.status == 200
    assert HEARTBEATS.match(got.body), got.body
    if not http10:
        assert b"\r\n3\r\n:\n\n\r\n" in got.raw


@pytest.mark.parametrize(
    "args, query",
    [
        (("--sse-heartbeat", "0.15"), "&length=1"),
        (("--sse-heartbeat", "0"), ""),
        ((), ""),
        (("--sse-heartbeat", "0.15"), "&type=application/x-ndjson"),
    ],
    ids=["content-length", "disabled", "default-15s", "not-sse"],
)
@pytest_twisted.ensureDeferred
async def test_no_heartbeat(
    relay: Relay, agents: list[RunningAgent], streamOrigin: int, args: tuple[str, ...], query: str
) -> None:
    """
    No heartbeat in a stream with a Content-Length, when it is turned off,
    before its interval (15 s by default), or in what is not an event stream.
    """
    host = await startStreamAgent(agents, relay, streamOrigin, "quiet", *args)
    got = await inThread(fetch, relay.port, host, f"/paused?pause=0.35{query}")
    assert got.status == 200
    assert got.body == b"".join(PAUSED)


@pytest_twisted.ensureDeferred
async def test_heartbeat_from_tunnel_section(
    relay: Relay, agents: list[RunningAgent], streamOrigin: int, tmp_path: Any
) -> None:
    """
    The heartbeat can be set per tunnel in agent.ini.
    """
    ini = tmp_path / "agent.ini"
    ini.write_text(f"[tunnel:beat]\ntype = http\ntarget = {streamOrigin}\nsubdomain = inibeat\nsse-heartbeat = 0.15\n")
    await startAgent(agents, relay, "--config", str(ini))
    got = await inThread(fetch, relay.port, f"inibeat.localhost:{relay.port}", "/paused?pause=0.5")
    assert HEARTBEATS.match(got.body), got.body


# -- failure cases


class Watched(Resource):
    """
    An event stream that writes one event, then either drops its connection
    (C{?drop=1}), says nothing more (C{?quiet=1}), or goes on with a tick
    every 0.2 s; C{gone} fires when the
    request has ended (the visitor left, or the connection was closed).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.gone: defer.Deferred[None] = defer.Deferred()

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"data: first\n\n")
        if request.args.get(b"drop"):
            reactor.callLater(0.1, request.transport.abortConnection)  # type: ignore[attr-defined]
        elif request.args.get(b"quiet"):
            pass
        else:
            # An event stream goes on writing: a visitor that has left is
            # noticed on the next write, as a closed socket is.
            ticks = task.LoopingCall(request.write, b"data: tick\n\n")
            ticks.clock = reactor
            ticks.start(0.2, now=False)
            request.notifyFinish().addBoth(lambda _: ticks.stop())
        request.notifyFinish().addBoth(lambda _: self.gone.callback(None) if not self.gone.called else None)
        return NOT_DONE_YET


@pytest.fixture
def watched() -> Iterator[tuple[int, Watched]]:
    resource = Watched()
    site = Site(resource)
    site.noisy = False
    port = pytest_twisted.blockon(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site))
    yield port.getHost().port, resource
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def readEventStream(port: int, host: str, target: str, leaveAfter: bytes | None = None) -> bytes:
    """
    GET an event stream with a raw socket; read to the end (or leave, by
    closing, once C{leaveAfter} has arrived).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if leaveAfter is not None and leaveAfter in data:
                break
        return data


@pytest_twisted.ensureDeferred
async def test_sse_local_service_down_is_502(relay: Relay, agents: list[RunningAgent]) -> None:
    """
    An event stream asked of a tunnel whose local service is down gets a
    502 naming the service.
    """
    from tests.conftest import closedPort

    port = closedPort()
    host = await startStreamAgent(agents, relay, port, "ssedown")
    got = await inThread(fetch, relay.port, host, "/events", (("Accept", "text/event-stream"),))
    assert got.status == 502
    assert f"127.0.0.1:{port} refused the connection".encode() in got.body


@pytest_twisted.ensureDeferred
async def test_server_closes_mid_event_stream(
    relay: Relay, agents: list[RunningAgent], watched: tuple[int, Watched]
) -> None:
    """
    When the local server drops an event stream part way, the visitor gets
    the events sent so far and then the end of the connection (not a hang).
    """
    port, _ = watched
    host = await startStreamAgent(agents, relay, port, "ssedrop")
    started = time.monotonic()
    data = await inThread(readEventStream, relay.port, host, "/?drop=1")
    assert b"data: first\n\n" in data and data.startswith(b"HTTP/1.1 200")
    assert not data.endswith(b"0\r\n\r\n"), "a dropped stream must not look complete"
    assert time.monotonic() - started < 10


@pytest_twisted.ensureDeferred
async def test_visitor_leaving_closes_local_connection(
    relay: Relay, agents: list[RunningAgent], watched: tuple[int, Watched]
) -> None:
    """
    When the visitor closes an event stream part way, the agent closes its
    connection to the local server, which sees the request end.
    """
    port, resource = watched
    host = await startStreamAgent(agents, relay, port, "sseleave")
    data = await inThread(readEventStream, relay.port, host, "/", b"data: first\n\n")
    assert b"data: first" in data
    timeout = reactor.callLater(10, resource.gone.cancel)  # type: ignore[attr-defined]
    await resource.gone
    if timeout.active():
        timeout.cancel()


@pytest_twisted.ensureDeferred
async def test_visitor_leaving_a_quiet_event_stream(
    relay: Relay, agents: list[RunningAgent], watched: tuple[int, Watched]
) -> None:
    """
    A visitor that closes its socket on an event stream whose server then
    says nothing (and no heartbeat for a minute) is noticed at once: the
    relay sees only a FIN, which TCP cannot tell from a half-close until a
    write draws a reset, but no EventSource half-closes to wait for more
    events, so the relay ends the stream and the local request ends.
    """
    port, resource = watched
    host = await startStreamAgent(agents, relay, port, "ssequiet", "--sse-heartbeat", "60")
    data = await inThread(readEventStream, relay.port, host, "/?quiet=1", b"data: first\n\n")
    assert b"data: first" in data
    timeout = reactor.callLater(10, resource.gone.cancel)  # type: ignore[attr-defined]
    await resource.gone  # a CancelledError here: the local request was still open after 10 s
    if timeout.active():
        timeout.cancel()
