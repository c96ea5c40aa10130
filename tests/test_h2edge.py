"""
The relay's HTTP/2 edge with real clients: curl over prior-knowledge h2c
and over TLS with ALPN, and a small h2-library client for what curl cannot
do (a body of unknown length, a reset, a hostile connection).  Plain
requests reach the (HTTP/1.1-only) origin translated to HTTP/1.1.
"""

from __future__ import annotations

import hashlib
import socket
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest_twisted
from twisted.internet import defer

from tests.conftest import Relay, RunningAgent, closedPort, curl, inThread, pattern, startAgent, startRelay
from tests.test_gates import Deny
from tests.test_http_tunnel import selfSignedCertificate
from txtunnel.relay.h2edge import PREFACE


def h2Exchange(
    port: int,
    headers: list[tuple[str, str]],
    chunks: list[bytes] = (),
    reset: bool = False,  # type: ignore[assignment]
) -> dict[str, Any]:
    """
    One request on a new prior-knowledge HTTP/2 connection; the body is
    sent as C{chunks} with no content-length.  Return what came back.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers, end_stream=not chunks)
    for chunk in chunks:
        conn.send_data(sid, chunk)
    if chunks:
        conn.end_stream(sid)
    sock.sendall(conn.data_to_send())
    result: dict[str, Any] = {"headers": {}, "body": b"", "reset": None, "ended": False}
    try:
        while not result["ended"] and result["reset"] is None:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    result["headers"] = dict(event.headers)
                    if reset:
                        conn.reset_stream(sid)
                        result["reset"] = "sent"
                elif isinstance(event, h2.events.DataReceived):
                    result["body"] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.StreamEnded):
                    result["ended"] = True
                elif isinstance(event, h2.events.StreamReset):
                    result["reset"] = event.error_code
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return result


def rawAnswer(port: int, payload: bytes) -> bytes:
    """
    Send C{payload} on a new connection and read until the relay closes it.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return received
            received += data


async def _tunnel(relay: Relay, agents: list[RunningAgent], target: int, name: str = "web") -> str:
    await startAgent(agents, relay, "--http", str(target), "--subdomain", name)
    return f"{name}.localhost:{relay.port}"


@pytest_twisted.ensureDeferred
async def test_curl_prior_knowledge(relay: Relay, agents: list[RunningAgent], origin: int, tmp_path: Any) -> None:
    """
    curl --http2-prior-knowledge: a GET and a 1 MiB POST reach the
    HTTP/1.1 origin and come back over HTTP/2, with X-Forwarded-* set.
    """
    host = await _tunnel(relay, agents, origin)
    resolve = ["--resolve", f"{host}:127.0.0.1"]
    code, out, err = await curl(
        "--http2-prior-knowledge", *resolve, "-w", "\n%{http_version}", f"http://{host}/hello?x=1"
    )
    assert code == 0, err
    assert b"hello from origin" in out
    assert b"path=/hello?x=1" in out
    assert b"x-forwarded-for=127.0.0.1" in out
    assert b"x-forwarded-proto=http" in out
    assert out.endswith(b"\n2")
    body = pattern(1024 * 1024)
    upload = tmp_path / "upload"
    upload.write_bytes(body)
    code, out, err = await curl(
        "--http2-prior-knowledge", *resolve, "-D", "-", "--data-binary", f"@{upload}", f"http://{host}/echo"
    )
    assert code == 0, err
    assert out.startswith(b"HTTP/2 200")
    assert hashlib.sha256(body).hexdigest().encode() in out
    assert out.endswith(body)


@pytest_twisted.ensureDeferred
async def test_big_download_over_h2(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    A 16 MiB response, far past every window, arrives whole (flow control
    from the HTTP/2 window back to the link's credit).
    """
    host = await _tunnel(relay, agents, origin)
    n = 16 * 1024 * 1024
    code, out, err = await curl("--http2-prior-knowledge", "--resolve", f"{host}:127.0.0.1", f"http://{host}/big?n={n}")
    assert code == 0, err
    assert len(out) == n
    assert hashlib.sha256(out).digest() == hashlib.sha256(pattern(65536) * (n // 65536)).digest()


@pytest_twisted.ensureDeferred
async def test_curl_h2_over_tls(tmp_path: Any, agents: list[RunningAgent], origin: int) -> None:
    """
    On an ssl: listener the relay offers ALPN h2; curl --http2 -k picks it,
    and HTTP/1.1 clients still get HTTP/1.1.
    """
    key, cert = selfSignedCertificate(tmp_path)
    relay = await startRelay(
        str(tmp_path / "state"), "--https", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    )
    try:
        await startAgent(agents, relay, "--http", str(origin), "--subdomain", "secure")
        port = relay.relay.httpsPort
        url = f"https://secure.localhost:{port}/hello"
        resolve = ["--resolve", f"secure.localhost:{port}:127.0.0.1"]
        code, out, err = await curl("--http2", "-k", *resolve, "-w", "\n%{http_version}", url)
        assert code == 0, err
        assert b"x-forwarded-proto=https" in out
        assert out.endswith(b"\n2")
        code, out, err = await curl("--http1.1", "-k", *resolve, "-w", "\n%{http_version}", url)
        assert code == 0, err
        assert out.endswith(b"\n1.1")
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_body_of_unknown_length_is_chunked(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    An HTTP/2 request body with no content-length reaches the HTTP/1.1
    origin chunked, unchanged.
    """
    host = await _tunnel(relay, agents, origin)
    chunks = [pattern(16000), b"tail" * 4000, pattern(5)]
    headers = [(":method", "POST"), (":path", "/echo"), (":scheme", "http"), (":authority", host)]
    result = await inThread(h2Exchange, relay.port, headers, chunks)
    assert result["headers"][":status"] == "200"
    assert result["body"] == b"".join(chunks)
    assert result["headers"]["x-body-sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()


@pytest_twisted.ensureDeferred
async def test_relay_answers_over_h2(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    Unknown names, the relay's own host, a down local service and a gate's
    refusal are answered on the stream, over HTTP/2, in plain words.
    """
    host = await _tunnel(relay, agents, origin)
    down = await _tunnel(relay, agents, closedPort(), name="down")
    relay.relay.gates[:] = [Deny()]

    def get(authority: str, path: str = "/") -> dict[str, Any]:
        headers = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", authority)]
        return h2Exchange(relay.port, headers)

    unknown = await inThread(get, f"nobody.localhost:{relay.port}")
    assert unknown["headers"][":status"] == "404"
    assert b"no tunnel named 'nobody'" in unknown["body"]
    apex = await inThread(get, f"localhost:{relay.port}", "/_txtunnel")
    assert apex["headers"][":status"] == "404"
    refused = await inThread(get, host, "/private/x")
    assert refused["headers"][":status"] == "403"
    assert refused["headers"]["x-why"] == "private"
    assert b"not for you" in refused["body"]
    gone = await inThread(get, down)
    assert gone["headers"][":status"] == "502"
    assert b"refused the connection" in gone["body"]
    ok = await inThread(get, host, "/hello")
    assert ok["headers"][":status"] == "200"


@pytest_twisted.ensureDeferred
async def test_hostile_h2_breaks_nothing_else(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    A connection that sends a malformed frame after the preface gets a
    GOAWAY and is closed, as is one whose header list is over 64 KiB; the
    relay keeps serving.
    """
    host = await _tunnel(relay, agents, origin)
    answer = await inThread(rawAnswer, relay.port, PREFACE + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00garbage")
    # A GOAWAY frame (type 7) comes back before the close.
    assert b"\x07\x00\x00\x00\x00\x00" in answer
    headers = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", host), ("x-big", "b" * 100000)]
    oversized = await inThread(h2Exchange, relay.port, headers)
    assert oversized["headers"] == {} and not oversized["ended"]
    code, out, err = await curl("--http2-prior-knowledge", "--resolve", f"{host}:127.0.0.1", f"http://{host}/hello")
    assert code == 0, err
    assert b"hello from origin" in out


@pytest_twisted.ensureDeferred
async def test_visitor_reset_closes_the_link_stream(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    A visitor that resets a stream mid-response leaves no link stream
    behind, and the connection keeps working for others.
    """
    host = await _tunnel(relay, agents, origin)
    headers = [(":method", "GET"), (":path", f"/big?n={64 * 1024 * 1024}"), (":scheme", "http"), (":authority", host)]
    result = await inThread(h2Exchange, relay.port, headers, [], True)
    assert result["reset"] == "sent"
    for _ in range(100):
        if not any(s.link.streams for s in relay.relay.sessions):
            break
        await defer.succeed(None)
        from tests.conftest import wait

        await wait(0.05)
    assert not any(s.link.streams for s in relay.relay.sessions)


@pytest_twisted.ensureDeferred
async def test_upgrade_h2c_is_served_as_http11(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    curl --http2 on cleartext asks for Upgrade: h2c; the relay does not
    offer it and the request is answered over HTTP/1.1.
    """
    host = await _tunnel(relay, agents, origin)
    code, out, err = await curl(
        "--http2", "--resolve", f"{host}:127.0.0.1", "-w", "\n%{http_version}", f"http://{host}/hello"
    )
    assert code == 0, err
    assert b"hello from origin" in out
    assert out.endswith(b"\n1.1")


def _stalledDownload(port: int, authority: str, path: str) -> tuple[socket.socket, int]:
    """
    Ask for C{path} and read what the initial window lets through, never
    giving window back; return the open socket and the body bytes read.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", authority)], True)
    sock.sendall(conn.data_to_send())
    got = 0
    sock.settimeout(2)
    try:
        while got < 65535:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    got += len(event.data)
            sock.sendall(conn.data_to_send())
    except TimeoutError:
        pass
    return sock, got


@pytest_twisted.ensureDeferred
async def test_stalled_visitor_holds_bounded_memory(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    A visitor that stops opening its HTTP/2 window gets exactly its window
    of a 256 MiB response, and the relay holds no more than the link's
    window for it: the pause reaches back over the link to the origin.
    """
    from tests.conftest import wait
    from txtunnel.link import DEFAULT_WINDOW

    host = await _tunnel(relay, agents, origin)
    sock, got = await inThread(_stalledDownload, relay.port, host, f"/big?n={256 * 1024 * 1024}")
    try:
        await wait(1.0)
        assert got == 65535
        held = 0
        for session in relay.relay.sessions:
            for stream in session.link.streams.values():
                pipe: Any = stream.protocol
                held += sum(len(b) for b in pipe._out) + sum(len(b) for b in stream._in)
        assert 0 < held <= DEFAULT_WINDOW + 65536
    finally:
        sock.close()
