"""
The agent's link state machine, reconnect backoff and clock-jump watch, with
a fake clock; and the states a real agent goes through against a real relay.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.python.failure import Failure

from tests.conftest import Relay, RunningAgent, startAgent
from tests.test_link import QueueCarrier
from tests.test_reconnect import dropLink, waitFor
from txtunnel.agent import tap as agentTap
from txtunnel.agent.service import Agent, AgentService
from txtunnel.agent.session import AgentSession
from txtunnel.agent.states import Backoff, ClockJumpWatch, LinkState, LinkStates
from txtunnel.frames import FrameType
from txtunnel.link import Link


def test_states_follow_a_connection_and_its_loss() -> None:
    """
    Each event moves the machine along the table; observers see every
    transition; the log events carry the states as structured fields.
    """
    events: list[dict[str, Any]] = []
    states = LinkStates("ws://relay")
    states.log = Logger(observer=events.append)
    seen: list[tuple[str, str, str]] = []
    states.observers.append(lambda old, new, event, info: seen.append((old.value, new.value, event)))
    for event in ("attempt", "opened", "welcomed", "lost", "attempt", "failed", "attempt", "opened", "welcomed"):
        states.event(event)
    assert states.state is LinkState.CONNECTED
    assert seen[:4] == [
        ("disconnected", "connecting", "attempt"),
        ("connecting", "negotiating", "opened"),
        ("negotiating", "connected", "welcomed"),
        ("connected", "reconnecting", "lost"),
    ]
    assert states.failures == 0
    logged = [e for e in events if "agent_state" in e and "agent_state_from" in e]
    assert logged[0]["agent_state_from"] == "disconnected" and logged[0]["agent_state"] == "connecting"
    assert logged[0]["relay"] == "ws://relay"
    states.event("close")
    assert states.state is LinkState.CLOSED


def test_late_events_are_ignored() -> None:
    """
    An event the current state does not expect (a late callback from a link
    already gone) leaves the state alone; nothing leaves CLOSED.
    """
    states = LinkStates()
    states.log = Logger(observer=lambda e: None)
    assert states.event("welcomed") is LinkState.DISCONNECTED
    states.event("close")
    for event in ("attempt", "opened", "welcomed", "lost", "failed"):
        assert states.event(event) is LinkState.CLOSED


def test_drain_goes_through_draining_to_closed() -> None:
    """
    A shutdown with a link up is DRAINING (not yet CLOSED) while streams
    finish; a lost link or a new attempt then does not move it; close
    ends it.  Without a link there is nothing to drain.
    """
    states = LinkStates()
    states.log = Logger(observer=lambda e: None)
    assert states.event("drain") is LinkState.DISCONNECTED
    for event in ("attempt", "opened", "welcomed"):
        states.event(event)
    assert states.event("drain") is LinkState.DRAINING
    for event in ("lost", "failed", "attempt", "opened", "welcomed", "drain"):
        assert states.event(event) is LinkState.DRAINING
    assert states.event("close") is LinkState.CLOSED


def test_failures_count_attempts_since_last_connected() -> None:
    states = LinkStates()
    states.log = Logger(observer=lambda e: None)
    for _ in range(3):
        states.event("attempt")
        states.event("failed")
    assert states.failures == 3
    states.event("attempt")
    states.event("opened")
    states.event("welcomed")
    assert states.failures == 0


def test_an_observer_that_raises_does_not_stop_the_others() -> None:
    states = LinkStates()
    states.log = Logger(observer=lambda e: None)
    seen: list[str] = []

    def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    states.observers += [broken, lambda old, new, event, info: seen.append(new.value)]
    states.event("attempt")
    assert seen == ["connecting"]


def test_backoff_doubles_up_to_the_maximum() -> None:
    backoff = Backoff(initial=0.5, maximum=4.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.delay(10_000) == 4.0


@pytest.mark.parametrize("draw, factor", [(0.0, 0.8), (0.5, 1.0), (1.0, 1.2)])
def test_backoff_jitter_spreads_each_wait(draw: float, factor: float) -> None:
    backoff = Backoff(initial=1.0, maximum=100.0, jitter=0.2, random=lambda: draw)
    assert backoff.delay(3) == pytest.approx(4.0 * factor)


def test_backoff_jitter_never_exceeds_the_maximum() -> None:
    backoff = Backoff(initial=1.0, maximum=2.0, jitter=0.5, random=lambda: 1.0)
    assert backoff.delay(5) == 2.0


def test_backoff_attempt_limit() -> None:
    assert not Backoff(attempts=0).exhausted(10**6)
    limited = Backoff(attempts=3)
    assert not limited.exhausted(2)
    assert limited.exhausted(3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"initial": 0}, "0 < initial"),
        ({"initial": 5, "maximum": 1}, "initial <= maximum"),
        ({"jitter": 1.5}, "fraction"),
    ],
)
def test_backoff_refuses_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**kwargs)


class FakeTime:
    def __init__(self) -> None:
        self.wall = 1_000_000.0
        self.mono = 50.0

    def advance(self, seconds: float, asleep: bool = False) -> None:
        self.wall += seconds
        if not asleep:
            self.mono += seconds


def test_clock_jump_watch_notices_a_sleep() -> None:
    """
    Time the wall clock saw but the monotonic clock did not (a suspended
    machine) calls C{onJump}; ordinary ticks do not.
    """
    clock = Clock()
    t = FakeTime()
    jumps: list[float] = []
    watch = ClockJumpWatch(
        clock, jumps.append, interval=2.0, threshold=5.0, wall=lambda: t.wall, monotonic=lambda: t.mono
    )
    watch.log = Logger(observer=lambda e: None)
    watch.start()
    for _ in range(5):
        t.advance(2.0)
        clock.advance(2.0)
    assert jumps == []
    t.advance(600, asleep=True)
    t.advance(2.0)
    clock.advance(2.0)
    assert jumps == [pytest.approx(600)]
    watch.stop()
    assert clock.getDelayedCalls() == []


def test_clock_jump_watch_notices_a_frozen_process() -> None:
    """
    A monotonic step far over the interval (the process was not run, e.g.
    SIGSTOP) counts as a jump too.
    """
    clock = Clock()
    t = FakeTime()
    jumps: list[float] = []
    watch = ClockJumpWatch(
        clock, jumps.append, interval=2.0, threshold=5.0, wall=lambda: t.wall, monotonic=lambda: t.mono
    )
    watch.log = Logger(observer=lambda e: None)
    watch.start()
    t.advance(30.0)
    clock.advance(2.0)
    assert jumps == [pytest.approx(28.0)]
    watch.stop()


def _agentService(reactor: Any, *args: str) -> AgentService:
    options = agentTap.Options(environ={})
    options.parseOptions(["--relay", "ws://127.0.0.1:9", "--http", "8000", "--key-file", "/nonexistent/k", *args])
    agent = Agent(reactor, options["relay"], None, agentTap.buildAgent(options, reactor).tunnels, key="k" * 32)
    settings = agentTap.serviceSettings(options)
    return AgentService(agent, **settings)


def _refuse(reactor: MemoryReactorClock) -> None:
    host, port, factory, timeout, bind = reactor.tcpClients.pop(0)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))


def test_agent_service_backs_off_and_gives_up() -> None:
    """
    With C{--reconnect-attempts 3} an agent that cannot reach the relay
    tries three times, waiting the configured (doubling) delays, moves
    connecting -> reconnecting each time, then gives up (closed, fatal).
    """
    reactor = MemoryReactorClock()
    service = _agentService(
        reactor,
        "--reconnect-initial",
        "1",
        "--reconnect-max",
        "10",
        "--reconnect-jitter",
        "0",
        "--reconnect-attempts",
        "3",
    )
    agent = service.agent
    agent.states.log = Logger(observer=lambda e: None)
    agent.ready.addErrback(lambda f: None)
    seen: list[str] = []
    agent.states.observers.append(lambda old, new, event, info: seen.append(new.value))
    service.startService()
    assert agent.state is LinkState.CONNECTING
    _refuse(reactor)
    assert agent.state is LinkState.RECONNECTING
    reactor.advance(0.99)
    assert reactor.tcpClients == []
    reactor.advance(0.01)
    assert len(reactor.tcpClients) == 1
    _refuse(reactor)
    reactor.advance(1.99)
    assert reactor.tcpClients == []
    reactor.advance(0.01)
    _refuse(reactor)
    assert agent.state is LinkState.CLOSED
    assert agent.failure == "gave up after 3 failed attempts to reach the relay"
    reactor.advance(100)
    assert reactor.tcpClients == []
    assert seen == ["connecting", "reconnecting"] * 2 + ["connecting", "reconnecting", "closed"]
    service.stopService()


def test_agent_service_retries_forever_by_default() -> None:
    reactor = MemoryReactorClock()
    service = _agentService(reactor, "--reconnect-max", "2", "--reconnect-jitter", "0")
    service.agent.states.log = Logger(observer=lambda e: None)
    service.startService()
    for _ in range(20):
        _refuse(reactor)
        reactor.advance(2.0)
    assert service.agent.failure is None
    assert service.agent.state is LinkState.CONNECTING
    service.stopService()
    assert service.agent.state is LinkState.CLOSED


def test_clock_jump_probes_the_link() -> None:
    """
    When the watch sees a jump, the agent probes its link: a PING at once,
    and a link that stays silent is closed within the probe time.
    """
    clock = Clock()
    service = _agentService(clock, "--keepalive", "10")
    agent = service.agent
    agent.states.log = Logger(observer=lambda e: None)
    carrier = QueueCarrier()
    link = Link(carrier, role="agent", clock=clock, keepalive=10, keepaliveTimeout=15)
    link.start()
    AgentSession(agent, link, carrier)
    t = FakeTime()
    service.clockWatch = ClockJumpWatch(
        clock, service._clockJumped, interval=2.0, threshold=5.0, wall=lambda: t.wall, monotonic=lambda: t.mono
    )
    service.clockWatch.log = Logger(observer=lambda e: None)
    service.clockWatch.start()
    t.advance(3600, asleep=True)
    t.advance(2.0)
    before = len(carrier.sent)
    clock.advance(2.0)
    assert [f.type for f in carrier.sent[before:]] == [FrameType.PING]
    clock.advance(5.0)
    assert carrier.closed == ["probe timeout"]
    service.clockWatch.stop()
    link.connectionLost()


def test_reconnect_options_are_checked() -> None:
    from twisted.python import usage

    for args, message in [
        (["--reconnect-initial", "0"], "must be more than 0"),
        (["--reconnect-attempts", "-1"], "must not be negative"),
        (["--reconnect-attempts", "x"], "not a whole number"),
        (["--reconnect-jitter", "2"], "fraction"),
        (["--reconnect-initial", "5", "--reconnect-max", "1"], "must not exceed"),
    ]:
        options = agentTap.Options(environ={})
        with pytest.raises(usage.UsageError, match=message):
            options.parseOptions(["--http", "8000", *args])


def test_reconnect_options_from_environment_and_ini(tmp_path: Any) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text("[agent]\nreconnect-max = 7\n")
    options = agentTap.Options(environ={"TXTUNNEL_RECONNECT_ATTEMPTS": "4"})
    options.parseOptions(["--http", "8000", "--config", str(ini)])
    backoff = agentTap.serviceSettings(options)["backoff"]
    assert (backoff.maximum, backoff.attempts, backoff.initial) == (7.0, 4, 0.5)


@pytest_twisted.ensureDeferred
async def test_real_agent_states_across_a_dropped_link(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    A real agent is CONNECTED once its tunnels are up, RECONNECTING when its
    link is cut, CONNECTED again after the reconnect, DRAINING then CLOSED
    when stopped.
    """
    agent = await startAgent(agents, relay, "--http", str(origin), "--reconnect-initial", "0.1")
    await waitFor(lambda: agent.agent.state is LinkState.CONNECTED)
    seen: list[str] = []
    agent.agent.states.observers.append(lambda old, new, event, info: seen.append(new.value))
    dropLink(agent)
    await waitFor(lambda: "connected" in seen)
    assert seen == ["reconnecting", "connecting", "negotiating", "connected"]
    await agent.stop()
    assert agent.agent.state is LinkState.CLOSED
    assert seen[4:] == ["draining", "closed"]


def test_txtunnel_command_takes_the_reconnect_options() -> None:
    """
    C{txtunnel http} has the same reconnect options as C{twistd tunnelagent}.
    """
    from txtunnel.cli import Options

    options = Options()
    options.parseOptions(
        ["http", "8000", "--reconnect-attempts", "2", "--reconnect-jitter", "0", "--drain-timeout", "3"]
    )
    settings = agentTap.serviceSettings(options.subOptions)
    assert (settings["backoff"].attempts, settings["backoff"].jitter, settings["drainTimeout"]) == (2, 0.0, 3.0)


def test_clock_jump_while_waiting_to_reconnect_dials_at_once() -> None:
    """
    Waking from sleep in the middle of a backoff wait dials again at once
    instead of sitting out the rest of the wait.
    """
    reactor = MemoryReactorClock()
    service = _agentService(reactor, "--reconnect-initial", "20", "--reconnect-max", "20", "--reconnect-jitter", "0")
    service.agent.states.log = Logger(observer=lambda e: None)
    service.startService()
    _refuse(reactor)
    assert service.agent.state is LinkState.RECONNECTING
    reactor.advance(1)
    assert reactor.tcpClients == []
    service._clockJumped(600)
    assert len(reactor.tcpClients) == 1
    assert service.agent.state is LinkState.CONNECTING
    service.stopService()
