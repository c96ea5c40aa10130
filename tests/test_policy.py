"""
Visitor policy and abuse limits on a real relay and agents, visited with
curl: basic auth, IP rules, header rules, rates, quotas, bind limits,
stream limits, tokens with reservations, and the edge's timeouts.  Each
control is shown to refuse what it should and let through what it should.
"""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.conftest import Relay, RunningAgent, curl, inThread, startAgent, startRelay, wait
from tests.test_gates import Headers
from txtunnel.relay.tokens import hashToken


def host(relay: Relay, name: str) -> str:
    return f"Host: {name}.localhost:{relay.port}"


def base(relay: Relay) -> str:
    return f"http://127.0.0.1:{relay.port}"


async def get(relay: Relay, name: str, path: str = "/", *args: str) -> bytes:
    code, out, err = await curl("-si", "-H", host(relay, name), *args, f"{base(relay)}{path}")
    assert code == 0, err
    return out


async def policyRelay(tmp_path: Path, *args: str) -> Relay:
    return await startRelay(str(tmp_path / "state"), *args)


@pytest.fixture
def headersOrigin() -> Any:
    port = reactor.listenTCP(0, Site(Headers()), interface="127.0.0.1")  # type: ignore[attr-defined]
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


# -- basic auth


@pytest_twisted.ensureDeferred
async def test_basic_auth(relay: Relay, agents: list[RunningAgent], headersOrigin: int) -> None:
    """
    A tunnel with --basic-auth answers 401 with WWW-Authenticate until the
    visitor gives a listed user's password; the relay only ever holds a
    salted hash, and the checked Authorization header does not reach the
    local service.
    """
    await startAgent(
        agents,
        relay,
        "--http",
        str(headersOrigin),
        "--subdomain",
        "locked",
        "--basic-auth",
        "alice:wonderland",
        "--basic-auth",
        "bob:builder",
    )
    out = await get(relay, "locked")
    assert out.startswith(b"HTTP/1.1 401"), out
    assert b'WWW-Authenticate: Basic realm="txtunnel"' in out
    out = await get(relay, "locked", "/", "-u", "alice:wrong")
    assert out.startswith(b"HTTP/1.1 401"), out
    out = await get(relay, "locked", "/", "-H", "Authorization: Bearer nonsense")
    assert out.startswith(b"HTTP/1.1 401"), out
    for user in ("alice:wonderland", "bob:builder"):
        out = await get(relay, "locked", "/x", "-u", user)
        assert out.startswith(b"HTTP/1.1 200"), out
        assert b"path=/x" in out and b"authorization" not in out.lower().split(b"\r\n\r\n", 1)[1]
    # What the relay got: hashes, never the passwords.
    (tunnel,) = [t for s in relay.relay.sessions for t in s.tunnels.values()]
    sent = repr(tunnel.request)
    assert "wonderland" not in sent and "builder" not in sent
    assert tunnel.request["policy"]["basic-auth"][0].startswith("pbkdf2-sha256$")


@pytest_twisted.ensureDeferred
async def test_bad_policy_refused_at_bind(relay: Relay, agents: list[RunningAgent], headersOrigin: int) -> None:
    """
    A bind request with a malformed policy (a plain password where a hash
    belongs, a bad CIDR) is refused with the reason, and the name stays free.
    """
    from txtunnel.errors import BindError
    from txtunnel.relay.policy import parsePolicy

    with pytest.raises(BindError, match="pbkdf2"):
        parsePolicy({"type": "http", "policy": {"basic-auth": ["alice:plain"]}})
    with pytest.raises(BindError, match="CIDR"):
        parsePolicy({"type": "http", "policy": {"ip-deny": ["10.0.0.0/33"]}})
    with pytest.raises(BindError, match="http tunnels only"):
        parsePolicy({"type": "tcp", "policy": {"ip-deny": ["10.0.0.0/8"]}})
    with pytest.raises(BindError, match="unknown policy setting"):
        parsePolicy({"type": "http", "policy": {"open-sesame": True}})
    # Through a real agent whose bind request is tampered with.
    agent = await startAgent(agents, relay, "--http", str(headersOrigin), "--subdomain", "tampered", expectReady=False)
    agent.agent.tunnels[0].options["policy"] = {"ip-allow": ["not-an-address"]}
    with pytest.raises(RuntimeError, match="not an IP address"):
        await agent.agent.ready
    out = await get(relay, "tampered")
    assert out.startswith(b"HTTP/1.1 404"), out


# -- IP rules


@pytest_twisted.ensureDeferred
async def test_ip_rules_per_tunnel(relay: Relay, agents: list[RunningAgent], headersOrigin: int) -> None:
    """
    Per-tunnel allow and deny lists: 403 outside the allow list and inside
    the deny list, deny winning over allow; tunnels without rules are open.
    """
    origin = str(headersOrigin)
    await startAgent(agents, relay, "--http", origin, "--subdomain", "denied", "--ip-deny", "127.0.0.0/8")
    await startAgent(
        agents, relay, "--http", origin, "--subdomain", "elsewhere", "--ip-allow", "10.0.0.0/8,2001:db8::/32"
    )
    await startAgent(
        agents, relay, "--http", origin, "--subdomain", "local", "--ip-allow", "127.0.0.1/32", "--ip-allow", "::1"
    )
    await startAgent(
        agents, relay, "--http", origin, "--subdomain", "both", "--ip-allow", "127.0.0.0/8", "--ip-deny", "127.0.0.1"
    )
    await startAgent(agents, relay, "--http", origin, "--subdomain", "open")
    for name, expected in (("denied", 403), ("elsewhere", 403), ("local", 200), ("both", 403), ("open", 200)):
        out = await get(relay, name)
        assert out.startswith(f"HTTP/1.1 {expected}".encode()), (name, out)
    out = await get(relay, "denied")
    assert b"your address may not use this tunnel" in out


@pytest_twisted.ensureDeferred
async def test_ip_rules_relay_wide(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], headersOrigin: int
) -> None:
    """
    Relay-wide rules apply to every HTTP tunnel, before the tunnel's own.
    """
    relay = await policyRelay(tmp_path, "--ip-allow", "127.0.0.0/8", "--ip-deny", "127.0.0.1/32")
    relays.append(relay)
    await startAgent(agents, relay, "--http", str(headersOrigin), "--subdomain", "any", "--ip-allow", "127.0.0.1")
    out = await get(relay, "any")
    assert out.startswith(b"HTTP/1.1 403") and b"may not use this relay" in out, out
    relay2 = await startRelay(str(tmp_path / "state2"), "--ip-allow", "127.0.0.0/8,::1")
    relays.append(relay2)
    await startAgent(agents, relay2, "--http", str(headersOrigin), "--subdomain", "any")
    out = await get(relay2, "any")
    assert out.startswith(b"HTTP/1.1 200"), out


# -- headers


class ResponseHeaders(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"server", b"leaky/1.0")
        request.setHeader(b"x-powered-by", b"secret-stack")
        seen = b",".join(sorted(n.lower() for n, _ in request.requestHeaders.getAllRawHeaders()))
        return b"seen=" + seen + b"\n" + b"x-team=" + (request.getHeader(b"x-team") or b"-") + b"\n"


@pytest.fixture
def responseOrigin() -> Any:
    port = reactor.listenTCP(0, Site(ResponseHeaders()), interface="127.0.0.1")  # type: ignore[attr-defined]
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest_twisted.ensureDeferred
async def test_header_rules(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], responseOrigin: int
) -> None:
    """
    Request headers added and removed by the relay (relay-wide and per
    tunnel) and response headers added and removed by the agent; a visitor
    cannot forge an added header.
    """
    relay = await policyRelay(tmp_path, "--remove-header", "X-Debug", "--add-header", "X-Relay: edge-1")
    relays.append(relay)
    await startAgent(
        agents,
        relay,
        "--http",
        str(responseOrigin),
        "--subdomain",
        "hdr",
        "--add-header",
        "X-Team: blue",
        "--remove-header",
        "Cookie",
        "--add-response-header",
        "Strict-Transport-Security: max-age=63072000",
        "--remove-response-header",
        "X-Powered-By",
        "--remove-response-header",
        "Server",
    )
    out = await get(relay, "hdr", "/", "-H", "X-Team: forged", "-H", "Cookie: a=b", "-H", "X-Debug: 1")
    head, body = out.split(b"\r\n\r\n", 1)
    assert out.startswith(b"HTTP/1.1 200"), out
    assert b"x-team=blue" in body
    assert b"cookie" not in body and b"x-debug" not in body and b"x-relay" in body
    assert b"Strict-Transport-Security: max-age=63072000" in head
    assert b"secret-stack" not in head and b"leaky" not in head


# -- rates


@pytest_twisted.ensureDeferred
async def test_rate_limits(tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], headersOrigin: int) -> None:
    """
    Past the per-IP rate the relay answers 429 with Retry-After; the
    tunnel's own rate applies to its tunnel only.
    """
    relay = await policyRelay(tmp_path, "--rate-per-ip", "3/m")
    relays.append(relay)
    await startAgent(agents, relay, "--http", str(headersOrigin), "--subdomain", "r1")
    await startAgent(agents, relay, "--http", str(headersOrigin), "--subdomain", "r2", "--rate", "1/h")
    statuses = []
    for name in ("r2", "r2", "r1", "r1", "r1"):
        out = await get(relay, name)
        statuses.append(int(out.split(b" ", 2)[1]))
    # A refused request spends nothing: r2's 429 left the address 2 more.
    assert statuses == [200, 429, 200, 200, 429], statuses
    out = await get(relay, "r1")
    assert b"Retry-After: " in out and b"too many requests from your address" in out
    retry = int(out.split(b"Retry-After: ")[1].split(b"\r\n")[0])
    assert 1 <= retry <= 20
    metrics = relay.relay.metrics.render()
    assert b'txtunnel_relay_limit_rejections_total{limit="rate"} 3.0' in metrics, metrics


# -- quotas


@pytest_twisted.ensureDeferred
async def test_quota_survives_restart(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], origin: int
) -> None:
    """
    A tunnel's monthly quota: requests pass until its bytes are spent,
    then a 429 page says when it resets; the count is in the state dir, so
    a restarted relay still refuses.  Another tunnel is unaffected.
    """
    relay = await policyRelay(tmp_path, "--quota-per-tunnel", "40KiB")
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "metered")
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "other", "--quota", "1MiB")
    out = await get(relay, "metered", "/big?n=30000")
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    out = await get(relay, "metered", "/big?n=30000")
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    out = await get(relay, "metered", "/big?n=10")
    assert out.startswith(b"HTTP/1.1 429"), out
    assert b"monthly bandwidth quota of 40.0 KiB is spent; it resets on" in out and b"Retry-After:" in out
    out = await get(relay, "other", "/big?n=30000")
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    for a in list(agents):
        await a.stop()
    await defer.maybeDeferred(relay.service.stopService)

    relay = await policyRelay(tmp_path, "--quota-per-tunnel", "40KiB")
    relays.append(relay)
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "metered")
    out = await get(relay, "metered", "/hello")
    assert out.startswith(b"HTTP/1.1 429"), out


# -- bind limits, streams


@pytest_twisted.ensureDeferred
async def test_tunnels_per_ip_and_bind_rate(
    tmp_path: Path,
    relays: list[Relay],
    agents: list[RunningAgent],
    origin: int,
) -> None:
    """
    An address may hold --max-tunnels-per-ip tunnels and open them no faster
    than --bind-rate; the refusal says why, and freeing one makes room.
    """
    relay = await policyRelay(tmp_path, "--max-tunnels-per-ip", "2", "--bind-rate", "off")
    relays.append(relay)
    first = await startAgent(agents, relay, "--http", str(origin))
    await startAgent(agents, relay, "--http", str(origin))
    third = await startAgent(agents, relay, "--http", str(origin), expectReady=False)
    with pytest.raises(RuntimeError, match="at most 2 tunnels per agent address"):
        await third.agent.ready
    await first.stop()
    await wait(0.2)
    await startAgent(agents, relay, "--http", str(origin))

    relay = await startRelay(str(tmp_path / "state2"), "--bind-rate", "1/h:1")
    relays.append(relay)
    await startAgent(agents, relay, "--http", str(origin))
    await startAgent(agents, relay, "--http", str(origin))
    third = await startAgent(agents, relay, "--http", str(origin), expectReady=False)
    with pytest.raises(RuntimeError, match="too many new tunnels from this address"):
        await third.agent.ready


class Hang(Resource):
    """
    Holds every request until the test lets one go.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.pending.append(request)
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_max_streams(tmp_path: Path, relays: list[Relay], agents: list[RunningAgent]) -> None:
    """
    When an agent's link carries --max-streams visitor connections, the
    next visitor gets 503 with Retry-After, and is served once one ends.
    """
    hang = Hang()
    port = reactor.listenTCP(0, Site(hang), interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        relay = await policyRelay(tmp_path, "--max-streams", "2")
        relays.append(relay)
        await startAgent(agents, relay, "--http", str(port.getHost().port), "--subdomain", "busy")
        socks = []
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", relay.port))
            s.sendall(f"GET / HTTP/1.1\r\n{host(relay, 'busy')}\r\n\r\n".encode())
            socks.append(s)
        await wait(0.3)
        out = await get(relay, "busy")
        assert out.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in out, out
        assert b"limit of 2 connections" in out
        hang.pending.pop(0).finish()
        socks.pop(0).close()
        (session,) = relay.relay.sessions
        for _ in range(50):
            if len(session.link.streams) < 2:
                break
            await wait(0.1)
        code, out, _ = await curl("-si", "--max-time", "1", "-H", host(relay, "busy"), f"{base(relay)}/")
        assert code == 28 and not out, (code, out)  # reached the (hanging) service: no 503
        for s in socks:
            s.close()
        for request in hang.pending:
            request.finish()
    finally:
        await defer.maybeDeferred(port.stopListening)


# -- tokens


@pytest_twisted.ensureDeferred
async def test_tokens_file_and_reservations(
    tmp_path: Path,
    relays: list[Relay],
    agents: list[RunningAgent],
    origin: int,
) -> None:
    """
    Tokens from a file (plain or hashed) admit agents; a name reserved for
    one token is refused to every other, and a reserved port is never
    handed out at random.
    """
    tokens = tmp_path / "tokens"
    hashed = hashToken("bob-secret-token").hex()
    tokens.write_text(
        "# agents of this relay\n"
        "alice-secret-token  http:alice\n"
        f"sha256:{hashed}   http:bob  # bob's token is only stored hashed\n"
    )
    relay = await policyRelay(tmp_path, "--tokens-file", str(tokens))
    relays.append(relay)
    none = await startAgent(agents, relay, "--http", str(origin), expectReady=False)
    with pytest.raises(RuntimeError, match="requires a token"):
        await none.agent.ready
    wrong = await startAgent(agents, relay, "--token", "mallory-token", "--http", str(origin), expectReady=False)
    with pytest.raises(RuntimeError, match="invalid or missing token"):
        await wrong.agent.ready
    thief = await startAgent(
        agents, relay, "--token", "bob-secret-token", "--http", str(origin), "--subdomain", "alice", expectReady=False
    )
    with pytest.raises(RuntimeError, match="reserved for another token"):
        await thief.agent.ready
    await startAgent(agents, relay, "--token", "alice-secret-token", "--http", str(origin), "--subdomain", "alice")
    await startAgent(agents, relay, "--token", "bob-secret-token", "--http", str(origin), "--subdomain", "bob")
    for name in ("alice", "bob"):
        out = await get(relay, name, "/hello")
        assert out.startswith(b"HTTP/1.1 200"), out


async def rawAgent(agents: list[RunningAgent], relay: Relay, name: str, *args: str) -> RunningAgent:
    """
    A modified agent: its tunnel asks for C{name} exactly as given, past the
    agent's own check (which would lower-case it), as a hostile client
    speaking the link protocol would.
    """

    def exactly(agent: Any) -> None:
        for tunnel in agent.tunnels:
            tunnel.options["subdomain"] = name

    return await startAgent(agents, relay, *args, expectReady=False, adjust=exactly)


@pytest_twisted.ensureDeferred
async def test_reservation_not_bypassed_by_case(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], origin: int
) -> None:
    """
    A name reserved as C{alice} cannot be taken by asking for C{ALICE} (or
    C{Alice}) with another token, for HTTP or TLS tunnels: the relay
    normalises the name before it looks up the reservation.  Alice's own
    token may still bind it, in any case.
    """
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-secret-token http:alice tls:alice\nbob-secret-token\n")
    relay = await policyRelay(tmp_path, "--tokens-file", str(tokens), "--tls", "tcp:0:interface=127.0.0.1")
    relays.append(relay)
    for kind, name in (("http", "ALICE"), ("tls", "Alice")):
        thief = await rawAgent(agents, relay, name, "--token", "bob-secret-token", f"--{kind}", str(origin))
        with pytest.raises(RuntimeError, match=f"the {kind} name alice is reserved for another token"):
            await thief.agent.ready
        await thief.stop()
    assert relay.relay.hosts.get("alice") is None and relay.relay.tlsHosts.get("alice") is None
    owner = await rawAgent(agents, relay, "ALICE", "--token", "alice-secret-token", "--http", str(origin))
    await owner.agent.ready
    out = await get(relay, "alice", "/hello")
    assert out.startswith(b"HTTP/1.1 200"), out


def test_reserved_ports_not_random(tmp_path: Path) -> None:
    """
    A reserved TCP port is skipped when the relay picks a free port.
    """
    from txtunnel.relay.ports import PortPool

    pool = PortPool(20000, 20002)
    pool.reserved.add(20000)
    assert list(pool.candidates()) == [20001, 20002]


# -- timeouts


def slowloris(port: int, head: bytes, pause: float, limit: float) -> tuple[bytes, float]:
    """
    Trickle C{head} a byte every C{pause} seconds; return what the relay
    sent back and how long it took to close.
    """
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        received = b""
        try:
            for byte in head:
                s.sendall(bytes([byte]))
                time.sleep(pause)
                s.setblocking(False)
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    chunk = None
                s.setblocking(True)
                s.settimeout(limit)
                if chunk is not None:
                    received += chunk
                    if not chunk:
                        break
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return received, time.monotonic() - start


@pytest_twisted.ensureDeferred
async def test_header_and_idle_timeouts(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], origin: int
) -> None:
    """
    A visitor trickling a request head gets 408 and is closed after
    --header-timeout; a connection with nothing to do is closed after
    --idle-timeout; a steady visitor is not disturbed.
    """
    relay = await policyRelay(tmp_path, "--header-timeout", "1", "--idle-timeout", "1.5")
    relays.append(relay)
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "slow")
    head = f"GET /hello HTTP/1.1\r\n{host(relay, 'slow')}\r\nX-Padding: {'a' * 40}\r\n\r\n".encode()
    received, took = await inThread(slowloris, relay.port, head, 0.1, 10.0)
    assert received.startswith(b"HTTP/1.1 408"), received
    assert b"did not arrive within 1s" in received
    assert 0.9 < took < 4, took

    def idle() -> tuple[bytes, float]:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            s.sendall(f"GET /hello HTTP/1.1\r\n{host(relay, 'slow')}\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data, time.monotonic() - start

    data, took = await inThread(idle)
    assert data.startswith(b"HTTP/1.1 200") and b"hello from origin" in data, data
    assert 1.3 < took < 5, took
    # A well-behaved visitor sending the head at once is unaffected.
    out = await get(relay, "slow", "/hello")
    assert out.startswith(b"HTTP/1.1 200"), out


def test_authorization_parsing() -> None:
    """
    Only well-formed Basic credentials are considered.
    """
    from txtunnel.basicauth import checkCredentials, hashCredentials, parseAuthorization

    good = base64.b64encode(b"alice:wonder:land")
    assert parseAuthorization(b"Basic " + good) == "alice:wonder:land"
    assert parseAuthorization(b"basic " + good) == "alice:wonder:land"
    for bad in (
        None,
        b"",
        b"Bearer x",
        b"Basic !!!",
        b"Basic " + base64.b64encode(b"\xff\xfe"),
        b"Basic " + b"A" * 5000,
    ):
        assert parseAuthorization(bad) is None
    stored = hashCredentials("alice:wonder:land", iterations=10_000)
    assert checkCredentials("alice:wonder:land", [stored])
    assert not checkCredentials("alice:wonder", [stored])
    assert not checkCredentials("alice:wonder:land", ["pbkdf2-sha256$1$alice$AAAA$AAAA"])
    with pytest.raises(ValueError):
        hashCredentials("no-colon")
    with pytest.raises(ValueError):
        hashCredentials(":nouser")


def ipv6Available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6Available(), reason="no IPv6 loopback")
@pytest_twisted.ensureDeferred
async def test_ip_rules_ipv6(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], headersOrigin: int
) -> None:
    """
    On a relay listening on ::1, IPv6 CIDR rules admit and refuse visitors.
    """
    relay = await policyRelay(tmp_path, "--http", r"tcp6:0:interface=\:\:1")
    relays.append(relay)
    url = f"ws://[::1]:{relay.port}"
    origin = str(headersOrigin)
    await startAgent(agents, relay, "--relay", url, "--http", origin, "--subdomain", "v6in", "--ip-allow", "::1/128")
    await startAgent(agents, relay, "--relay", url, "--http", origin, "--subdomain", "v6out", "--ip-deny", "::/0")
    await startAgent(
        agents, relay, "--relay", url, "--http", origin, "--subdomain", "v4only", "--ip-allow", "127.0.0.0/8"
    )
    for name, status in (("v6in", 200), ("v6out", 403), ("v4only", 403)):
        code, out, err = await curl("-gsi", "-H", host(relay, name), f"http://[::1]:{relay.port}/")
        assert code == 0, err
        assert out.startswith(f"HTTP/1.1 {status}".encode()), (name, out)


@pytest_twisted.ensureDeferred
async def test_quota_per_ip_and_tunnel_rate_per_ip(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], origin: int
) -> None:
    """
    The relay's per-address quota counts across tunnels; a tunnel's own
    per-address rate limits only that tunnel.
    """
    relay = await policyRelay(tmp_path, "--quota-per-ip", "20000")
    relays.append(relay)
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "qa", "--rate-per-ip", "1/h")
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "qb")
    assert (await get(relay, "qa", "/hello")).startswith(b"HTTP/1.1 200")
    out = await get(relay, "qa", "/hello")
    assert out.startswith(b"HTTP/1.1 429") and b"from your address" in out, out
    assert (await get(relay, "qb", "/big?n=25000")).startswith(b"HTTP/1.1 200")
    out = await get(relay, "qb", "/hello")
    assert out.startswith(b"HTTP/1.1 429") and b"your address's monthly bandwidth quota" in out, out


@pytest_twisted.ensureDeferred
async def test_policy_from_agent_ini(
    tmp_path: Path, relay: Relay, agents: list[RunningAgent], headersOrigin: int
) -> None:
    """
    [tunnel:NAME] policy keys reach the relay: one tunnel locked with basic
    auth and an [agent]-wide deny list, another open.
    """
    ini = tmp_path / "agent.ini"
    ini.write_text(
        "[agent]\nremove-header = X-Secret\n"
        f"[tunnel:locked]\ntype = http\ntarget = {headersOrigin}\nsubdomain = inilocked\nbasic-auth = carol:pw-1\n"
        f"[tunnel:open]\ntype = http\ntarget = {headersOrigin}\nsubdomain = iniopen\n"
    )
    await startAgent(agents, relay, "--config", str(ini))
    assert (await get(relay, "inilocked")).startswith(b"HTTP/1.1 401")
    out = await get(relay, "inilocked", "/", "-u", "carol:pw-1", "-H", "X-Secret: 1")
    assert out.startswith(b"HTTP/1.1 200") and b"x-secret" not in out, out
    out = await get(relay, "iniopen", "/", "-H", "X-Secret: 1")
    assert out.startswith(b"HTTP/1.1 200") and b"x-secret" not in out, out


@pytest_twisted.ensureDeferred
async def test_reconnect_is_not_a_new_tunnel(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], origin: int
) -> None:
    """
    Taking back its address after a dropped link does not spend the
    agent address's --bind-rate, while a new tunnel does.
    """
    from tests.test_reconnect import dropLink, rebound

    relay = await policyRelay(tmp_path, "--bind-rate", "1/h:1")
    relays.append(relay)
    agent = await startAgent(agents, relay, "--http", str(origin), "--subdomain", "steady")
    await startAgent(agents, relay, "--http", str(origin))  # the second and last new one
    for _ in range(2):
        old = dropLink(agent)
        await rebound(agent, old)
    assert (await get(relay, "steady", "/hello")).startswith(b"HTTP/1.1 200")
    third = await startAgent(agents, relay, "--http", str(origin), expectReady=False)
    with pytest.raises(RuntimeError, match="too many new tunnels"):
        await third.agent.ready


@pytest_twisted.ensureDeferred
async def test_relay_wide_tunnel_and_total_rates(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], origin: int
) -> None:
    """
    --rate-per-tunnel limits each tunnel on its own; --rate-total limits
    the relay as a whole.
    """
    relay = await policyRelay(tmp_path, "--rate-per-tunnel", "2/h")
    relays.append(relay)
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "ta")
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "tb")
    statuses = [int((await get(relay, name, "/hello")).split(b" ", 2)[1]) for name in ("ta", "ta", "ta", "tb", "tb")]
    assert statuses == [200, 200, 429, 200, 200], statuses
    out = await get(relay, "tb", "/hello")
    assert b"too many requests to this tunnel" in out, out

    relay = await startRelay(str(tmp_path / "state2"), "--rate-total", "3/h")
    relays.append(relay)
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "ta")
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "tb")
    statuses = [int((await get(relay, name, "/hello")).split(b" ", 2)[1]) for name in ("ta", "tb", "ta", "tb")]
    assert statuses == [200, 200, 200, 429], statuses
    assert b"too many requests to this relay" in await get(relay, "ta", "/hello")


@pytest_twisted.ensureDeferred
async def test_reserved_tcp_port(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], echoServer: int
) -> None:
    """
    A TCP port reserved for a token is refused to other tokens and never
    given out at random; its token gets it.
    """
    from tests.conftest import freePortRange

    low, high = freePortRange(3)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"owner-token-1 tcp:{low}\nother-token-1\n")
    relay = await policyRelay(tmp_path, "--tokens-file", str(tokens), "--tcp-ports", f"{low}-{high}")
    relays.append(relay)
    thief = await startAgent(
        agents,
        relay,
        "--token",
        "other-token-1",
        "--tcp",
        str(echoServer),
        "--remote-port",
        str(low),
        expectReady=False,
    )
    with pytest.raises(RuntimeError, match=f"the tcp port {low} is reserved for another token"):
        await thief.agent.ready
    anyPort = await startAgent(agents, relay, "--token", "other-token-1", "--tcp", str(echoServer))
    assert anyPort.address() != f"tcp://127.0.0.1:{low}"
    owner = await startAgent(
        agents, relay, "--token", "owner-token-1", "--tcp", str(echoServer), "--remote-port", str(low)
    )
    assert owner.address() == f"tcp://127.0.0.1:{low}"


def tcpEcho(address: str, payload: bytes) -> bytes:
    """
    L{tests.test_policy_streams.echoThrough} at a tunnel's C{tcp://} address
    (a refused visitor may be reset before connect() even returns).
    """
    from tests.test_policy_streams import echoThrough

    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    return echoThrough(host, int(port), payload)


@pytest_twisted.ensureDeferred
async def test_relay_ip_rules_cover_tcp_tunnels(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], echoServer: int
) -> None:
    """
    The relay-wide deny list also closes TCP tunnel connections at once
    (they have no HTTP to answer); an allowed address gets through.
    """
    relay = await policyRelay(tmp_path, "--ip-deny", "127.0.0.0/8")
    relays.append(relay)
    agent = await startAgent(agents, relay, "--tcp", str(echoServer))
    assert await inThread(tcpEcho, agent.address(), b"ping") == b""
    relay = await startRelay(str(tmp_path / "state2"), "--ip-allow", "127.0.0.1")
    relays.append(relay)
    agent = await startAgent(agents, relay, "--tcp", str(echoServer))
    assert await inThread(tcpEcho, agent.address(), b"ping") == b"ping"


@pytest_twisted.ensureDeferred
async def test_token_guessing_is_slowed(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], origin: int
) -> None:
    """
    After ten failed token attempts from one address, even the right token
    from it is turned away for now (and its agent keeps retrying): guessing
    tokens is slowed to ten a minute.
    """
    from twisted.logger import formatEvent, globalLogPublisher

    relay = await policyRelay(tmp_path, "--token", "the-right-token")
    relays.append(relay)
    first = await startAgent(agents, relay, "--token", "the-right-token", "--http", str(origin))
    await first.stop()
    for i in range(10):
        wrong = await startAgent(agents, relay, "--token", f"guess-{i:04d}", "--http", str(origin), expectReady=False)
        with pytest.raises(RuntimeError, match="invalid or missing token"):
            await wrong.agent.ready
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        right = await startAgent(agents, relay, "--token", "the-right-token", "--http", str(origin), expectReady=False)
        for _ in range(100):
            if any("too many failed token attempts from this address" in line for line in seen):
                break
            await wait(0.05)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert any("too many failed token attempts from this address; retry in" in line for line in seen), seen[-5:]
    assert not right.agent.ready.called and right.agent.failure is None  # still trying, not given up


@pytest_twisted.ensureDeferred
async def test_policy_over_http2(tmp_path: Path, relays: list[Relay], agents: list[RunningAgent], origin: int) -> None:
    """
    HTTP/2 visitors (prior-knowledge h2c) meet the same policy: basic auth,
    IP rules, and bytes counted toward the quota, so switching protocol
    does not step around it.
    """
    relay = await policyRelay(tmp_path, "--quota-per-tunnel", "40KiB")
    relays.append(relay)
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "h2q", "--basic-auth", "dan:pw-2")
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "h2deny", "--ip-deny", "127.0.0.1")
    h2 = ("--http2-prior-knowledge",)
    out = await get(relay, "h2deny", "/hello", *h2)
    assert out.startswith(b"HTTP/2 403"), out
    out = await get(relay, "h2q", "/hello", *h2)
    assert out.startswith(b"HTTP/2 401") and b"www-authenticate: Basic" in out, out
    out = await get(relay, "h2q", "/big?n=50000", "-u", "dan:pw-2", *h2)
    assert out.startswith(b"HTTP/2 200"), out[:200]
    out = await get(relay, "h2q", "/hello", "-u", "dan:pw-2", *h2)
    assert out.startswith(b"HTTP/2 429") and b"monthly bandwidth quota" in out, out


@pytest_twisted.ensureDeferred
async def test_idle_http2_connection_closed(tmp_path: Path, relays: list[Relay]) -> None:
    """
    An HTTP/2 connection opened and left with no stream is closed after
    --idle-timeout, like an idle HTTP/1.1 one.
    """
    relay = await policyRelay(tmp_path, "--idle-timeout", "1")
    relays.append(relay)

    def idleH2() -> tuple[bytes, float]:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data, time.monotonic() - start

    data, took = await inThread(idleH2)
    assert data[3:4] == b"\x04", data  # the relay's SETTINGS, then closed
    assert 0.9 < took < 5, took


@pytest_twisted.ensureDeferred
async def test_relay_ip_rules_cover_udp_tunnels(
    tmp_path: Path, relays: list[Relay], agents: list[RunningAgent]
) -> None:
    """
    A UDP visitor the relay-wide rules refuse gets nothing through (its
    datagrams are dropped, counted, and reach no local socket); one they
    allow is echoed.
    """
    from tests.test_udp import UDPClient, UDPEcho, freeUDPRange, listenUDP, publicPort

    listeners: list[Any] = []
    try:
        echo = UDPEcho()
        target = listenUDP(listeners, echo)
        for deny, expectEcho in (("127.0.0.0/8", False), ("192.0.2.0/24", True)):
            low, high = freeUDPRange(4)
            relay = await startRelay(
                str(tmp_path / f"state-{expectEcho}"), "--udp-ports", f"{low}-{high}", "--ip-deny", deny
            )
            relays.append(relay)
            agent = await startAgent(agents, relay, "--udp", str(target))
            client = UDPClient()
            listenUDP(listeners, client)
            client.transport.write(b"ping", ("127.0.0.1", publicPort(agent)))  # type: ignore[union-attr]
            if expectEcho:
                assert await client.recv() == b"ping"
            else:
                with pytest.raises(defer.TimeoutError):
                    await client.recv(timeout=0.5)
        assert len(set(echo.sources)) == 1  # only the allowed relay's flow reached the service
    finally:
        for port in listeners:
            await defer.maybeDeferred(port.stopListening)


# -- agent limits count an IPv6 /64 as one address


class _Wire:
    """
    One side of an in-memory link: what one L{Link} sends, the other reads.
    """

    def __init__(self) -> None:
        self.other: Any = None
        self.closed: list[str] = []

    def sendLinkBytes(self, data: bytes) -> None:
        self.other.dataReceived(data)

    def closeLink(self, reason: str) -> None:
        self.closed.append(reason)


def linkedSession(relay: Relay, peer: str) -> tuple[Any, list[dict[str, Any]]]:
    """
    A relay session for an agent at C{peer}, over a real pair of links in
    memory; returns it and the control messages the agent side receives.
    """
    from txtunnel.link import Link
    from txtunnel.relay.session import RelaySession

    toAgent, toRelay = _Wire(), _Wire()
    relayLink = Link(toAgent, role="relay", clock=reactor, peer=peer, keepalive=0)
    agentLink = Link(toRelay, role="agent", clock=reactor, peer="relay", keepalive=0)
    toAgent.other, toRelay.other = agentLink, relayLink
    received: list[dict[str, Any]] = []
    agentLink.controlReceived = received.append
    session = RelaySession(relay.relay, relayLink, toAgent, peer)
    return session, received


async def reply(received: list[dict[str, Any]], count: int) -> dict[str, Any]:
    for _ in range(200):
        if len(received) >= count:
            return received[count - 1]
        await wait(0.01)
    raise AssertionError(f"no reply {count}: {received}")


@pytest_twisted.ensureDeferred
async def test_agent_limits_count_ipv6_64_as_one(tmp_path: Path, relays: list[Relay]) -> None:
    """
    Tunnels per agent address, the bind rate and the failed-token throttle
    count an IPv6 /64 as one address, like visitor limits: an agent cannot
    step around them by changing the low bits of its address; another /64
    is another address.
    """
    from txtunnel.frames import PROTOCOL_VERSION

    hello = {"op": "hello", "versions": [PROTOCOL_VERSION], "token": "right-token-1234"}
    relay = await policyRelay(tmp_path, "--token", "right-token-1234", "--max-tunnels-per-ip", "1")
    relays.append(relay)
    first, got1 = linkedSession(relay, "2001:db8:0:1::10")
    first.controlReceived(hello)
    assert (await reply(got1, 1))["op"] == "welcome"
    first.controlReceived({"op": "bind", "id": 1, "type": "http"})
    assert (await reply(got1, 2))["op"] == "bound", got1
    second, got2 = linkedSession(relay, "2001:db8:0:1::20")
    second.controlReceived(hello)
    second.controlReceived({"op": "bind", "id": 1, "type": "http"})
    refused = await reply(got2, 2)
    assert refused["op"] == "refused" and "at most 1 tunnels per agent address" in refused["reason"], refused
    third, got3 = linkedSession(relay, "2001:db8:0:2::10")
    third.controlReceived(hello)
    third.controlReceived({"op": "bind", "id": 1, "type": "http"})
    assert (await reply(got3, 2))["op"] == "bound", got3

    # The bind rate: one new tunnel a minute per /64.
    rated = await policyRelay(tmp_path / "rated", "--bind-rate", "1/m")
    relays.append(rated)
    for peer, expected in (("2001:db8:0:5::1", "bound"), ("2001:db8:0:5::2", "refused"), ("2001:db8:0:6::1", "bound")):
        session, got = linkedSession(rated, peer)
        session.controlReceived({"op": "hello", "versions": [PROTOCOL_VERSION]})
        session.controlReceived({"op": "bind", "id": 1, "type": "http"})
        answer = await reply(got, 2)
        assert answer["op"] == expected, (peer, answer)
        assert expected == "bound" or "too many new tunnels from this address" in answer["reason"], answer

    # Failed tokens: ten guesses from one /64, then even the right token from
    # another address of it is told to wait; another /64 is not.
    for i in range(10):
        session, got = linkedSession(relay, f"2001:db8:0:9::{i + 1:x}")
        session.controlReceived(dict(hello, token=f"guess-{i:04d}-xxxx"))
        assert (await reply(got, 1))["code"] == "auth"
    session, got = linkedSession(relay, "2001:db8:0:9::ff")
    session.controlReceived(hello)
    busy = await reply(got, 1)
    assert busy["code"] == "busy" and "too many failed token attempts" in busy["reason"], busy
    session, got = linkedSession(relay, "2001:db8:0:a::1")
    session.controlReceived(hello)
    assert (await reply(got, 1))["op"] == "welcome"


@pytest_twisted.ensureDeferred
async def test_agent_limit_defaults(tmp_path: Path, relays: list[Relay]) -> None:
    """
    A relay started with no limit options enforces the documented defaults:
    ten tunnels per agent address, and new tunnels at 5/m:3 (five a minute
    and three more at once: eight, then one every twelve seconds).  The ten are names held for an agent
    that was away (taking them back is not a new tunnel), the way a
    reconnecting agent brings back its tunnels.
    """
    import hashlib

    from txtunnel.frames import PROTOCOL_VERSION

    relay = await policyRelay(tmp_path)
    relays.append(relay)
    key = "agent-key-0123456789abcdef"
    owner = "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
    for i in range(10):
        await relay.relay.store.hold("http", f"held-{i}", owner, relay.relay.wallClock() + 600)
    session, got = linkedSession(relay, "192.0.2.1")
    session.controlReceived({"op": "hello", "versions": [PROTOCOL_VERSION], "key": key})
    for i in range(10):
        session.controlReceived({"op": "bind", "id": i + 1, "type": "http", "name": f"held-{i}"})
        assert (await reply(got, i + 2))["op"] == "bound", got[-1]
    session.controlReceived({"op": "bind", "id": 11, "type": "http"})
    refused = await reply(got, 12)
    assert "at most 10 tunnels per agent address; this address holds 10" in refused["reason"], refused

    other, got = linkedSession(relay, "192.0.2.2")
    other.controlReceived({"op": "hello", "versions": [PROTOCOL_VERSION]})
    for i in range(8):
        other.controlReceived({"op": "bind", "id": i + 1, "type": "http"})
        assert (await reply(got, i + 2))["op"] == "bound", got[-1]
    other.controlReceived({"op": "bind", "id": 9, "type": "http"})
    refused = await reply(got, 10)
    assert (
        refused["op"] == "refused" and "too many new tunnels from this address; try again in 12s" in refused["reason"]
    )
