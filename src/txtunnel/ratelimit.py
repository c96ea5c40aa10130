# -*- test-case-name: tests.test_policy -*-
"""
Token-bucket rate limits with bounded memory.

A L{Rate} is C{N/s}, C{N/m} or C{N/h} with an optional burst
(C{"5/m:3"}: five a minute, and three more at once on top).  A
L{BucketTable} keeps one bucket per key (a visitor IP, a tunnel name) and
forgets the least recently used keys past its size: a forgotten key comes
back with a full bucket, which is only ever more lenient, and an attacker
who keeps sending stays recent and keeps its empty bucket.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import attrs

__all__ = ["BucketTable", "Rate", "parseRate"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}

#: Keys one table remembers by default (about 100 bytes each).
DEFAULT_TABLE_SIZE = 100_000


@attrs.frozen
class Rate:
    """
    C{count} events per C{per} seconds, with room for C{burst} more at once.
    """

    count: float
    per: float
    burst: float = 0.0

    @property
    def perSecond(self) -> float:
        return self.count / self.per

    @property
    def capacity(self) -> float:
        return max(1.0, self.count + self.burst)

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.per, "s")
        text = f"{self.count:g}/{unit}"
        return text + (f":{self.burst:g}" if self.burst else "")


def parseRate(text: str) -> Rate | None:
    """
    C{"10/s"}, C{"600/m"}, C{"5/m:3"} to a L{Rate}; C{""}, C{"0"} or C{"off"}
    to C{None} (no limit).

    @raise ValueError: naming the expected form.
    """
    text = str(text).strip().lower()
    if text in ("", "0", "off", "none"):
        return None
    expected = f"{text!r} is not a rate like 10/s, 600/m or 5/m:3 (RATE/UNIT[:BURST], unit s, m or h)"
    rate, _, burst = text.partition(":")
    count, sep, unit = rate.partition("/")
    if not sep or unit not in _UNITS:
        raise ValueError(expected)
    try:
        n = float(count)
        b = float(burst) if burst else 0.0
    except ValueError:
        raise ValueError(expected) from None
    if not (n > 0 and math.isfinite(n)) or not (b >= 0 and math.isfinite(b)):
        raise ValueError(expected)
    return Rate(n, _UNITS[unit], b)


class BucketTable:
    """
    One token bucket per key, at most C{size} keys.
    """

    def __init__(self, rate: Rate, clock: Callable[[], float], size: int = DEFAULT_TABLE_SIZE) -> None:
        self.rate = rate
        self.clock = clock
        self.size = size
        #: key -> (tokens, when they were counted)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def wait(self, key: str, cost: float = 1.0) -> float:
        """
        Seconds until C{key}'s bucket holds C{cost} tokens (C{0.0}: now);
        nothing is spent.
        """
        rate = self.rate
        entry = self._buckets.get(key)
        if entry is None:
            return 0.0 if rate.capacity >= cost else (cost - rate.capacity) / rate.perSecond
        tokens, then = entry
        tokens = min(rate.capacity, tokens + max(0.0, self.clock() - then) * rate.perSecond)
        return 0.0 if tokens >= cost else (cost - tokens) / rate.perSecond

    def take(self, key: str, cost: float = 1.0) -> float:
        """
        Spend C{cost} tokens of C{key}'s bucket.

        @return: C{0.0} if they were there (and are now spent), else the
            seconds until they will be (nothing is spent).
        """
        rate = self.rate
        now = self.clock()
        buckets = self._buckets
        tokens, then = buckets.pop(key, (rate.capacity, now))
        tokens = min(rate.capacity, tokens + max(0.0, now - then) * rate.perSecond)
        if tokens >= cost:
            buckets[key] = (tokens - cost, now)
            wait = 0.0
        else:
            buckets[key] = (tokens, now)
            wait = (cost - tokens) / rate.perSecond
        while len(buckets) > self.size:
            buckets.popitem(last=False)
        return wait
