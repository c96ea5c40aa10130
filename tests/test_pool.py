"""
Endpoint pooling: agents sharing a pool key serve one name together; the
relay spreads new streams over them and stops sending to one that is gone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.conftest import Relay, RunningAgent, curl, startAgent
from tests.test_reconnect import dropLink, waitFor
from txtunnel.agent import tap as agentTap
from txtunnel.agent.states import LinkState
from txtunnel.errors import BindError
from txtunnel.relay.pool import Pool, poolOwner

KEY = "pool-key-0123456789abcdef"


class Named(Resource):
    isLeaf = True

    def __init__(self, name: bytes) -> None:
        super().__init__()
        self.name = name

    def render_GET(self, request: Any) -> bytes:
        return self.name


@pytest.fixture
def origins() -> Iterator[list[int]]:
    ports = [
        pytest_twisted.blockon(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(Named(name))))
        for name in (b"A", b"B")
    ]
    yield [p.getHost().port for p in ports]
    for p in ports:
        pytest_twisted.blockon(defer.maybeDeferred(p.stopListening))


async def _get(relay: Relay, name: str = "web") -> bytes:
    code, out, err = await curl("-H", f"Host: {name}.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/")
    return out


async def _pooled(
    agents: list[RunningAgent], relay: Relay, port: int, *args: str, expectReady: bool = True
) -> RunningAgent:
    return await startAgent(
        agents, relay, "--http", str(port), "-s", "web", "--pool", KEY, *args, expectReady=expectReady
    )


@pytest_twisted.ensureDeferred
async def test_pool_spreads_visitors(relay: Relay, agents: list[RunningAgent], origins: list[int]) -> None:
    """
    Two agents with the same key and name both get the name, and new
    visitor connections are shared between them.
    """
    a = await _pooled(agents, relay, origins[0])
    b = await _pooled(agents, relay, origins[1])
    assert a.address() == b.address() == f"http://web.localhost:{relay.port}/"
    seen = Counter([await _get(relay) for _ in range(10)])
    assert set(seen) == {b"A", b"B"}
    assert min(seen.values()) >= 3


@pytest_twisted.ensureDeferred
async def test_strangers_cannot_join(relay: Relay, agents: list[RunningAgent], origins: list[int]) -> None:
    """
    An agent with another key, or with none, cannot take or join a pooled
    name; nor can a pool take a name held by a plain agent.
    """
    await _pooled(agents, relay, origins[0])
    other = await startAgent(
        agents, relay, "--http", str(origins[1]), "-s", "web", "--pool", "another-key-0123456789", expectReady=False
    )
    with pytest.raises(RuntimeError, match="in use"):
        await other.agent.ready
    plain = await startAgent(agents, relay, "--http", str(origins[1]), "-s", "web", expectReady=False)
    with pytest.raises(RuntimeError, match="in use"):
        await plain.agent.ready
    await startAgent(agents, relay, "--http", str(origins[1]), "-s", "solo")
    late = await startAgent(agents, relay, "--http", str(origins[0]), "-s", "solo", "--pool", KEY, expectReady=False)
    with pytest.raises(RuntimeError, match="in use"):
        await late.agent.ready
    assert {await _get(relay) for _ in range(4)} == {b"A"}


@pytest_twisted.ensureDeferred
async def test_gone_member_gets_no_more_visitors(relay: Relay, agents: list[RunningAgent], origins: list[int]) -> None:
    """
    When one member's link drops, every new visitor goes to the other; the
    name is not put on hold while a member still serves it; when the last
    one is gone too, visitors get 503 until a member is back.
    """
    a = await _pooled(agents, relay, origins[0], "--reconnect-initial", "30")
    # Both wait long before they dial again; the test ends B's wait itself.
    b = await _pooled(agents, relay, origins[1], "--reconnect-initial", "30")
    dropLink(a)
    await waitFor(lambda: a.agent.session is None)
    assert [await _get(relay) for _ in range(6)] == [b"B"] * 6
    assert relay.relay.heldFor("http", "web") is None
    old = dropLink(b)
    await waitFor(lambda: b.agent.state is LinkState.RECONNECTING)
    code, out, _ = await curl("-i", "-H", f"Host: web.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/")
    assert out.startswith(b"HTTP/1.1 503"), out
    assert b.agent.session is None
    assert b.service.reconnectNow()
    await waitFor(lambda: b.agent.session not in (None, old) and b.agent.tunnels[0].address is not None)
    assert await _get(relay) == b"B"


@pytest_twisted.ensureDeferred
async def test_member_leaving_cleanly_keeps_the_pool(
    relay: Relay, agents: list[RunningAgent], origins: list[int]
) -> None:
    a = await _pooled(agents, relay, origins[0])
    await _pooled(agents, relay, origins[1])
    await a.stop()
    assert [await _get(relay) for _ in range(4)] == [b"B"] * 4


class FakeLink:
    def __init__(self, streams: int, closed: bool = False) -> None:
        self.streams = dict.fromkeys(range(streams))
        self.closed = closed


class FakeMember:
    def __init__(self, name: str, streams: int, closed: bool = False) -> None:
        self.name = name
        self.session = type("S", (), {"link": FakeLink(streams, closed)})()
        self.request: dict[str, Any] = {"op": "bind", "id": 1, "type": "http", "name": "web", "pool": KEY}


def test_pool_picks_the_least_busy_member_round_robin() -> None:
    pool = Pool("web", poolOwner(KEY))
    a, b, c = FakeMember("a", 0), FakeMember("b", 0), FakeMember("c", 5)
    for m in (a, b, c):
        pool.add(m)  # type: ignore[arg-type]
    assert [pool.pick().name for _ in range(4)] == ["a", "b", "a", "b"]
    a.session.link.streams = dict.fromkeys(range(9))
    assert {pool.pick().name for _ in range(4)} == {"b"}


def test_pool_skips_closed_links_and_fails_when_empty() -> None:
    from twisted.internet.error import ConnectionLost

    pool = Pool("web", poolOwner(KEY))
    pool.add(FakeMember("gone", 0, closed=True))  # type: ignore[arg-type]
    with pytest.raises(ConnectionLost, match="no agent of the pool"):
        pool.pick()
    pool.add(FakeMember("here", 3))  # type: ignore[arg-type]
    assert pool.pick().name == "here"


def test_pool_owner_is_a_hash_and_checks_the_key() -> None:
    owner = poolOwner(KEY)
    assert KEY not in owner and owner.startswith("pool:")
    assert poolOwner(KEY) == owner != poolOwner(KEY + "x")
    for bad in (None, 5, "short", "x" * 300):
        with pytest.raises(BindError, match="pool key"):
            poolOwner(bad)
    assert Pool("web", owner).admits(owner) and not Pool("web", owner).admits(poolOwner(KEY + "x"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--http", "80", "--pool", KEY], "needs a --subdomain"),
        (["--tcp", "80", "-s", "x", "--pool", KEY], "only http tunnels"),
        (["--http", "80", "-s", "x", "--pool", "short"], "16 to 256 characters"),
    ],
)
def test_pool_options_are_checked(args: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        agentTap.Options(environ={}).parseOptions(args)


def test_pool_from_a_tunnel_section(tmp_path: Any) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text(f"[tunnel:web]\ntype = http\ntarget = 8000\nsubdomain = web\npool = {KEY}\n")
    options = agentTap.Options(environ={})
    options.parseOptions(["--config", str(ini)])
    assert options.tunnels[0]["options"]["pool"] == KEY


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "pool, subdomain, reason",
    [("short", "web", "pool key must be"), (KEY, None, "needs a subdomain"), (7, "web", "pool key must be")],
)
async def test_relay_refuses_a_bad_pool_key(
    relay: Relay, agents: list[RunningAgent], origins: list[int], pool: Any, subdomain: str | None, reason: str
) -> None:
    """
    The relay checks the pool fields itself (an agent may skip the checks
    the txtunnel agent makes): a bad key, or a pool without a name, is
    refused with the reason.
    """
    from txtunnel.agent.service import AgentService

    options = agentTap.Options(environ={})
    options.parseOptions(["--relay", relay.url, "--http", str(origins[0])])
    agent = agentTap.buildAgent(options, reactor)
    agent.tunnels[0].options["pool"] = pool
    if subdomain:
        agent.tunnels[0].options["subdomain"] = subdomain
    service = AgentService(agent)
    service.startService()
    agents.append(RunningAgent(agent, service))
    with pytest.raises(RuntimeError, match=reason):
        await agent.ready


@pytest_twisted.ensureDeferred
async def test_pool_keeps_visitor_policy(relay: Relay, agents: list[RunningAgent], origins: list[int]) -> None:
    """
    A pool's visitor policy holds whichever member serves the visitor (the
    relay's gates once saw no policy on a pool and let everyone through):
    without the password a visitor gets 401, with it both members answer.
    Members must agree: the same users (each agent salts its own hash, so
    the hashes differ) join; an agent with other settings is refused.
    """
    await _pooled(agents, relay, origins[0], "--basic-auth", "ann:secret-1")
    await _pooled(agents, relay, origins[1], "--basic-auth", "ann:secret-1")
    host = f"Host: web.localhost:{relay.port}"
    for _ in range(4):
        code, out, _ = await curl("-si", "-H", host, f"http://127.0.0.1:{relay.port}/")
        assert out.startswith(b"HTTP/1.1 401"), out
    served = {
        (await curl("-s", "-u", "ann:secret-1", "-H", host, f"http://127.0.0.1:{relay.port}/"))[1] for _ in range(6)
    }
    assert served == {b"A", b"B"}
    for extra in (["--basic-auth", "bob:secret-2"], ["--basic-auth", "ann:secret-1", "--ip-deny", "10.0.0.0/8"], []):
        odd = await _pooled(agents, relay, origins[1], *extra, expectReady=False)
        with pytest.raises(RuntimeError, match="visitor policy differs from that of the pool already serving 'web'"):
            await odd.agent.ready
