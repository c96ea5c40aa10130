"""
Traffic in flight when things go wrong: a dropped link answers open
requests at once (502), a name held for an away agent answers 503 with
Retry-After (also after a relay restart), and a down local service answers
502 quickly with the reason.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, reactor, task

from tests.conftest import Relay, RunningAgent, closedPort, curl, startAgent, startRelay
from tests.test_reconnect import dropLink, waitFor
from txtunnel.agent.states import LinkState


def _host(agent: RunningAgent) -> str:
    return agent.address().split("//", 1)[1].rstrip("/")


@pytest_twisted.ensureDeferred
async def test_dropped_link_answers_open_requests_at_once(
    relay: Relay, agents: list[RunningAgent], origin: int
) -> None:
    """
    A request waiting on the local service when the link breaks (no
    goodbye) gets a 502 within a second, not a hang.
    """
    agent = await startAgent(agents, relay, "--http", str(origin), "--reconnect-initial", "30")
    started = time.monotonic()
    task.deferLater(reactor, 0.3, dropLink, agent)
    code, out, err = await curl("-i", "-H", f"Host: {_host(agent)}", f"http://127.0.0.1:{relay.port}/never")
    assert code == 0, err
    assert out.startswith(b"HTTP/1.1 502"), out
    assert time.monotonic() - started < 1.5


@pytest_twisted.ensureDeferred
async def test_held_name_answers_503_with_retry_after(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    While the agent is away and its name is held for it, visitors are told
    to come back (503, Retry-After), not that there is no such tunnel; once
    it is back they are served again.
    """
    # A long backoff keeps the agent away for as long as the checks take;
    # the test then ends the wait itself.
    agent = await startAgent(agents, relay, "--http", str(origin), "--reconnect-initial", "30")
    host = _host(agent)
    old = dropLink(agent)
    await waitFor(lambda: agent.agent.state is LinkState.RECONNECTING)
    code, out, _ = await curl("-i", "-H", f"Host: {host}", f"http://127.0.0.1:{relay.port}/")
    assert out.startswith(b"HTTP/1.1 503"), out
    assert b"\r\nRetry-After: 5\r\n" in out
    assert b"is reconnecting" in out
    assert agent.agent.session is None
    assert agent.service.reconnectNow()
    await waitFor(lambda: agent.agent.session not in (None, old) and agent.agent.tunnels[0].address is not None)
    code, out, _ = await curl("-H", f"Host: {host}", f"http://127.0.0.1:{relay.port}/")
    assert b"hello from origin" in out


@pytest_twisted.ensureDeferred
async def test_clean_goodbye_gives_404_not_503(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    An agent that reconnected and then left cleanly holds nothing: its name
    is simply gone (404).
    """
    agent = await startAgent(agents, relay, "--http", str(origin), "--reconnect-initial", "0.1")
    host = _host(agent)
    old = dropLink(agent)
    await waitFor(lambda: agent.agent.session not in (None, old) and agent.agent.tunnels[0].address is not None)
    await agent.stop()
    code, out, _ = await curl("-i", "-H", f"Host: {host}", f"http://127.0.0.1:{relay.port}/")
    assert out.startswith(b"HTTP/1.1 404"), out


@pytest_twisted.ensureDeferred
async def test_held_name_503_after_relay_restart_and_404_after_grace(
    tmp_path: Path, agents: list[RunningAgent], origin: int
) -> None:
    """
    A relay restarted with the same state dir still answers 503 for the
    names of agents that have not come back yet; when the grace period is
    over the name is unknown (404).
    """
    state = str(tmp_path / "state")
    relay = await startRelay(state, "--grace", "2")
    agent = await startAgent(agents, relay, "--http", str(origin))
    host = _host(agent)
    await defer.maybeDeferred(agent.service.client.stopService)  # it will not come back
    await defer.maybeDeferred(relay.service.stopService)
    restarted = await startRelay(state, "--grace", "2")
    try:
        code, out, _ = await curl("-i", "-H", f"Host: {host}", f"http://127.0.0.1:{restarted.port}/")
        assert out.startswith(b"HTTP/1.1 503"), out
        await task.deferLater(reactor, 2.1, lambda: None)
        code, out, _ = await curl("-i", "-H", f"Host: {host}", f"http://127.0.0.1:{restarted.port}/")
        assert out.startswith(b"HTTP/1.1 404"), out
    finally:
        await defer.maybeDeferred(restarted.service.stopService)


@pytest_twisted.ensureDeferred
async def test_local_service_down_answers_502_quickly(relay: Relay, agents: list[RunningAgent]) -> None:
    """
    A local service that is not listening costs the visitor well under a
    second, and the 502 says why.
    """
    port = closedPort()
    agent = await startAgent(agents, relay, "--http", str(port))
    started = time.monotonic()
    code, out, _ = await curl("-i", "-H", f"Host: {_host(agent)}", f"http://127.0.0.1:{relay.port}/")
    assert out.startswith(b"HTTP/1.1 502"), out
    assert f"127.0.0.1:{port} refused the connection".encode() in out
    assert time.monotonic() - started < 1.0


@pytest_twisted.ensureDeferred
async def test_held_name_answers_503_over_http2(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    The HTTP/2 edge gives the same 503 and Retry-After while the agent is
    away.
    """
    agent = await startAgent(agents, relay, "--http", str(origin), "--reconnect-initial", "30")
    host = _host(agent)
    dropLink(agent)
    await waitFor(lambda: agent.agent.session is None)
    code, out, err = await curl(
        "-i", "--http2-prior-knowledge", "-H", f"Host: {host}", f"http://127.0.0.1:{relay.port}/"
    )
    assert out.startswith(b"HTTP/2 503"), (out, err)
    assert b"\r\nretry-after: 5\r\n" in out.lower()
