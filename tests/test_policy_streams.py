"""
Bandwidth quotas on the tunnels that have no HTTP to answer with a 429:
TCP, UDP and TLS passthrough visitors' bytes (both ways) count against the
same per-address and per-tunnel monthly quotas as HTTP, and a spent quota
closes (TCP, TLS) or drops (UDP) what would go over it -- so a free tier is
not bypassed by choosing another tunnel type.  Real relay, agents and
sockets on loopback.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher

from tests.conftest import Relay, RunningAgent, inThread, startAgent, startRelay, wait
from tests.test_tls_passthrough import agentConfig, clientHello


@pytest.fixture
def logged() -> Any:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def echoThrough(host: str, port: int, payload: bytes, source: str = "127.0.0.1") -> bytes:
    """
    Send C{payload} on a new TCP connection from C{source}, half-close, and
    return all that comes back before the relay closes it (a refused or cut
    connection may be reset at any point: what arrived until then).
    """
    data = b""
    try:
        with socket.create_connection((host, port), timeout=20, source_address=(source, 0)) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        pass
    return data


def tcpPort(agent: RunningAgent) -> int:
    return int(agent.address().rsplit(":", 1)[1])


def quotaRejections(relay: Relay) -> float:
    for line in relay.relay.metrics.render().decode().splitlines():
        if line.startswith('txtunnel_relay_limit_rejections_total{limit="quota"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no quota rejection counter")


@pytest_twisted.ensureDeferred
async def test_tcp_tunnel_quota_per_tunnel_and_per_address(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], echoServer: int, logged: list[str]
) -> None:
    """
    A TCP tunnel's bytes count both ways: within the relay's per-tunnel
    quota a connection is echoed whole; one that carries past it is cut
    mid-way (not when it ends, which could be a month later); once spent a
    new connection is closed at once with a log line naming the address
    and the quota.  Another TCP tunnel is still served, and the per-address
    quota (counted across tunnels) refuses one address but not another.
    """
    relay = await startRelay(str(tmp_path / "s1"), "--quota-per-tunnel", "20000")
    relays.append(relay)
    metered = await startAgent(agents, relay, "--tcp", str(echoServer))
    other = await startAgent(agents, relay, "--tcp", str(echoServer))
    port = tcpPort(metered)
    assert await inThread(echoThrough, "127.0.0.1", port, b"a" * 4000) == b"a" * 4000  # 8,000 counted
    cut = await inThread(echoThrough, "127.0.0.1", port, b"b" * 200_000)
    assert len(cut) < 200_000, len(cut)  # cut once 20,000 were carried
    assert await inThread(echoThrough, "127.0.0.1", port, b"c") == b""
    assert await inThread(echoThrough, "127.0.0.1", tcpPort(other), b"d" * 4000) == b"d" * 4000
    assert any(
        f"closing tcp visitor 127.0.0.1 of tunnel tcp://127.0.0.1:{port}: the monthly bandwidth quota of 19.5 KiB"
        f" of tcp tunnel {port} is spent" in line
        for line in logged
    ), logged[-5:]
    assert any(
        f"TCP visitor 127.0.0.1 refused on port {port}: the monthly bandwidth quota of 19.5 KiB of tcp tunnel {port}"
        " is spent; it resets on" in line
        for line in logged
    ), logged[-5:]
    assert quotaRejections(relay) >= 2

    relay = await startRelay(str(tmp_path / "s2"), "--quota-per-ip", "15000")
    relays.append(relay)
    first = await startAgent(agents, relay, "--tcp", str(echoServer))
    second = await startAgent(agents, relay, "--tcp", str(echoServer))
    assert await inThread(echoThrough, "127.0.0.1", tcpPort(first), b"e" * 6000, "127.0.0.2") == b"e" * 6000
    # 12,000 counted for 127.0.0.2; this one crosses 15,000 on the other
    # tunnel and is cut part way (how far depends on timing) ...
    crossing = await inThread(echoThrough, "127.0.0.1", tcpPort(second), b"x" * 6000, "127.0.0.2")
    assert len(crossing) < 6000, len(crossing)
    # ... and then the address is spent on both tunnels, not for 127.0.0.3.
    assert await inThread(echoThrough, "127.0.0.1", tcpPort(first), b"f", "127.0.0.2") == b""
    assert await inThread(echoThrough, "127.0.0.1", tcpPort(second), b"f", "127.0.0.2") == b""
    assert await inThread(echoThrough, "127.0.0.1", tcpPort(second), b"g" * 100, "127.0.0.3") == b"g" * 100
    assert any("of address 127.0.0.2 is spent" in line for line in logged), logged[-5:]


@pytest_twisted.ensureDeferred
async def test_udp_tunnel_quota_per_address(tmp_path: Path, relays: list[Relay], agents: list[RunningAgent]) -> None:
    """
    UDP datagrams count against the per-address quota both ways; once it
    is spent the address's datagrams are dropped (counted under "quota",
    in the rate-limited drop line) while another address is still echoed.
    """
    from tests.test_udp import UDPClient, UDPEcho, freeUDPRange, listenUDP, publicPort

    listeners: list[Any] = []
    try:
        echo = UDPEcho()
        target = listenUDP(listeners, echo)
        low, high = freeUDPRange(4)
        relay = await startRelay(str(tmp_path / "s"), "--udp-ports", f"{low}-{high}", "--quota-per-ip", "3000")
        relays.append(relay)
        agent = await startAgent(agents, relay, "--udp", str(target))
        public = publicPort(agent)
        client = UDPClient()
        listenUDP(listeners, client)
        for _ in range(3):  # 1,000 bytes each way: 2,000, then 4,000 counted
            client.transport.write(b"x" * 500, ("127.0.0.1", public))  # type: ignore[union-attr]
            assert await client.recv() == b"x" * 500
        # Spent (the flow was cut when the count passed 3,000): dropped now.
        client.transport.write(b"late", ("127.0.0.1", public))  # type: ignore[union-attr]
        with pytest.raises(defer.TimeoutError):
            await client.recv(timeout=0.5)
        assert quotaRejections(relay) >= 1

        # Another address (a socket bound to 127.0.0.2) is still echoed.
        def fromOther() -> bytes:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.2", 0))
                s.settimeout(10)
                s.sendto(b"other", ("127.0.0.1", public))
                return s.recv(100)

        assert await inThread(fromOther) == b"other"
        assert len(echo.sources) == 4  # three, then "other": "late" never reached the service
    finally:
        for port in listeners:
            await defer.maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_tls_tunnel_quota_per_tunnel(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], echoServer: int, logged: list[str]
) -> None:
    """
    TLS passthrough bytes count too: the relay routes by SNI and splices,
    so an echoing local service returns the ClientHello; within the
    per-tunnel quota that works, once spent the next visitor gets a TLS
    access_denied alert and is closed, with a log line naming the quota.
    """
    relay = await startRelay(str(tmp_path / "s"), "--tls", "tcp:0:interface=127.0.0.1", "--quota-per-tunnel", "3000")
    relays.append(relay)
    await startAgent(agents, relay, "--config", agentConfig(tmp_path, echoServer, subdomain="metered"))
    port = relay.relay.tlsPort
    assert port is not None
    hello = clientHello("metered.localhost")
    assert await inThread(echoThrough, "127.0.0.1", port, hello) == hello
    # A TLS alert record (21), fatal (2), access_denied (49).
    alert = b"\x15\x03\x03\x00\x02\x02\x31"
    for _ in range(10):
        # The connection that crosses the line is cut part way (any of its
        # echo may be lost); the ones after it get the alert.
        answer = await inThread(echoThrough, "127.0.0.1", port, hello)
        if answer == alert:
            break
        await wait(0)
    assert answer == alert, answer[:20]
    assert any(
        "TLS visitor 127.0.0.1 refused: 'metered.localhost': the monthly bandwidth quota of 2.9 KiB"
        " of tls tunnel metered is spent" in line
        for line in logged
    ), logged[-5:]


# -- agents' links over plain HTTP


@pytest_twisted.ensureDeferred
async def test_links_over_https_refuses_plain_links(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], echoServer: int, logged: list[str]
) -> None:
    """
    With --links-over https an agent's WebSocket upgrade on the plain HTTP
    listener gets 403 with a reason pointing at wss://, and an agent given
    ws:// is refused with it; the same agent over wss:// links, and plain
    HTTP visitors are still served.  With the default (any) ws:// links.
    """
    from tests.conftest import curl

    relay = await startRelay(str(tmp_path / "s"), "--links-over", "https", "--https", "tcp:0:interface=127.0.0.1")
    relays.append(relay)
    upgrade = (
        "-si", "-H", "Connection: Upgrade", "-H", "Upgrade: websocket", "-H", "Sec-WebSocket-Version: 13",
        "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "-H", f"Host: localhost:{relay.port}",
        f"http://127.0.0.1:{relay.port}/_txtunnel",
    )  # fmt: skip
    code, out, err = await curl(*upgrade)
    assert code == 0, err
    assert out.startswith(b"HTTP/1.1 403") and b"connect with --relay wss://" in out, out
    refused = await startAgent(agents, relay, "--tcp", str(echoServer), expectReady=False)
    for _ in range(200):  # the relay says why (the agent keeps retrying: the operator may fix it)
        if sum("403: this relay takes agent links over TLS only" in line for line in logged) >= 2:
            break
        await wait(0.05)
    assert sum("403: this relay takes agent links over TLS only" in line for line in logged) >= 2, logged[-10:]
    # ... and so does the agent: its log names the relay's reason, not just "403 Forbidden".
    assert any(
        "agent link connecting -> reconnecting" in line and "connect with --relay wss://HOST" in line for line in logged
    ), logged[-10:]
    assert any("for localhost (no agent links here: --links-over https)" in line for line in logged), logged[-20:]
    wss = f"wss://localhost:{relay.relay.httpsPort}"
    linked = await startAgent(agents, relay, "--relay", wss, "--insecure", "--tcp", str(echoServer))
    assert linked.address().startswith("tcp://")
    assert not refused.agent.ready.called

    plain = await startRelay(str(tmp_path / "s2"))
    relays.append(plain)
    assert (await startAgent(agents, plain, "--tcp", str(echoServer))).address().startswith("tcp://")


def test_links_over_option_sources_and_errors(tmp_path: Path) -> None:
    """
    --links-over comes from the command line, TXTUNNEL_RELAY_LINKS_OVER or
    the [relay] links-over key, defaults to any, and refuses a bad value or
    https on a relay with no TLS listener (no agent could link), naming why.
    """
    from twisted.python import usage

    from txtunnel.relay import tap

    def parse(args: list[str], environ: dict[str, str] | None = None) -> str:
        options = tap.Options(environ=environ or {})
        options.parseOptions(["--state-dir", str(tmp_path / "s"), *args])
        return str(options["links-over"])

    https = ["--https", "tcp:0:interface=127.0.0.1"]
    assert parse([]) == "any"
    assert parse(["--links-over", "https", *https]) == "https"
    assert parse(https, {"TXTUNNEL_RELAY_LINKS_OVER": "https"}) == "https"
    ini = tmp_path / "relay.ini"
    ini.write_text("[relay]\nlinks-over = https\n")
    assert parse(["--config", str(ini), *https]) == "https"
    with pytest.raises(usage.UsageError, match="is not https or any"):
        parse(["--links-over", "tls"])
    with pytest.raises(usage.UsageError, match="--links-over https needs --https"):
        parse(["--links-over", "https"])
