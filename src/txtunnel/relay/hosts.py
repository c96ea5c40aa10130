# -*- test-case-name: tests.test_relay_units -*-
"""
The relay's table of HTTP virtual hosts: C{NAME.<domain>} to a tunnel.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["HostTable"]

#: Dot-separated labels of letters, digits, '-' and '_', none empty.
_HOSTNAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


class HostTable:
    """
    Maps tunnel names to the objects that serve them on this relay node.
    Who I{holds} a name cluster-wide is the store's business; this is the
    local routing table only.
    """

    def __init__(self, domain: str) -> None:
        self.domain = domain.lower().rstrip(".")
        self._names: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._names)

    def add(self, name: str, target: Any) -> None:
        if name in self._names:
            raise KeyError(name)
        self._names[name] = target

    def remove(self, name: str, target: Any) -> None:
        if self._names.get(name) is target:
            del self._names[name]

    def get(self, name: str) -> Any:
        return self._names.get(name)

    def split(self, hostHeader: bytes | None) -> tuple[str, str | None]:
        """
        Classify a C{Host} header value.

        @return: C{("tunnel", name)} for C{NAME.<domain>}, C{("apex", None)}
            for the domain itself or an address that is not under it, or
            C{("bad", None)} for a value that is not a host name at all.
        """
        if not hostHeader:
            return ("bad", None)
        try:
            text = hostHeader.decode("ascii").strip().lower()
        except UnicodeDecodeError:
            return ("bad", None)
        if text.startswith("["):
            return ("apex", None)
        host = text
        if text.count(":") == 1:
            host, port = text.split(":")
            if port and not (port.isdigit() and len(port) <= 5):
                return ("bad", None)
        host = host.rstrip(".")
        if ":" not in host and not _HOSTNAME.fullmatch(host):
            return ("bad", None)
        suffix = "." + self.domain
        if host.endswith(suffix):
            return ("tunnel", host[: -len(suffix)])
        return ("apex", None)
