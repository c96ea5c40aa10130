# -*- test-case-name: tests.test_relay_units -*-
"""
The relay's range of public ports for TCP (and later UDP) tunnels.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["PortPool", "parseRange"]


def parseRange(text: str) -> tuple[int, int]:
    """
    Parse C{"A-B"} (or a single C{"A"}) into an inclusive port range.

    @raise ValueError: naming what was expected.
    """
    parts = text.strip().split("-")
    try:
        if len(parts) == 1:
            low = high = int(parts[0])
        elif len(parts) == 2:
            low, high = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"{text!r} is not a port range like 20000-20099") from None
    if not (1 <= low <= high <= 65535):
        raise ValueError(f"{text!r} is not a port range within 1-65535 with the low port first")
    return low, high


class PortPool:
    """
    Which ports of the range this relay has handed out.
    """

    def __init__(self, low: int, high: int) -> None:
        self.low = low
        self.high = high
        self._used: set[int] = set()
        self._next = low
        #: Ports reserved for a token: only handed out when asked for.
        self.reserved: set[int] = set()

    def __contains__(self, port: int) -> bool:
        return self.low <= port <= self.high

    def inUse(self, port: int) -> bool:
        return port in self._used

    def candidates(self) -> Iterator[int]:
        """
        Free ports, starting after the last one handed out so a port that was
        just freed is not reused at once.
        """
        size = self.high - self.low + 1
        for i in range(size):
            port = self.low + (self._next - self.low + i) % size
            if port not in self._used and port not in self.reserved:
                yield port

    def take(self, port: int) -> None:
        self._used.add(port)
        self._next = port + 1 if port < self.high else self.low

    def free(self, port: int) -> None:
        self._used.discard(port)
