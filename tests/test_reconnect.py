"""
Reconnects keep the address: the relay holds a dropped agent's names and
ports for a grace period, also across a restart of the relay, and a clean
goodbye frees them at once.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from tests.conftest import Relay, RunningAgent, curl, startAgent, startRelay
from txtunnel.agent.session import AgentSession


async def waitFor(condition: Any, timeout: float = 15.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("timed out waiting")


def dropLink(agent: RunningAgent) -> AgentSession:
    """
    Cut the agent's link as a network failure would (no goodbye).
    """
    session = agent.agent.session
    assert session is not None
    session.carrier.transport.abortConnection()
    return session


async def rebound(agent: RunningAgent, old: AgentSession) -> None:
    await waitFor(lambda: agent.agent.session not in (None, old) and all(t.address for t in agent.agent.tunnels))


@pytest_twisted.ensureDeferred
async def test_http_address_survives_a_dropped_link(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    An agent with a random name whose link drops reconnects and gets the
    same URL back, which serves again.
    """
    agent = await startAgent(agents, relay, "--http", str(origin))
    address = agent.address()
    old = dropLink(agent)
    await rebound(agent, old)
    assert agent.address() == address
    host = address.split("//", 1)[1].rstrip("/")
    code, out, _ = await curl("-H", f"Host: {host}", f"http://127.0.0.1:{relay.port}/")
    assert code == 0 and b"hello from origin" in out


@pytest_twisted.ensureDeferred
async def test_tcp_port_survives_a_dropped_link(relay: Relay, agents: list[RunningAgent], echoServer: int) -> None:
    """
    A TCP tunnel's public port is the same after a reconnect.
    """
    agent = await startAgent(agents, relay, "--tcp", str(echoServer))
    address = agent.address()
    old = dropLink(agent)
    await rebound(agent, old)
    assert agent.address() == address


@pytest_twisted.ensureDeferred
async def test_clean_stop_frees_the_name_at_once(
    relay: Relay, agents: list[RunningAgent], origin: int, tmp_path: Path
) -> None:
    """
    An agent that stops cleanly says goodbye: another agent can take its
    subdomain straight away.
    """
    first = await startAgent(agents, relay, "--http", str(origin), "-s", "handover", "--key-file", str(tmp_path / "a"))
    await first.stop()
    second = await startAgent(agents, relay, "--http", str(origin), "-s", "handover", "--key-file", str(tmp_path / "b"))
    assert second.address().startswith("http://handover.localhost:")


@pytest_twisted.ensureDeferred
async def test_dropped_name_is_held_then_released(tmp_path: Path, agents: list[RunningAgent], origin: int) -> None:
    """
    After an unclean drop the name is held for the grace period: another
    agent is refused until it ends, then gets it.
    """
    relay = await startRelay(str(tmp_path / "state"), "--grace", "1")
    try:
        first = await startAgent(agents, relay, "--http", str(origin), "-s", "held", "--key-file", str(tmp_path / "a"))
        await defer.maybeDeferred(first.service.client.stopService)  # it will not come back
        dropLink(first) if first.agent.session is not None else None
        other = await startAgent(
            agents, relay, "--http", str(origin), "-s", "held", "--key-file", str(tmp_path / "b"), expectReady=False
        )
        with pytest.raises(RuntimeError, match="'held' is in use"):
            await other.agent.ready
        await task.deferLater(reactor, 1.2, lambda: None)
        later = await startAgent(agents, relay, "--http", str(origin), "-s", "held", "--key-file", str(tmp_path / "c"))
        assert later.address().startswith("http://held.localhost:")
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_same_address_after_relay_restart(tmp_path: Path, agents: list[RunningAgent], origin: int) -> None:
    """
    When the relay restarts (same port, same state dir) the agent reconnects
    on its own and gets the same random name back.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = str(tmp_path / "state")
    relay = await startRelay(state, "--http", f"tcp:{port}:interface=127.0.0.1")
    agent = await startAgent(agents, relay, "--http", str(origin))
    address = agent.address()
    old = agent.agent.session
    await defer.maybeDeferred(relay.service.stopService)
    restarted = await startRelay(state, "--http", f"tcp:{port}:interface=127.0.0.1")
    try:
        await rebound(agent, old)  # type: ignore[arg-type]
        assert agent.address() == address
        host = address.split("//", 1)[1].rstrip("/")
        code, out, _ = await curl("-H", f"Host: {host}", f"http://127.0.0.1:{port}/")
        assert code == 0 and b"hello from origin" in out
    finally:
        await defer.maybeDeferred(restarted.service.stopService)


def test_agent_key_file(tmp_path: Path) -> None:
    """
    The agent key is made once, private to its user (0600), and read back
    the same on the next start.
    """
    import os
    import stat

    from txtunnel.agent.tap import loadAgentKey

    path = tmp_path / "dir" / "agent.key"
    key = loadAgentKey(str(path))
    assert key is not None and len(key) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert loadAgentKey(str(path)) == key


def test_store_holds_expire(tmp_path: Path) -> None:
    """
    A held claim belongs to its owner until it expires, then to anyone;
    holdAll turns live claims of a previous run into holds.
    """
    from txtunnel.store import SQLiteStore

    now = [1000.0]
    store = SQLiteStore(str(tmp_path / "s.sqlite3"), clock=lambda: now[0])
    results: list[Any] = []
    store.claim("http", "demo", "a").addCallback(results.append)
    store.hold("http", "demo", "a", until=1010.0)
    store.claim("http", "demo", "b").addCallback(results.append)
    now[0] = 1011.0
    store.claim("http", "demo", "b").addCallback(results.append)
    store.holdAll(until=1020.0)
    store.claim("http", "demo", "c").addCallback(results.append)
    now[0] = 1021.0
    store.owner("http", "demo").addCallback(results.append)
    store.close()
    assert results == [True, False, True, False, None]


def test_agent_key_file_with_garbage(tmp_path: Path) -> None:
    """
    A key file that does not hold a key is reported and not overwritten;
    the agent runs with a key for this run only.
    """
    from txtunnel.agent.tap import loadAgentKey

    path = tmp_path / "agent.key"
    path.write_text("short\n")
    assert loadAgentKey(str(path)) is None
    assert path.read_text() == "short\n"


@pytest_twisted.ensureDeferred
async def test_restarted_agent_gets_its_random_name_back(
    relay: Relay, agents: list[RunningAgent], origin: int, echoServer: int, tmp_path: Path
) -> None:
    """
    An agent that dies without a goodbye and is started again with the same
    key file gets the same random HTTP name and TCP port back (from the
    reclaim file next to its key), and the name serves again.  After a clean
    stop the relay freed them, and the file forgets them too.
    """
    key = str(tmp_path / "agent.key")
    ini = tmp_path / "agent.ini"
    ini.write_text(
        f"[tunnel:web]\ntype = http\ntarget = {origin}\n\n[tunnel:echo]\ntype = tcp\ntarget = {echoServer}\n"
    )
    args = ("--config", str(ini), "--key-file", key)
    first = await startAgent(agents, relay, *args)
    addresses = {t.name: t.address for t in first.agent.tunnels}
    await defer.maybeDeferred(first.service.client.stopService)  # dies: no goodbye, no retry
    if first.agent.session is not None:
        dropLink(first)
    await waitFor(lambda: not any(s.tunnels for s in relay.relay.sessions))
    second = await startAgent(agents, relay, *args)
    assert {t.name: t.address for t in second.agent.tunnels} == addresses
    host = second.address("web").split("//", 1)[1].rstrip("/")
    code, out, _ = await curl("-H", f"Host: {host}", f"http://127.0.0.1:{relay.port}/")
    assert code == 0 and b"hello from origin" in out
    await second.stop()
    assert json.loads(Path(key + ".reclaim").read_text())["tunnels"] == {}


@pytest_twisted.ensureDeferred
async def test_stale_reclaim_file_takes_a_new_name(
    relay: Relay, agents: list[RunningAgent], origin: int, tmp_path: Path
) -> None:
    """
    A reclaim entry naming an address another agent holds is refused by the
    relay: the agent takes a new random name, says so, and keeps that one.
    """
    from txtunnel.agent.reclaim import ReclaimFile

    holder = await startAgent(agents, relay, "--http", str(origin), "--key-file", str(tmp_path / "other.key"))
    taken = holder.address().split("//", 1)[1].split(".", 1)[0]
    key = str(tmp_path / "agent.key")
    reclaims = ReclaimFile(key + ".reclaim")
    reclaims.save(relay.url, "http", "http", {"name": taken})
    agent = await startAgent(agents, relay, "--http", str(origin), "--key-file", key)
    name = agent.address().split("//", 1)[1].split(".", 1)[0]
    assert name != taken
    assert reclaims.load(relay.url, "http", "http") == {"name": name}


def test_reclaim_file(tmp_path: Path) -> None:
    """
    The reclaim file is private (0600), keeps entries by relay, type and
    tunnel name, forgets one that is emptied, and ignores entries and files
    that are not what it wrote, without failing.
    """
    import os
    import stat

    from txtunnel.agent.reclaim import ReclaimFile

    path = tmp_path / "agent.key.reclaim"
    f = ReclaimFile(str(path))
    assert f.load("ws://r", "http", "web") == {}
    f.save("ws://r", "http", "web", {"name": "brave-otter"})
    f.save("ws://r", "tcp", "db", {"port": 20005})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ReclaimFile(str(path)).load("ws://r", "http", "web") == {"name": "brave-otter"}
    assert f.load("ws://other", "http", "web") == {}
    f.save("ws://r", "http", "web", {})
    assert f.load("ws://r", "http", "web") == {}
    assert f.load("ws://r", "tcp", "db") == {"port": 20005}
    path.write_text(json.dumps({"tunnels": {"ws://r http web": {"name": ["no"]}, "ws://r tcp db": {"port": True}}}))
    assert f.load("ws://r", "http", "web") == {} and f.load("ws://r", "tcp", "db") == {}
    path.write_text("not json")
    assert f.load("ws://r", "http", "web") == {}
    f.save("ws://r", "http", "web", {"name": "calm-heron"})
    assert f.load("ws://r", "http", "web") == {"name": "calm-heron"}


async def _keylessAgent(agents: list[RunningAgent], relay: Relay, *args: str) -> RunningAgent:
    """
    An agent that sends no key in its hello (as an agent from before agent
    keys, or one written against the protocol, may): the relay can only
    know it by its token.
    """

    def keyless(agent: Any) -> None:
        agent.key = None
        agent.reclaims = None

    return await startAgent(agents, relay, *args, expectReady=False, adjust=keyless)


@pytest_twisted.ensureDeferred
async def test_without_a_key_the_token_owns_the_address(
    tmp_path: Path, agents: list[RunningAgent], origin: int
) -> None:
    """
    An agent that sends no key is known by its token: after it drops, an
    agent with another token is refused its held name, and an agent with
    the same token (and no key either) gets it back.
    """
    relay = await startRelay(
        str(tmp_path / "state"), "--token", "token-one-0123456789", "--token", "token-two-0123456789"
    )
    try:
        first = await _keylessAgent(
            agents, relay, "--http", str(origin), "-s", "bytoken", "--token", "token-one-0123456789"
        )
        await first.agent.ready
        [session] = relay.relay.sessions
        assert session.owner.startswith("token:")
        await defer.maybeDeferred(first.service.client.stopService)  # it will not come back
        if first.agent.session is not None:
            dropLink(first)
        await waitFor(lambda: not relay.relay.sessions)
        other = await _keylessAgent(
            agents, relay, "--http", str(origin), "-s", "bytoken", "--token", "token-two-0123456789"
        )
        with pytest.raises(RuntimeError, match="'bytoken' is in use"):
            await other.agent.ready
        same = await _keylessAgent(
            agents, relay, "--http", str(origin), "-s", "bytoken", "--token", "token-one-0123456789"
        )
        await same.agent.ready
        assert same.address().startswith("http://bytoken.localhost:")
        code, out, _ = await curl("-H", f"Host: bytoken.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/")
        assert code == 0 and b"hello from origin" in out
    finally:
        for a in agents:
            await a.stop()
        await defer.maybeDeferred(relay.service.stopService)
