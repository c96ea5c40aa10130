# -*- test-case-name: tests.test_drain -*-
"""
Graceful shutdown: wait for the streams in flight to finish, up to a
timeout, before links are closed.

Both the relay and the agent drain the same way: stop taking new work,
ask idle things to let go, then poll a count of open streams.  Polling a
count covers every kind of stream (HTTP, TCP, UDP, upgraded connections)
without each forwarder having to report its end to the drain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

__all__ = ["DEFAULT_DRAIN_TIMEOUT", "drain"]

#: Seconds streams in flight get to finish on shutdown.
DEFAULT_DRAIN_TIMEOUT = 30.0

#: How often the count is looked at.
POLL = 0.05

log = Logger()


async def _wait(clock: IReactorTime, count: Callable[[], int], timeout: float) -> int:
    deadline = clock.seconds() + timeout
    while count() and clock.seconds() < deadline:
        await deferLater(clock, min(POLL, max(0.0, deadline - clock.seconds())), lambda: None)
    return count()


def drain(
    clock: IReactorTime,
    count: Callable[[], int],
    timeout: float,
    start: Callable[[], Any] = lambda: None,
    what: str = "streams",
) -> Deferred[int]:
    """
    Call C{start} (which asks things to wind down), then wait until
    C{count()} is 0 or C{timeout} seconds have passed.

    @return: a L{Deferred} firing with how many were still open.
    """
    start()
    if count() and timeout > 0:
        log.info(
            "draining: {count} {what} in flight, waiting up to {timeout:g}s", count=count(), what=what, timeout=timeout
        )
    return Deferred.fromCoroutine(_wait(clock, count, timeout))
