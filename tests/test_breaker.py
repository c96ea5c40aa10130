"""
The agent's circuit breaker and health check: unit tests with a Clock, and
real agents in front of a local service that goes down and comes back.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger

from tests.conftest import Relay, RunningAgent, closedPort, curl, inThread, originSite, startAgent
from tests.test_reconnect import waitFor
from txtunnel.agent.breaker import BreakerState, CircuitBreaker, HealthCheck, parseHealthCheck


def _breaker(clock: Clock, threshold: int = 3, cooldown: float = 10.0) -> CircuitBreaker:
    breaker = CircuitBreaker(clock, threshold=threshold, cooldown=cooldown, name="web")
    breaker.log = Logger(observer=lambda e: None)
    return breaker


def test_breaker_opens_after_failures_in_a_row() -> None:
    clock = Clock()
    breaker = _breaker(clock)
    seen: list[tuple[str, str]] = []
    breaker.observers.append(lambda old, new: seen.append((old.value, new.value)))
    breaker.failure()
    breaker.failure()
    breaker.success()  # the count is of failures in a row
    breaker.failure()
    breaker.failure()
    assert breaker.allow() and breaker.state is BreakerState.CLOSED
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retryAfter() == 10.0
    assert seen == [("closed", "open")]


def test_breaker_half_open_lets_one_probe_through() -> None:
    clock = Clock()
    breaker = _breaker(clock, threshold=1)
    breaker.failure()
    clock.advance(9.9)
    assert not breaker.allow()
    clock.advance(0.1)
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # others wait for its outcome
    breaker.success()
    assert breaker.state is BreakerState.CLOSED
    assert all(breaker.allow() for _ in range(5))


def test_breaker_failed_probe_opens_it_again() -> None:
    clock = Clock()
    breaker = _breaker(clock, threshold=1)
    breaker.failure()
    clock.advance(10)
    assert breaker.allow()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retryAfter() == 10.0


def test_breaker_lost_probe_is_replaced_after_a_cooldown() -> None:
    """
    A probe whose outcome never comes (the visitor went away) does not keep
    the breaker half-open for ever.
    """
    clock = Clock()
    breaker = _breaker(clock, threshold=1)
    breaker.failure()
    clock.advance(10)
    assert breaker.allow()
    clock.advance(5)
    assert not breaker.allow()
    clock.advance(5)
    assert breaker.allow()


def test_breaker_threshold_zero_is_off() -> None:
    breaker = _breaker(Clock(), threshold=0)
    for _ in range(100):
        breaker.failure()
    assert breaker.allow() and breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    "text, parsed", [("tcp", ("tcp", "")), ("http:/health", ("http", "/health")), ("", None), ("  ", None)]
)
def test_parse_health_check(text: str, parsed: Any) -> None:
    assert parseHealthCheck(text) == parsed


@pytest.mark.parametrize("text", ["udp", "http:health", "http:/a b", "http://x/", "/health"])
def test_parse_health_check_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parseHealthCheck(text)


def test_health_check_options_are_checked() -> None:
    from twisted.python import usage

    from txtunnel.agent import tap as agentTap

    for args, message in [
        (["--health-check", "ping"], "not a health check"),
        (["--breaker-failures", "-2"], "must not be negative"),
        (["--breaker-cooldown", "0"], "more than 0"),
    ]:
        with pytest.raises(usage.UsageError, match=message):
            agentTap.Options(environ={}).parseOptions(["--http", "8000", *args])
    options = agentTap.Options(environ={})
    options.parseOptions(["--http", "8000", "--health-check", "http:/up", "--breaker-failures", "2"])
    assert options.tunnels[0]["options"]["health-check"] == ("http", "/up")
    assert options.tunnels[0]["options"]["breaker-failures"] == 2


async def _status(relay: Relay, agent: RunningAgent, path: str = "/") -> tuple[bytes, float]:
    host = agent.address().split("//", 1)[1].rstrip("/")
    started = time.monotonic()
    code, out, _ = await curl("-i", "-H", f"Host: {host}", f"http://127.0.0.1:{relay.port}{path}")
    return out, time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_breaker_answers_503_fast_then_probes(relay: Relay, agents: list[RunningAgent]) -> None:
    """
    A service that is down: the first failures are 502 with the reason,
    then 503 with Retry-After straight away; once it is back and the
    cool-down is over, the next request goes through and closes the breaker.
    """
    port = closedPort()
    agent = await startAgent(agents, relay, "--http", str(port), "--breaker-failures", "2", "--breaker-cooldown", "1")
    for _ in range(2):
        out, _ = await _status(relay, agent)
        assert out.startswith(b"HTTP/1.1 502"), out
    out, took = await _status(relay, agent)
    assert out.startswith(b"HTTP/1.1 503"), out
    assert b"Retry-After: 1\r\n" in out and b"circuit open" in out
    assert took < 1.0
    listening = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(originSite())
    try:
        await waitFor(lambda: agent.agent.tunnels[0].breaker.retryAfter() == 0)
        out, _ = await _status(relay, agent)
        assert out.startswith(b"HTTP/1.1 200"), out
        assert agent.agent.tunnels[0].breaker.state is BreakerState.CLOSED
    finally:
        await defer.maybeDeferred(listening.stopListening)


@pytest_twisted.ensureDeferred
async def test_health_check_opens_and_closes_the_breaker(relay: Relay, agents: list[RunningAgent]) -> None:
    """
    With an HTTP health check, the breaker opens when the service stops
    answering and closes again when it is back, before any visitor tries.
    """
    port = closedPort()
    listening = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(originSite())
    agent = await startAgent(
        agents,
        relay,
        "--http",
        str(port),
        "--health-check",
        "http:/hello",
        "--health-interval",
        "0.1",
        "--breaker-failures",
        "1",
        "--breaker-cooldown",
        "30",
    )
    tunnel = agent.agent.tunnels[0]
    assert tunnel.health is not None
    await waitFor(lambda: tunnel.health.healthy is True)
    await defer.maybeDeferred(listening.stopListening)
    await waitFor(lambda: tunnel.breaker.state is BreakerState.OPEN)
    out, took = await _status(relay, agent)
    assert out.startswith(b"HTTP/1.1 503") and took < 1.0, out
    listening = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(originSite())
    try:
        await waitFor(lambda: tunnel.breaker.state is BreakerState.CLOSED)
        out, _ = await _status(relay, agent, "/hello")
        assert out.startswith(b"HTTP/1.1 200"), out
    finally:
        await defer.maybeDeferred(listening.stopListening)


@pytest_twisted.ensureDeferred
async def test_tcp_health_check_opens_and_closes_the_breaker() -> None:
    """
    A TCP health check (a connect to the target) against a closed port
    reports it unhealthy and opens the breaker it feeds; once something
    listens there the next check passes and closes it.  (The breaker of a
    TCP tunnel in front of visitors is tested below.)
    """
    port = closedPort()
    breaker = _breaker(reactor, threshold=1)  # type: ignore[arg-type]
    check = HealthCheck(reactor, ("127.0.0.1", port), ("tcp", ""), breaker, interval=60, timeout=2)
    check.log = Logger(observer=lambda e: None)
    assert await check.probe() is False
    assert breaker.state is BreakerState.OPEN
    listening = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(originSite())
    try:
        assert await check.probe() is True
        assert breaker.state is BreakerState.CLOSED
    finally:
        await defer.maybeDeferred(listening.stopListening)


class _Counting(Factory):
    """
    A local service that counts the connections it gets and keeps them open.
    """

    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.connections += 1
        return Protocol()


def _closedWithin(port: int, timeout: float) -> bool:
    """
    Connect to C{port} like a visitor and report whether the relay closes
    the connection (EOF or reset) within C{timeout} seconds.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            return s.recv(1) == b""
    except ConnectionResetError:
        # Reset so soon that even connect() saw it.
        return True
    except TimeoutError:
        return False


@pytest_twisted.ensureDeferred
async def test_open_tcp_tunnel_breaker_closes_visitors_at_once(relay: Relay, agents: list[RunningAgent]) -> None:
    """
    A TCP tunnel in front of a service that refuses: the failed connect
    opens the breaker; while it is open a visitor's connection is closed at
    once, and the agent does not even try the service (which now listens
    and would keep the connection open): it sees no connection at all.
    """
    port = closedPort()
    agent = await startAgent(agents, relay, "--tcp", str(port), "--breaker-failures", "1", "--breaker-cooldown", "60")
    tunnel = agent.agent.tunnels[0]
    public = int(agent.address().rsplit(":", 1)[1])
    assert await inThread(_closedWithin, public, 10.0)  # refused by the service: closed
    await waitFor(lambda: tunnel.breaker.state is BreakerState.OPEN)
    service = _Counting()
    listening = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(service)
    try:
        for _ in range(3):
            assert await inThread(_closedWithin, public, 10.0)
        assert service.connections == 0
        assert tunnel.breaker.state is BreakerState.OPEN
    finally:
        await defer.maybeDeferred(listening.stopListening)
