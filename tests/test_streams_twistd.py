"""
WebSocket and SSE through C{twistd tunnelrelay} and C{twistd tunnelagent}
processes, as a user runs them; the local services and the clients are in
this process (threads), so the clock that stamps an event when it is
written is the one that notes when it arrives.
"""

from __future__ import annotations

import os
import re
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect
from websockets.sync.server import ServerConnection, serve

from tests.test_contract import STOPPED_BY_SIGTERM, Proc, startRelay, twistd

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
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                return
            head += data
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
