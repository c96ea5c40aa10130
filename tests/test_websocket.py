"""
WebSocket through an http tunnel, end to end: a real relay and agent in
process, a local WebSocket server and client from the C{websockets} library
(not autobahn, which the link itself uses), all on loopback.

The server runs in its own threads (C{websockets.sync.server}); the client
runs in a thread via L{inThread} while the reactor serves the relay and the
agent.  The client dials the relay's port itself and names the tunnel in the
URI, so the C{Host} header is C{NAME.localhost:PORT} as a browser would send.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http import HTTPStatus
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import Server, ServerConnection, serve

from tests.conftest import Relay, RunningAgent, closedPort, inThread, startAgent

MiB = 1024 * 1024
BIG = 16 * MiB


class WSOrigin:
    """
    A local WebSocket service with one behaviour per path; what it observes
    (close codes, fragments, request headers) goes to L{events}.
    """

    def __init__(self, maxSize: int = 2 * BIG) -> None:
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.server: Server = serve(
            self.handle,
            "127.0.0.1",
            0,
            process_request=self.processRequest,
            max_size=maxSize,
            ping_interval=None,
            close_timeout=2,
        )
        self.port: int = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="ws-origin", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)

    def event(self, kind: str, timeout: float = 10.0) -> Any:
        """
        The next observation of C{kind} (others are skipped).
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the local WebSocket server saw no {kind!r} in {timeout}s")
            got, value = self.events.get(timeout=left)
            if got == kind:
                return value

    def processRequest(self, connection: ServerConnection, request: Any) -> Any:
        self.events.put(("headers", dict(request.headers.raw_items())))
        if request.path == "/refuse":
            return connection.respond(HTTPStatus.FORBIDDEN, "no WebSocket for you\n")
        return None

    def handle(self, ws: ServerConnection) -> None:
        path = ws.request.path if ws.request is not None else "/"
        self.events.put(("extensions", [e.name for e in ws.protocol.extensions]))
        try:
            if path == "/echo":
                for message in ws:
                    ws.send(message)
            elif path == "/fragments":
                # Report how the client's message arrived, then send one in pieces.
                pieces = list(ws.recv_streaming())
                ws.send(json.dumps(pieces))
                ws.send(["one ", "two ", "three"])
                ws.send([b"\x00\x01", b"\x02\x03"])
                ws.recv()
            elif path == "/ping":
                waiter = ws.ping(b"from-server")
                ws.send("pong seen" if waiter.wait(5) else "no pong")
                ws.recv()
            elif path == "/close":
                ws.recv()
                ws.close(4001, "server says bye")
            elif path == "/quiet":
                delay = float(ws.recv())
                time.sleep(delay)
                ws.send("late answer")
                ws.recv()
            elif path == "/drop":
                # Cut the TCP connection mid-socket, with no close frame.
                ws.recv()
                ws.socket.shutdown(socket.SHUT_RDWR)
                ws.socket.close()
            elif path == "/hold":
                self.events.put(("holding", path))
                ws.recv()
        except ConnectionClosed:
            pass
        finally:
            rcvd = ws.protocol.close_rcvd
            self.events.put(("closed", (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)))


@pytest.fixture
def wsOrigin() -> Iterator[WSOrigin]:
    origin = WSOrigin()
    yield origin
    # Closing open sockets needs the reactor (they may cross the tunnel).
    pytest_twisted.blockon(threads.deferToThread(origin.stop))


@contextmanager
def wsConnect(relay: Relay, name: str, path: str, **kwargs: Any) -> Iterator[ClientConnection]:
    """
    Open a WebSocket to C{ws://NAME.localhost:PORT/PATH} through the relay,
    on a socket dialled to loopback by hand (C{*.localhost} need not resolve).
    """
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    kwargs.setdefault("max_size", 2 * BIG)  # compressed random data grows a little
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("open_timeout", 10)
    kwargs.setdefault("close_timeout", 5)
    with sock, connect(f"ws://{name}.localhost:{relay.port}{path}", sock=sock, proxy=None, **kwargs) as ws:
        yield ws


async def startWSAgent(agents: list[RunningAgent], relay: Relay, port: int, name: str, *args: str) -> RunningAgent:
    return await startAgent(agents, relay, "--http", str(port), "--subdomain", name, *args)


@pytest_twisted.ensureDeferred
async def test_text_and_binary_echo(relay: Relay, agents: list[RunningAgent], wsOrigin: WSOrigin) -> None:
    """
    Text frames come back as text, binary as binary, byte for byte; the
    upgrade request reaches the local server with its WebSocket headers.
    """
    await startWSAgent(agents, relay, wsOrigin.port, "ws")

    def client() -> list[Any]:
        with wsConnect(relay, "ws", "/echo") as ws:
            got = []
            for message in ("hello", "héllo wörld ✓", "", b"\x00\xff" * 100, b""):
                ws.send(message)
                got.append(ws.recv(timeout=10))
            return got

    got = await inThread(client)
    assert got == ["hello", "héllo wörld ✓", "", b"\x00\xff" * 100, b""]
    assert [type(g) for g in got] == [str, str, str, bytes, bytes]
    headers = {k.lower(): v for k, v in wsOrigin.event("headers").items()}
    assert headers["upgrade"].lower() == "websocket"
    assert headers["host"] == f"ws.localhost:{relay.port}"
    assert headers["x-forwarded-for"] == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_fragmented_messages(relay: Relay, agents: list[RunningAgent], wsOrigin: WSOrigin) -> None:
    """
    A message sent in fragments arrives in the same fragments, both ways.
    """
    await startWSAgent(agents, relay, wsOrigin.port, "frag")

    def client() -> tuple[Any, list[Any], list[Any]]:
        with wsConnect(relay, "frag", "/fragments") as ws:
            ws.send(["a", "bc", "def"])
            report = json.loads(ws.recv(timeout=10))
            text = list(ws.recv_streaming())
            binary = list(ws.recv_streaming())
            ws.send("done")
            return report, text, binary

    report, text, binary = await inThread(client)
    # websockets ends a fragmented message with an empty final frame.
    assert report == ["a", "bc", "def", ""]
    assert text == ["one ", "two ", "three", ""]
    assert binary == [b"\x00\x01", b"\x02\x03", b""]


@pytest_twisted.ensureDeferred
async def test_ping_pong_both_ways(relay: Relay, agents: list[RunningAgent], wsOrigin: WSOrigin) -> None:
    """
    A ping from the client is answered by the server's pong with the same
    payload, and a ping from the server by the client's.
    """
    await startWSAgent(agents, relay, wsOrigin.port, "ping")

    def client() -> tuple[bool, Any, float]:
        with wsConnect(relay, "ping", "/ping") as ws:
            serverSaw = ws.recv(timeout=10)
            start = time.monotonic()
            answered = ws.ping(b"from-client").wait(5)
            rtt = time.monotonic() - start
            ws.send("done")
            return answered, serverSaw, rtt

    answered, serverSaw, rtt = await inThread(client)
    assert answered
    assert serverSaw == "pong seen"
    assert rtt < 1.0


@pytest_twisted.ensureDeferred
async def test_close_code_and_reason_from_server(relay: Relay, agents: list[RunningAgent], wsOrigin: WSOrigin) -> None:
    """
    The server's close code and reason reach the client unchanged.
    """
    await startWSAgent(agents, relay, wsOrigin.port, "bye")

    def client() -> tuple[int, str]:
        with wsConnect(relay, "bye", "/close") as ws:
            ws.send("close please")
            with pytest.raises(ConnectionClosed) as caught:
                ws.recv(timeout=10)
            rcvd = caught.value.rcvd
            assert rcvd is not None
            return rcvd.code, rcvd.reason

    assert await inThread(client) == (4001, "server says bye")


@pytest_twisted.ensureDeferred
async def test_close_code_and_reason_from_client(relay: Relay, agents: list[RunningAgent], wsOrigin: WSOrigin) -> None:
    """
    The client's close code and reason reach the server unchanged, and the
    closing handshake completes (the client sees the server's echo).
    """
    await startWSAgent(agents, relay, wsOrigin.port, "cbye")

    def client() -> tuple[int | None, str | None]:
        with wsConnect(relay, "cbye", "/echo") as ws:
            ws.send("x")
            ws.recv(timeout=10)
            ws.close(4002, "client says bye")
            rcvd = ws.protocol.close_rcvd
        return (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)

    assert await inThread(client) == (4002, "client says bye")
    assert await inThread(wsOrigin.event, "closed") == (4002, "client says bye")


@pytest_twisted.ensureDeferred
async def test_permessage_deflate_end_to_end(relay: Relay, agents: list[RunningAgent], wsOrigin: WSOrigin) -> None:
    """
    permessage-deflate is negotiated between the client and the local server
    (the relay and agent do not touch the headers), and compressed messages
    cross the link compressed: 4 MiB of zeros moves a few KiB on the link.
    """
    agent = await startWSAgent(agents, relay, wsOrigin.port, "deflate")
    link = agent.agent.session.link  # type: ignore[union-attr]

    def client() -> tuple[str, list[str], bool]:
        with wsConnect(relay, "deflate", "/echo", compression="deflate") as ws:
            offered = ws.response.headers.get("Sec-WebSocket-Extensions", "") if ws.response else ""
            negotiated = [str(e.name) for e in ws.protocol.extensions]
            payload = bytes(4 * MiB)
            ws.send(payload)
            same = ws.recv(timeout=30) == payload
            return offered, negotiated, same

    before = link.bytesIn + link.bytesOut
    offered, negotiated, same = await inThread(client)
    moved = link.bytesIn + link.bytesOut - before
    assert offered.startswith("permessage-deflate")
    assert negotiated == ["permessage-deflate"]
    assert same
    assert await inThread(wsOrigin.event, "extensions") == ["permessage-deflate"]
    assert moved < 256 * 1024, f"{moved} bytes crossed the link for 8 MiB of compressible messages"


@pytest.mark.parametrize("compression", [None, "deflate"])
@pytest_twisted.ensureDeferred
async def test_16_mib_message_both_ways(
    relay: Relay, agents: list[RunningAgent], wsOrigin: WSOrigin, compression: str | None
) -> None:
    """
    A 16 MiB binary message goes to the server and comes back intact.
    """
    await startWSAgent(agents, relay, wsOrigin.port, "big")
    payload = os.urandom(BIG)

    def client() -> tuple[str, float]:
        with wsConnect(relay, "big", "/echo", compression=compression) as ws:
            start = time.monotonic()
            ws.send(payload)
            back = ws.recv(timeout=60)
            elapsed = time.monotonic() - start
            assert isinstance(back, bytes) and len(back) == BIG
            return hashlib.sha256(back).hexdigest(), elapsed

    digest, elapsed = await inThread(client)
    assert digest == hashlib.sha256(payload).hexdigest()
    print(f"16 MiB round trip (compression={compression}): {elapsed:.2f}s")


@pytest_twisted.ensureDeferred
async def test_concurrent_sockets(relay: Relay, agents: list[RunningAgent], wsOrigin: WSOrigin) -> None:
    """
    Eight sockets at once, each with its own interleaved messages, never
    see each other's data.
    """
    await startWSAgent(agents, relay, wsOrigin.port, "many")
    count = 8

    def client() -> list[list[str]]:
        with ExitStack() as stack:
            sockets = [stack.enter_context(wsConnect(relay, "many", "/echo")) for _ in range(count)]
            results: list[list[str]] = [[] for _ in range(count)]
            for round_ in range(20):
                for i, ws in enumerate(sockets):
                    ws.send(f"socket {i} message {round_} " + "x" * (round_ * 500))
                for i, ws in enumerate(sockets):
                    results[i].append(str(ws.recv(timeout=10)).rstrip("x").rstrip())
            return results

    results = await inThread(client)
    for i, messages in enumerate(results):
        assert messages == [f"socket {i} message {r}" for r in range(20)]


@pytest_twisted.ensureDeferred
async def test_sockets_in_parallel_threads(relay: Relay, agents: list[RunningAgent], wsOrigin: WSOrigin) -> None:
    """
    Several clients in their own threads, each echoing 1 MiB, all finish.
    """
    await startWSAgent(agents, relay, wsOrigin.port, "par")

    def client(i: int) -> str:
        data = os.urandom(MiB)
        with wsConnect(relay, "par", "/echo") as ws:
            ws.send(data)
            back = ws.recv(timeout=30)
        return "ok" if back == data else f"socket {i} corrupted"

    from twisted.internet import defer

    results = await defer.gatherResults([defer.ensureDeferred(inThread(client, i)) for i in range(6)])
    assert results == ["ok"] * 6


def rawUpgrade(port: int, host: str, path: str) -> tuple[bytes, float]:
    """
    Send an upgrade request by hand; read until the relay closes.
    @return: what came back and how long the relay took to close.
    """
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks), time.monotonic() - start


@pytest_twisted.ensureDeferred
async def test_local_server_refuses_upgrade(relay: Relay, agents: list[RunningAgent], wsOrigin: WSOrigin) -> None:
    """
    When the local server answers the upgrade with 403, the client gets the
    403 and its body; the relay then closes that connection (its bytes can
    no longer be trusted to be HTTP), and the tunnel keeps working.
    """
    await startWSAgent(agents, relay, wsOrigin.port, "no")

    def client() -> tuple[int, bytes]:
        with pytest.raises(InvalidStatus) as caught, wsConnect(relay, "no", "/refuse"):
            pass
        response = caught.value.response
        return response.status_code, bytes(response.body or b"")

    status, body = await inThread(client)
    assert status == 403
    assert body == b"no WebSocket for you\n"
    data, elapsed = await inThread(rawUpgrade, relay.port, f"no.localhost:{relay.port}", "/refuse")
    assert data.startswith(b"HTTP/1.1 403"), data
    assert data.endswith(b"no WebSocket for you\n")
    assert elapsed < 5

    def works() -> Any:
        with wsConnect(relay, "no", "/echo") as ws:
            ws.send("still here")
            return ws.recv(timeout=10)

    assert await inThread(works) == "still here"


@pytest_twisted.ensureDeferred
async def test_local_service_down_gives_502(relay: Relay, agents: list[RunningAgent]) -> None:
    """
    An upgrade for a tunnel whose local service is down gets a 502 naming why.
    """
    port = closedPort()
    await startWSAgent(agents, relay, port, "wsdown")

    def client() -> tuple[int, bytes]:
        with pytest.raises(InvalidStatus) as caught, wsConnect(relay, "wsdown", "/echo"):
            pass
        response = caught.value.response
        return response.status_code, bytes(response.body or b"")

    status, body = await inThread(client)
    assert status == 502
    assert f"127.0.0.1:{port} refused the connection".encode() in body


@pytest_twisted.ensureDeferred
async def test_message_over_servers_max_size_closes_1009(relay: Relay, agents: list[RunningAgent]) -> None:
    """
    A message larger than the local server's C{max_size} (1 MiB here)
    crosses the tunnel whole; the server closes with 1009 (message too
    big) and the visitor receives that code and reason, not a dropped connection,
    while smaller messages before it were echoed.
    """
    small = WSOrigin(maxSize=MiB)
    try:
        await startWSAgent(agents, relay, small.port, "limited")

        def client() -> tuple[Any, int | None, str | None]:
            with wsConnect(relay, "limited", "/echo", compression=None) as ws:
                ws.send(b"x" * 1000)
                first = ws.recv(timeout=10)
                ws.send(os.urandom(2 * MiB))
                with pytest.raises(ConnectionClosed) as caught:
                    ws.recv(timeout=20)
                rcvd = caught.value.rcvd
                return first, rcvd.code if rcvd else None, rcvd.reason if rcvd else None

        first, code, reason = await inThread(client)
        assert first == b"x" * 1000
        assert code == 1009, (code, reason)
        assert reason and "exceeds limit" in reason  # the reason the server gave, untouched
    finally:
        await threads.deferToThread(small.stop)


@pytest_twisted.ensureDeferred
async def test_local_server_drops_mid_socket(relay: Relay, agents: list[RunningAgent], wsOrigin: WSOrigin) -> None:
    """
    A local server that cuts its TCP connection mid-socket, with no close
    frame, is seen by the visitor as an abnormal close (1006) promptly,
    not as a socket that stays open.
    """
    await startWSAgent(agents, relay, wsOrigin.port, "dropper")

    def client() -> tuple[str, float]:
        with wsConnect(relay, "dropper", "/drop") as ws:
            ws.send("go")
            start = time.monotonic()
            try:
                ws.recv(timeout=20)
            except ConnectionClosed as e:
                assert e.rcvd is None  # no close frame: 1006 on the visitor's side
                return type(e).__name__, time.monotonic() - start
            except TimeoutError:
                return "timeout", time.monotonic() - start
            return "message", time.monotonic() - start

    outcome, after = await inThread(client)
    assert outcome == "ConnectionClosedError"
    assert after < 5.0, after


@pytest.mark.parametrize("how", ["stop", "drop"])
@pytest_twisted.ensureDeferred
async def test_agent_gone_mid_socket(relay: Relay, agents: list[RunningAgent], wsOrigin: WSOrigin, how: str) -> None:
    """
    When the agent goes away (stops, or its link connection is cut) while
    a socket is open, the client sees the connection close within a couple
    of seconds, and the local server's connection is closed too.
    """
    agent = await startWSAgent(agents, relay, wsOrigin.port, "flaky")
    stack = ExitStack()
    ws = await inThread(stack.enter_context, wsConnect(relay, "flaky", "/echo"))

    def waitForClose() -> tuple[str, float]:
        try:
            ws.recv(timeout=20)
        except ConnectionClosed as e:
            return type(e).__name__, time.monotonic()
        except TimeoutError:
            return "timeout", time.monotonic()
        return "message", time.monotonic()

    def echoOnce() -> Any:
        ws.send("before")
        return ws.recv(timeout=10)

    try:
        assert await inThread(echoOnce) == "before"
        waiting = inThread(waitForClose)
        await task.deferLater(reactor, 0.2, lambda: None)
        start = time.monotonic()
        if how == "stop":
            await agent.stop()
        else:
            session = agent.agent.session
            assert session is not None
            session.carrier.transport.abortConnection()
        outcome, at = await waiting
        assert outcome == "ConnectionClosedError"
        assert at - start < 2.0, f"client saw the close {at - start:.2f}s after the agent left"
        print(f"agent gone ({how}): the client saw the close after {(at - start) * 1000:.1f}ms")
        assert await inThread(wsOrigin.event, "closed") is not None
    finally:
        await inThread(stack.close)


@pytest_twisted.ensureDeferred
async def test_quiet_server_is_not_cut_by_response_timeout(
    relay: Relay, agents: list[RunningAgent], wsOrigin: WSOrigin
) -> None:
    """
    The response timeout is for HTTP answers: once a socket is open, a server
    that stays quiet after a client's message longer than the timeout is
    within its rights.
    """
    await startWSAgent(agents, relay, wsOrigin.port, "quiet", "--response-timeout", "0.5")

    def client() -> Any:
        with wsConnect(relay, "quiet", "/quiet") as ws:
            ws.send("1.5")
            answer = ws.recv(timeout=10)
            ws.send("done")
            return answer

    assert await inThread(client) == "late answer"


@pytest_twisted.ensureDeferred
async def test_wss_through_https_listener(tmp_path: Any, agents: list[RunningAgent], wsOrigin: WSOrigin) -> None:
    """
    A wss:// socket through the relay's TLS listener reaches the local
    (plain ws://) server, and echoes.
    """
    import ssl

    from twisted.internet import defer

    from tests.conftest import startRelay
    from tests.test_http_tunnel import selfSignedCertificate

    key, cert = selfSignedCertificate(tmp_path)
    relay = await startRelay(
        str(tmp_path / "state"), "--https", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    )
    try:
        await startWSAgent(agents, relay, wsOrigin.port, "secure")
        port = relay.relay.httpsPort
        context = ssl.create_default_context(cafile=cert)

        def client() -> Any:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            uri = f"wss://secure.localhost:{port}/echo"
            with sock, connect(uri, sock=sock, ssl=context, server_hostname="secure.localhost", proxy=None) as ws:
                ws.send("over tls")
                return ws.recv(timeout=10)

        assert await inThread(client) == "over tls"
        headers = {k.lower(): v for k, v in wsOrigin.event("headers").items()}
        assert headers["x-forwarded-proto"] == "https"
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_upgrade_ignored_by_plain_server(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    A server that ignores the Upgrade header and answers normally (as
    twisted.web does) keeps the connection: a second request on it is
    answered too, its bytes passed through as they are.
    """
    import h11

    await startWSAgent(agents, relay, origin, "plain")
    host = f"plain.localhost:{relay.port}"

    def exchange() -> list[tuple[int, bytes]]:
        results = []
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            for path, extra in (("/hello/1", "Upgrade: websocket\r\nConnection: Upgrade\r\n"), ("/hello/2", "")):
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
                conn = h11.Connection(h11.CLIENT)
                conn.send(h11.Request(method="GET", target=path, headers=[("Host", host)]))
                conn.send(h11.EndOfMessage())
                status, body = 0, b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(s.recv(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                results.append((status, body))
        return results

    (first, body1), (second, body2) = await inThread(exchange)
    assert (first, second) == (200, 200)
    assert b"path=/hello/1" in body1 and b"path=/hello/2" in body2
