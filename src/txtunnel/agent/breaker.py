# -*- test-case-name: tests.test_breaker -*-
"""
A circuit breaker per tunnel on the agent, and an optional active health
check of the local service that feeds it.

After C{threshold} failures in a row to reach the local service (refused,
unreachable, or no answer within the response timeout) the breaker opens:
for C{cooldown} seconds visitors get a 503 at once, instead of each waiting
for a connection attempt that is likely to fail.  Then one request is let
through as a probe (half-open); its success closes the breaker, its failure
opens it for another cool-down.  A health check, when configured, probes
the service on its own schedule and opens or closes the breaker too, so a
service that comes back is used again before any visitor has to try it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = [
    "DEFAULT_BREAKER_COOLDOWN",
    "DEFAULT_BREAKER_FAILURES",
    "BreakerState",
    "CircuitBreaker",
    "HealthCheck",
    "parseHealthCheck",
]

#: Failures in a row that open the breaker (0 turns it off).
DEFAULT_BREAKER_FAILURES = 5

#: Seconds an open breaker answers 503 before letting a probe through.
DEFAULT_BREAKER_COOLDOWN = 10.0


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


Observer = Callable[[BreakerState, BreakerState], object]


class CircuitBreaker:
    """
    @ivar state: the L{BreakerState}.
    @ivar failures: failures in a row while closed.
    @ivar observers: callables C{(old, new)} run on each change.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        threshold: int = DEFAULT_BREAKER_FAILURES,
        cooldown: float = DEFAULT_BREAKER_COOLDOWN,
        name: str = "?",
    ) -> None:
        self.clock = clock
        self.threshold = threshold
        self.cooldown = cooldown
        self.name = name
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.openedAt = 0.0
        self._probeAt: float | None = None
        self.observers: list[Observer] = []

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def retryAfter(self) -> float:
        """
        Seconds until the breaker lets a probe through.
        """
        return max(0.0, self.openedAt + self.cooldown - self.clock.seconds())

    def allow(self) -> bool:
        """
        Whether a request may go to the local service now.  In the open
        state after the cool-down, the first caller becomes the probe; while
        a probe is out, others are refused (unless it has taken a whole
        cool-down, when another probe is let through).
        """
        if not self.enabled or self.state is BreakerState.CLOSED:
            return True
        now = self.clock.seconds()
        if self.state is BreakerState.OPEN:
            if now < self.openedAt + self.cooldown:
                return False
            self._move(BreakerState.HALF_OPEN)
        if self._probeAt is None or now - self._probeAt >= self.cooldown:
            self._probeAt = now
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self._probeAt = None
        if self.state is not BreakerState.CLOSED:
            self._move(BreakerState.CLOSED)

    def failure(self, reason: str = "") -> None:
        if not self.enabled:
            return
        self._probeAt = None
        if self.state is BreakerState.CLOSED:
            self.failures += 1
            if self.failures < self.threshold:
                return
        self.openedAt = self.clock.seconds()
        if self.state is not BreakerState.OPEN:
            self._move(BreakerState.OPEN, reason)

    def _move(self, new: BreakerState, reason: str = "") -> None:
        old, self.state = self.state, new
        log = self.log.warn if new is BreakerState.OPEN else self.log.info
        log(
            "tunnel {tunnel!r}: circuit breaker {breaker_from} -> {breaker_state}{why}",
            tunnel=self.name,
            breaker_from=old.value,
            breaker_state=new.value,
            why=f" ({reason})" if reason else "",
            failures=self.failures,
        )
        for observer in list(self.observers):
            try:
                observer(old, new)
            except Exception:
                self.log.failure("circuit breaker observer failed")


def parseHealthCheck(text: str) -> tuple[str, str] | None:
    """
    C{"tcp"} (connect to the target) or C{"http:/PATH"} (a GET that must
    answer below 500); empty for none.
    """
    text = str(text).strip()
    if not text:
        return None
    if text == "tcp":
        return ("tcp", "")
    if text.startswith("http:/"):
        path = text[len("http:") :]
        if path.startswith("//"):
            raise ValueError(f"{text!r}: give a path on the local service, like http:/health, not a URL")
        if any(c in path for c in " \r\n\0"):
            raise ValueError(f"{text!r}: the path must not hold spaces or line breaks")
        return ("http", path)
    raise ValueError(f"{text!r} is not a health check; expected 'tcp' or 'http:/PATH'")


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


class HealthCheck:
    """
    Probes a local service every C{interval} seconds and tells the breaker.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        target: tuple[str, int],
        check: tuple[str, str],
        breaker: CircuitBreaker,
        interval: float = 10.0,
        timeout: float = 5.0,
    ) -> None:
        self.reactor = reactor
        self.target = target
        self.kind, self.path = check
        self.breaker = breaker
        self.interval = interval
        self.timeout = timeout
        self.healthy: bool | None = None
        self._loop = LoopingCall(self.probe)
        self._loop.clock = reactor
        self._pending: Deferred[Any] | None = None

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._pending is not None:
            self._pending.cancel()

    def probe(self) -> Deferred[bool] | None:
        if self._pending is not None:
            return None
        d = self._http() if self.kind == "http" else self._tcp()
        d.addTimeout(self.timeout, self.reactor)
        self._pending = d
        result: Deferred[bool] = Deferred()

        def done(ok: Any) -> None:
            self._pending = None
            self._report(ok is True, "" if ok is True else str(ok))
            result.callback(ok is True)

        def failed(f: Any) -> None:
            self._pending = None
            self._report(False, f.getErrorMessage() or f.type.__name__)
            result.callback(False)

        d.addCallbacks(done, failed)
        return result

    def _report(self, ok: bool, why: str) -> None:
        if ok != self.healthy:
            host, port = self.target
            if ok:
                self.log.info("local service {host}:{port} is healthy", host=host, port=port, health="up")
            else:
                self.log.warn(
                    "local service {host}:{port} failed its health check: {why}",
                    host=host,
                    port=port,
                    why=why,
                    health="down",
                )
        self.healthy = ok
        if ok:
            self.breaker.success()
        else:
            self.breaker.failure(f"health check: {why}")

    def _tcp(self) -> Deferred[Any]:
        from twisted.internet.endpoints import HostnameEndpoint
        from twisted.internet.protocol import Factory

        host, port = self.target
        d = HostnameEndpoint(self.reactor, host, port, timeout=self.timeout).connect(Factory.forProtocol(Protocol))

        def connected(protocol: Any) -> bool:
            protocol.transport.loseConnection()
            return True

        return d.addCallback(connected)

    def _http(self) -> Deferred[Any]:
        from twisted.web.client import Agent

        host, port = self.target
        hostText = f"[{host}]" if ":" in host else host
        agent = Agent(self.reactor, connectTimeout=self.timeout)
        d = agent.request(b"GET", f"http://{hostText}:{port}{self.path}".encode())

        def answered(response: Any) -> Any:
            # The body is not wanted: drop it as it comes (never held whole).
            response.deliverBody(_Discard())
            if response.code < 500:
                return True
            return f"HTTP {response.code}"

        return d.addCallback(answered)
