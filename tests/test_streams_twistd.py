"""
WebSocket and SSE through C{twistd tunnelrelay} and C{twistd tunnelagent}
processes, as a user runs them; the local services and the clients are in
this process (threads), so the clock that stamps an event when it is
written is the one that notes when it arrives.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection, serve

from tests.conftest import readHead
from tests.test_contract import STOPPED_BY_SIGTERM, Proc, freePort, startRelay, twistd

pytestmark = pytest.mark.contract


class _Events(socketserver.BaseRequestHandler):
    """
    A bare HTTP/1.1 server: one chunked event stream per connection, five
    events 0.5 s apart, each stamped with the time it is written; the third
    pause is in the middle of an event.
    """

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if readHead(sock) is None:
            return
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(5):
            time.sleep(0.5)
            if i == 2:
                sock.sendall(chunk(b"event: split\n"))
                time.sleep(0.6)
            sock.sendall(chunk(b"data: %d t=%.6f\n\n" % (i, time.monotonic())))
        sock.sendall(b"0\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.fixture
def eventServer() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Events)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def _echo(ws: ServerConnection) -> None:
    for message in ws:
        ws.send(message)


@pytest.fixture
def wsServer() -> Iterator[int]:
    server = serve(_echo, "127.0.0.1", 0, max_size=None, ping_interval=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.socket.getsockname()[1]
    server.shutdown()
    thread.join(10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def readEvents(port: int, host: str) -> tuple[bytes, list[float]]:
    """
    Read the event stream; return the de-chunked body and each event's
    latency.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(f"GET /events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode())
        raw = b""
        latencies = []
        while not raw.endswith(b"0\r\n\r\n"):
            data = s.recv(65536)
            if not data:
                break
            now = time.monotonic()
            raw += data
            latencies += [now - float(t) for t in re.findall(rb"t=([0-9.]+)\n\n", data)]
    body = b"".join(re.findall(rb"[0-9a-f]+\r\n(.*?)\r\n", raw.split(b"\r\n\r\n", 1)[1], re.S))
    return body, latencies


def test_websocket_and_sse_through_twistd(tmp_path: Path, procs: list[Proc], eventServer: int, wsServer: int) -> None:
    """
    One relay, one agent with two http tunnels (agent.ini): a WebSocket
    echoes a 4 MiB message, and an event stream arrives event by event with
    heartbeats between events only.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TXTUNNEL_")}
    env.update(HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1")
    relay, port = startRelay(procs, env, tmp_path / "state")
    ini = tmp_path / "agent.ini"
    ini.write_text(
        f"[agent]\nrelay = ws://127.0.0.1:{port}\n\n"
        f"[tunnel:ws]\ntype = http\ntarget = {wsServer}\nsubdomain = sock\n\n"
        f"[tunnel:sse]\ntype = http\ntarget = {eventServer}\nsubdomain = events\nsse-heartbeat = 0.2\n"
    )
    agent = twistd(procs, env, "tunnelagent", "--config", str(ini))
    agent.waitFor(re.escape(f"tunnel ready: http://sock.localhost:{port}/"))
    agent.waitFor(re.escape(f"tunnel ready: http://events.localhost:{port}/"))

    payload = os.urandom(4 * 1024 * 1024)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with sock, connect(f"ws://sock.localhost:{port}/echo", sock=sock, proxy=None, max_size=None) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "hello"
        ws.send(payload)
        assert ws.recv(timeout=30) == payload

    body, latencies = readEvents(port, f"events.localhost:{port}")
    events = [line for line in body.split(b"\n\n") if line]
    assert [e.split(b" t=")[0] for e in events if e != b":"] == [
        b"data: 0",
        b"data: 1",
        b"event: split\ndata: 2",
        b"data: 3",
        b"data: 4",
    ]
    assert events.count(b":") >= 4  # some in each 0.5 s pause between events
    assert len(latencies) == 5 and max(latencies) < 1.0, latencies
    print(f"twistd SSE latency: max {max(latencies) * 1000:.1f}ms")

    for p in (agent, relay):
        assert p.stop() in STOPPED_BY_SIGTERM
    assert "Traceback" not in relay.output + agent.output


class _Lines(socketserver.BaseRequestHandler):
    """
    A bare HTTP/1.1 server: one chunked NDJSON stream per connection, five
    lines 0.4 s apart, each stamped with the time it is written.
    """

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if readHead(sock) is None:
            return
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(5):
            time.sleep(0.4)
            sock.sendall(chunk(b'{"i": %d, "t": %.6f}\n' % (i, time.monotonic())))
        sock.sendall(b"0\r\n\r\n")


class _Peer:
    """
    The local WebSocket service: C{/echo} echoes and notes the close code
    and reason the visitor sent; C{/close} closes at once with its own.
    The extensions each connection offered and negotiated are noted too.
    """

    def __init__(self) -> None:
        self.closes: queue.Queue[tuple[int | None, str | None]] = queue.Queue()
        self.offered: list[str] = []
        self.negotiated: list[str] = []

    def __call__(self, ws: ServerConnection) -> None:
        assert ws.request is not None and ws.response is not None
        self.offered.append(ws.request.headers.get("Sec-WebSocket-Extensions", ""))
        self.negotiated.append(ws.response.headers.get("Sec-WebSocket-Extensions", ""))
        if ws.request.path == "/close":
            ws.close(4002, "server says bye")
            return
        try:
            for message in ws:
                ws.send(message)
        except ConnectionClosed:
            pass
        self.closes.put((ws.close_code, ws.close_reason))


def _serveThread(server: socketserver.BaseServer | object) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)  # type: ignore[attr-defined]
    thread.start()
    return thread


def readLines(port: int, host: str) -> tuple[list[bytes], list[float]]:
    """
    Read the NDJSON stream; return its lines and each one's latency from
    being written to arriving.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(f"GET /lines HTTP/1.1\r\nHost: {host}\r\nAccept: application/x-ndjson\r\n\r\n".encode())
        raw = b""
        latencies = []
        while not raw.endswith(b"0\r\n\r\n"):
            data = s.recv(65536)
            if not data:
                break
            now = time.monotonic()
            raw += data
            latencies += [now - float(t) for t in re.findall(rb'"t": ([0-9.]+)\}\n', data)]
    head, rest = raw.split(b"\r\n\r\n", 1)
    assert b"application/x-ndjson" in head
    body = b"".join(re.findall(rb"[0-9a-f]+\r\n(.*?)\r\n", rest, re.S))
    return body.splitlines(), latencies


@pytest.mark.slow
def test_websocket_ndjson_and_media_through_twistd(tmp_path: Path, procs: list[Proc]) -> None:
    """
    Through twistd relay and agent processes: a 16 MiB WebSocket message
    each way with permessage-deflate negotiated by the two ends (the
    visitor's offer reaches the local server and its answer reaches the
    visitor), close codes and reasons both ways; an NDJSON stream that
    arrives line by line as written; and Range requests for a video file
    served by C{twistd web} answered 206 with the right bytes.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TXTUNNEL_")}
    env.update(HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1")

    peer = _Peer()
    wsServer = serve(peer, "127.0.0.1", 0, max_size=None, ping_interval=None)
    wsThread = _serveThread(wsServer)
    lines = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Lines)
    lines.daemon_threads = True
    linesThread = _serveThread(lines)
    media = tmp_path / "media"
    media.mkdir()
    clip = os.urandom(1 << 20)
    (media / "clip.mp4").write_bytes(clip)
    webPort = freePort()
    web = Proc(
        [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "web",
         "--listen", f"tcp:{webPort}:interface=127.0.0.1", "--path", str(media)],
        env,
    )  # fmt: skip
    procs.append(web)
    web.waitFor("Site starting on")
    try:
        relay, port = startRelay(procs, env, tmp_path / "state")
        ini = tmp_path / "agent.ini"
        ini.write_text(
            f"[agent]\nrelay = ws://127.0.0.1:{port}\n\n"
            f"[tunnel:ws]\ntype = http\ntarget = {wsServer.socket.getsockname()[1]}\nsubdomain = sock\n\n"
            f"[tunnel:lines]\ntype = http\ntarget = {lines.server_address[1]}\nsubdomain = lines\n\n"
            f"[tunnel:media]\ntype = http\ntarget = {webPort}\nsubdomain = media\n"
        )
        agent = twistd(procs, env, "tunnelagent", "--config", str(ini))
        for name in ("sock", "lines", "media"):
            agent.waitFor(re.escape(f"tunnel ready: http://{name}.localhost:{port}/"))

        big = os.urandom(16 << 20)
        text = "compressible " * (1 << 16)
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        with sock, connect(f"ws://sock.localhost:{port}/echo", sock=sock, proxy=None, max_size=None) as ws:
            assert ws.response is not None
            answer = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            assert answer.startswith("permessage-deflate"), answer
            ws.send(text)
            assert ws.recv(timeout=30) == text
            ws.send(big)
            assert ws.recv(timeout=120) == big
            ws.close(4001, "visitor says bye")
        assert peer.closes.get(timeout=20) == (4001, "visitor says bye")
        assert "permessage-deflate" in peer.offered[0]
        assert peer.negotiated[0] == answer

        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        with sock, connect(f"ws://sock.localhost:{port}/close", sock=sock, proxy=None) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=20)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4002, "server says bye")

        received, latencies = readLines(port, f"lines.localhost:{port}")
        assert [line.split(b', "t"')[0] for line in received] == [b'{"i": %d' % i for i in range(5)]
        assert len(latencies) == 5 and max(latencies) < 0.35, latencies  # each before the next is written
        print(f"twistd NDJSON latency: max {max(latencies) * 1000:.1f}ms")

        host = f"media.localhost:{port}"
        for spec, start, end in (("1000-1999", 1000, 1999), ("-576", len(clip) - 576, len(clip) - 1)):
            result = subprocess.run(
                ["curl", "-sS", "--max-time", "20", "-D", "-", "-r", spec,
                 "--resolve", f"{host}:127.0.0.1", f"http://{host}/clip.mp4"],
                capture_output=True, timeout=30,
            )  # fmt: skip
            head, body = result.stdout.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 206"), result.stdout[:300] + result.stderr
            assert f"content-range: bytes {start}-{end}/{len(clip)}".encode() in head.lower()
            assert b"content-type: video/mp4" in head.lower()
            assert body == clip[start : end + 1]

        for p in (agent, relay):
            assert p.stop() in STOPPED_BY_SIGTERM
        assert "Traceback" not in relay.output + agent.output
    finally:
        wsServer.shutdown()
        lines.shutdown()
        lines.server_close()
        wsThread.join(10)
        linesThread.join(5)
