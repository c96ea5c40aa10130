"""
HTTP tunnels end to end: a real relay and agent in process, real origin
servers and real clients (curl, raw sockets in a thread) on loopback.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any

import h11
import pytest
import pytest_twisted

from tests.conftest import Relay, RunningAgent, closedPort, curl, inThread, pattern, readHead, startAgent


def hostOf(agent: RunningAgent, relay: Relay) -> str:
    address = agent.address()
    return address.split("//", 1)[1].rstrip("/")


def rawExchange(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    """
    Send C{payload} on one connection, half-close, read until the server closes.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def parseResponses(data: bytes, methods: list[bytes] | None = None) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """
    Parse a byte stream of responses with h11 (a client-side oracle).
    """
    results = []
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    for method in methods or [b"GET"]:
        if conn.our_state is not h11.IDLE:
            break
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        status = 0
        headers: dict[bytes, bytes] = {}
        body = b""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.lower(): v for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)) or event is h11.NEED_DATA:
                break
        results.append((status, headers, body))
        if conn.their_state is h11.MUST_CLOSE or conn.their_state is h11.CLOSED:
            break
        conn.start_next_cycle()
    return results


@pytest_twisted.ensureDeferred
async def test_get_through_tunnel(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    A page is served at NAME.<domain> with X-Forwarded-* added, reached
    with curl both by Host header and by a name that resolves to loopback.
    """
    agent = await startAgent(agents, relay, "--http", str(origin), "--subdomain", "demo")
    assert agent.address() == f"http://demo.localhost:{relay.port}/"
    code, out, err = await curl("-H", f"Host: demo.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/hello?x=1")
    assert code == 0, err
    assert b"hello from origin" in out
    assert b"path=/hello?x=1" in out
    assert b"x-forwarded-for=127.0.0.1" in out
    assert b"x-forwarded-proto=http" in out
    assert f"x-forwarded-host=demo.localhost:{relay.port}".encode() in out
    code, out, err = await curl("--resolve", f"demo.localhost:{relay.port}:127.0.0.1", agent.address())
    assert code == 0 and b"hello from origin" in out, err


@pytest_twisted.ensureDeferred
async def test_random_name_when_none_asked(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    Without --subdomain the relay picks a readable random name that works.
    """
    agent = await startAgent(agents, relay, "--http", str(origin))
    host = hostOf(agent, relay)
    name = host.split(".", 1)[0]
    assert len(name.split("-")) == 3
    code, out, _ = await curl("-H", f"Host: {host}", f"http://127.0.0.1:{relay.port}/")
    assert code == 0 and b"hello from origin" in out


@pytest.mark.parametrize(
    "host, status, words",
    [
        (b"nope.localhost", 404, b"no tunnel named 'nope'"),
        (b"localhost", 404, b"this is a txtunnel relay"),
        (b"127.0.0.1", 404, b"this is a txtunnel relay"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_unknown_names(relay: Relay, host: bytes, status: int, words: bytes) -> None:
    """
    Unknown names and the bare domain get 404 with a short plain-text reason.
    """
    data = await inThread(rawExchange, relay.port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    [(got, headers, body)] = parseResponses(data)
    assert got == status
    assert headers[b"content-type"].startswith(b"text/plain")
    assert words in body


@pytest.mark.parametrize(
    "request_, status",
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a.localhost\n\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a.localhost\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a.localhost\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: a.localhost\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431),
        (b"GET /_txtunnel HTTP/1.1\r\nHost: localhost\r\n\r\n", 426),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(40) + b"\r\n\r\n", 400),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_requests_get_clear_errors(
    relay: Relay, agents: list[RunningAgent], origin: int, request_: bytes, status: int
) -> None:
    """
    Malformed or hostile request heads get a status with a reason, and a
    good request on a tunnel still works afterwards.
    """
    agent = await startAgent(agents, relay, "--http", str(origin), "--subdomain", "ok")
    data = await inThread(rawExchange, relay.port, request_)
    [(got, _, body)] = parseResponses(data)
    assert got == status, body
    assert body.strip()
    code, out, _ = await curl("-H", f"Host: {hostOf(agent, relay)}", f"http://127.0.0.1:{relay.port}/")
    assert code == 0 and b"hello from origin" in out


@pytest_twisted.ensureDeferred
async def test_keepalive_and_pipelining(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    Three pipelined requests on one connection come back, in order, on one
    stream to the local service.
    """
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "pipe")
    host = f"pipe.localhost:{relay.port}".encode()
    payload = b"".join(b"GET /hello/" + str(i).encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n" for i in range(3))
    data = await inThread(rawExchange, relay.port, payload)
    responses = parseResponses(data, [b"GET"] * 3)
    assert [r[0] for r in responses] == [200, 200, 200]
    assert [b"path=/hello/%d" % i in r[2] for i, r in enumerate(responses)] == [True, True, True]


@pytest_twisted.ensureDeferred
async def test_connection_switches_between_tunnels(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    Requests for two tunnels on one keep-alive connection each reach their
    own tunnel, answered in order.
    """
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "one")
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "two")

    def exchange() -> list[bytes]:
        bodies = []
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            for name in (b"one", b"two", b"one"):
                s.sendall(b"GET /hello/" + name + b" HTTP/1.1\r\nHost: " + name + b".localhost\r\n\r\n")
                conn = h11.Connection(h11.CLIENT)
                conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
                conn.send(h11.EndOfMessage())
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(s.recv(65536))
                        continue
                    if isinstance(event, h11.Data):
                        body += event.data
                    if isinstance(event, h11.EndOfMessage):
                        break
                bodies.append(body)
        return bodies

    bodies = await inThread(exchange)
    assert [b"path=/hello/" + n in b for n, b in zip((b"one", b"two", b"one"), bodies, strict=True)] == [
        True,
        True,
        True,
    ]
    assert b"x-forwarded-host=two.localhost" in bodies[1]


@pytest_twisted.ensureDeferred
async def test_chunked_upload_streams_unchanged(
    relay: Relay, agents: list[RunningAgent], origin: int, tmp_path: Any
) -> None:
    """
    A chunked 8 MiB upload reaches the local service intact (sha256) and the
    echoed body comes back whole.
    """
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "up")
    body = pattern(8 * 1024 * 1024)
    path = tmp_path / "body"
    path.write_bytes(body)
    out = tmp_path / "out"
    code, headers, err = await curl(
        "-D",
        "-",
        "-o",
        str(out),
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        f"Host: up.localhost:{relay.port}",
        "--data-binary",
        f"@{path}",
        f"http://127.0.0.1:{relay.port}/echo",
    )
    assert code == 0, err
    assert hashlib.sha256(body).hexdigest().encode() in headers
    assert out.read_bytes() == body


@pytest_twisted.ensureDeferred
async def test_streamed_download(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    A 32 MiB response streamed by the local service arrives byte-exact.
    """
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "down")
    n = 32 * 1024 * 1024
    code, out, err = await curl("-H", f"Host: down.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/big?n={n}")
    assert code == 0, err
    assert len(out) == n
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(pattern(65536) * 512).hexdigest()


@pytest_twisted.ensureDeferred
async def test_local_service_down_gives_502(relay: Relay, agents: list[RunningAgent]) -> None:
    """
    When nothing listens at the target the visitor gets 502 naming why.
    """
    port = closedPort()
    await startAgent(agents, relay, "--http", str(port), "--subdomain", "down")
    code, out, err = await curl("-i", "-H", f"Host: down.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/")
    assert code == 0, err
    assert out.startswith(b"HTTP/1.1 502")
    assert f"127.0.0.1:{port} refused the connection".encode() in out


@pytest_twisted.ensureDeferred
async def test_slow_local_service_gives_504(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    A local service that never answers gets the visitor a 504 after the
    response timeout.
    """
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "slow", "--response-timeout", "0.5")
    code, out, err = await curl(
        "-i", "-H", f"Host: slow.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/never"
    )
    assert code == 0, err
    assert out.startswith(b"HTTP/1.1 504")
    assert b"did not answer within 0.5s" in out


@pytest_twisted.ensureDeferred
async def test_name_in_use_is_refused(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    A second agent asking for a taken name is refused with a clear reason
    and gives up; the first keeps serving.
    """
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "taken")
    second = await startAgent(agents, relay, "--http", str(origin), "--subdomain", "taken", expectReady=False)
    with pytest.raises(RuntimeError, match="'taken' is in use"):
        await second.agent.ready
    code, out, _ = await curl("-H", f"Host: taken.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/")
    assert code == 0 and b"hello from origin" in out


@pytest_twisted.ensureDeferred
async def test_agent_gone_gives_502(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    After the agent disconnects its name is free again and visitors get 404;
    a request in flight when the link drops gets 502 promptly.
    """
    agent = await startAgent(agents, relay, "--http", str(origin), "--subdomain", "gone")
    from twisted.internet import defer, reactor, task

    d = task.deferLater(reactor, 0.3, lambda: defer.ensureDeferred(agent.stop()))
    code, out, err = await curl(
        "-i", "-H", f"Host: gone.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/never"
    )
    await d
    assert code == 0, err
    assert out.startswith(b"HTTP/1.1 502"), out
    code, out, _ = await curl("-i", "-H", f"Host: gone.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/")
    assert out.startswith(b"HTTP/1.1 404")


def selfSignedCertificate(directory: Any) -> tuple[str, str]:
    """
    Write a throwaway certificate for localhost and *.localhost.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName("secure.localhost")]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    keyPath, certPath = directory / "key.pem", directory / "cert.pem"
    keyPath.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    certPath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(keyPath), str(certPath)


@pytest_twisted.ensureDeferred
async def test_https_listener(tmp_path: Any, agents: list[RunningAgent], origin: int) -> None:
    """
    With --https given an ssl: endpoint, tunnels are served over TLS too
    (verified by curl against the certificate) with X-Forwarded-Proto https.
    """
    from twisted.internet import defer

    from tests.conftest import startRelay

    key, cert = selfSignedCertificate(tmp_path)
    relay = await startRelay(
        str(tmp_path / "state"), "--https", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    )
    try:
        await startAgent(agents, relay, "--http", str(origin), "--subdomain", "secure")
        port = relay.relay.httpsPort
        code, out, err = await curl(
            "--cacert",
            cert,
            "--resolve",
            f"secure.localhost:{port}:127.0.0.1",
            f"https://secure.localhost:{port}/hello",
        )
        assert code == 0, err
        assert b"hello from origin" in out
        assert b"x-forwarded-proto=https" in out
    finally:
        await defer.maybeDeferred(relay.service.stopService)


class _ClosingServer:
    """
    A local HTTP/1.1 server in a thread that answers each connection's
    first request with C{Connection: close} and then keeps the socket open
    for C{linger} seconds without reading (as some servers do before they
    get round to closing): a next request sent to it would never be
    answered.  It counts the connections it accepted.
    """

    def __init__(self, linger: float = 30.0, closeHeader: bool = True) -> None:
        import threading

        self.closeHeader = closeHeader
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.linger = linger
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import threading

        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            if readHead(conn) is None:
                return
            body = b"answer %d\n" % self.accepted
            close = b"Connection: close\r\n" if self.closeHeader else b""
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), close, body))
            self.stop.wait(self.linger)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(5)


@pytest_twisted.ensureDeferred
async def test_local_connection_close_closes_the_visitor_connection(relay: Relay, agents: list[RunningAgent]) -> None:
    """
    A local server's C{Connection: close} reaches the visitor as sent, and
    the relay keeps to it: the visitor's connection closes once that
    response is complete (RFC 9112 section 9.6), instead of staying open
    for a next request the relay would send to a server that will not
    answer it (which hung until the server closed).  A new connection gets
    a new answer from a new local connection.
    """
    server = _ClosingServer()
    try:
        await startAgent(agents, relay, "--http", str(server.port), "--subdomain", "closer")
        host = f"closer.localhost:{relay.port}"

        def twoRequests() -> tuple[bytes, bytes, float]:
            with socket.create_connection(("127.0.0.1", relay.port), timeout=15) as s:
                s.sendall(f"GET /one HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                first = b""
                while not first.endswith(b"answer 1\n"):
                    first += s.recv(65536)
                start = time.monotonic()
                try:
                    s.sendall(f"GET /two HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                except OSError:
                    pass
                rest = b""
                try:
                    while chunk := s.recv(65536):
                        rest += chunk
                except ConnectionResetError:
                    pass
                return first, rest, time.monotonic() - start

        first, rest, after = await inThread(twoRequests)
        assert first.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in first.lower()
        assert rest == b"" and after < 5, (rest, after)
        code, out, err = await curl("-H", f"Host: {host}", f"http://127.0.0.1:{relay.port}/again")
        assert out == b"answer 2\n", err
    finally:
        server.close()


@pytest.mark.parametrize(
    "request_line, extra",
    [("HTTP/1.1", "Connection: close\r\n"), ("HTTP/1.0", ""), ("HTTP/1.1", "Connection: keep-alive, Close\r\n")],
)
@pytest_twisted.ensureDeferred
async def test_visitor_connection_close_closes_after_the_answer(
    relay: Relay, agents: list[RunningAgent], request_line: str, extra: str
) -> None:
    """
    A visitor that says it sends nothing more (C{Connection: close}, or
    HTTP/1.0 without C{keep-alive}) gets its answer and then the end of the
    connection, even from a local server that keeps its side open: a
    client reading to the end of the connection must not hang.
    """
    server = _ClosingServer(closeHeader=False)
    try:
        await startAgent(agents, relay, "--http", str(server.port), "--subdomain", "keeper")
        host = f"keeper.localhost:{relay.port}"

        def oneRequest() -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", relay.port), timeout=15) as s:
                start = time.monotonic()
                s.sendall(f"GET /one {request_line}\r\nHost: {host}\r\n{extra}\r\n".encode())
                got = b""
                while chunk := s.recv(65536):
                    got += chunk
                return got, time.monotonic() - start

        got, took = await inThread(oneRequest)
        assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"answer 1\n"), got
        assert took < 5, took
    finally:
        server.close()
