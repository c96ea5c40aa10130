# -*- test-case-name: tests.test_agent_states -*-
"""
The agent's connection states as an explicit machine, its reconnect
backoff, and the watch that notices the machine waking from sleep.

L{LinkStates} is a transition table rather than an Automat machine: its
inputs come from three places (the L{ClientService}'s endpoint, the
WebSocket carrier and the session's hello/welcome), the table is small
enough to read at a glance, and observers (metrics, a status console) need
only the C{(old, new, event)} triple, which a table gives directly.  Every
transition is logged with structured fields (C{agent_state},
C{agent_state_from}, C{agent_event}).
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["Backoff", "ClockJumpWatch", "LinkState", "LinkStates", "TRANSITIONS"]


class LinkState(enum.Enum):
    """
    Where the agent's link to the relay is.
    """

    #: Not started yet.
    DISCONNECTED = "disconnected"
    #: Opening the TCP (TLS) connection and the WebSocket handshake.
    CONNECTING = "connecting"
    #: The link is open; hello sent, waiting for the relay's welcome.
    NEGOTIATING = "negotiating"
    #: Welcomed: tunnels are bound (or being bound) and traffic flows.
    CONNECTED = "connected"
    #: The link dropped or an attempt failed; waiting for the next attempt.
    RECONNECTING = "reconnecting"
    #: Shutting down: goodbye said, no new visitors, streams in flight
    #: finishing (up to the drain timeout) on a link that is still up.
    DRAINING = "draining"
    #: Stopped for good (shut down, or gave up).
    CLOSED = "closed"


S = LinkState

#: C{(state, event) -> next state}.  An event not listed for a state is
#: ignored (and logged at debug level): late callbacks from a link that is
#: already gone must not move the machine.
TRANSITIONS: dict[tuple[LinkState, str], LinkState] = {
    (S.DISCONNECTED, "attempt"): S.CONNECTING,
    (S.RECONNECTING, "attempt"): S.CONNECTING,
    (S.CONNECTING, "opened"): S.NEGOTIATING,
    (S.CONNECTING, "failed"): S.RECONNECTING,
    (S.NEGOTIATING, "welcomed"): S.CONNECTED,
    (S.NEGOTIATING, "lost"): S.RECONNECTING,
    (S.NEGOTIATING, "failed"): S.RECONNECTING,
    (S.CONNECTED, "lost"): S.RECONNECTING,
    (S.NEGOTIATING, "drain"): S.DRAINING,
    (S.CONNECTED, "drain"): S.DRAINING,
    **{(state, "close"): S.CLOSED for state in LinkState if state is not S.CLOSED},
}

Observer = Callable[[LinkState, LinkState, str, dict[str, Any]], object]


class LinkStates:
    """
    The agent link's state, moved only by L{event}.

    @ivar state: the current L{LinkState}.
    @ivar observers: callables C{(old, new, event, info)} run after each
        transition; an observer that raises is logged and does not stop the
        others.
    @ivar failures: attempts since the link was last C{CONNECTED} (what the
        backoff and the attempt limit count).
    """

    log = Logger()

    def __init__(self, relay: str = "?") -> None:
        self.relay = relay
        self.state = LinkState.DISCONNECTED
        self.observers: list[Observer] = []
        self.failures = 0
        self.since: float = time.time()

    def event(self, name: str, **info: Any) -> LinkState:
        """
        Feed one event; return the (possibly new) state.
        """
        old = self.state
        new = TRANSITIONS.get((old, name))
        if new is None:
            self.log.debug(
                "agent link: {agent_event} ignored in state {agent_state}",
                agent_event=name,
                agent_state=old.value,
            )
            return old
        if name == "attempt":
            self.failures += 1
        elif name == "welcomed":
            self.failures = 0
        self.state = new
        self.since = time.time()
        self.log.info(
            "agent link {agent_state_from} -> {agent_state} ({agent_event}{detail})",
            agent_state_from=old.value,
            agent_state=new.value,
            agent_event=name,
            detail="".join(f", {k}={v}" for k, v in info.items()),
            relay=self.relay,
            attempt=self.failures,
            **info,
        )
        for observer in list(self.observers):
            try:
                observer(old, new, name, info)
            except Exception:
                self.log.failure("agent link state observer failed")
        return new


class Backoff:
    """
    Reconnect delays: C{initial} doubling up to C{maximum}, each spread by
    C{jitter} (a fraction: 0.2 means +-20%) so that many agents dropped
    together by one relay restart do not all come back in the same instant.

    @ivar attempts: how many attempts in a row may fail before the agent
        gives up; 0 for never.
    """

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 30.0,
        jitter: float = 0.2,
        attempts: int = 0,
        factor: float = 2.0,
        random: Callable[[], float] = random.random,
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("reconnect delays need 0 < initial <= maximum")
        if not 0 <= jitter <= 1:
            raise ValueError("jitter is a fraction between 0 and 1")
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.attempts = attempts
        self.factor = factor
        self._random = random

    def delay(self, failures: int) -> float:
        """
        Seconds to wait after C{failures} attempts in a row have failed.
        """
        base = min(self.maximum, self.initial * self.factor ** max(0, min(failures - 1, 64)))
        spread = 1 + self.jitter * (2 * self._random() - 1)
        return max(0.0, min(self.maximum, base * spread))

    def exhausted(self, failures: int) -> bool:
        return self.attempts > 0 and failures >= self.attempts


class ClockJumpWatch:
    """
    Notices the machine waking from sleep (or a frozen process, or a VM
    resumed): every C{interval} seconds it compares how far the wall clock
    and the monotonic clock moved.  During suspend the monotonic clock
    stops and the wall clock does not, so a difference over C{threshold}
    means time passed that the process did not see; a monotonic step far
    over the interval means the process was not scheduled.  Either way the
    link is probably dead and C{onJump(seconds)} is called to check it now.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        onJump: Callable[[float], object],
        interval: float = 2.0,
        threshold: float = 5.0,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.onJump = onJump
        self.interval = interval
        self.threshold = threshold
        self._wall = wall
        self._monotonic = monotonic
        self._last = (wall(), monotonic())
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    def start(self) -> None:
        self._last = (self._wall(), self._monotonic())
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def check(self) -> float:
        """
        Compare the clocks now; return the jump seen (0 for none).
        """
        wall, mono = self._wall(), self._monotonic()
        lastWall, lastMono = self._last
        self._last = (wall, mono)
        dWall, dMono = wall - lastWall, mono - lastMono
        jump = max(abs(dWall - dMono), dMono - self.interval)
        if jump < self.threshold:
            return 0.0
        self.log.warn("clock jumped {jump:.1f}s (system sleep?); checking the link now", jump=jump)
        self.onJump(jump)
        return jump
