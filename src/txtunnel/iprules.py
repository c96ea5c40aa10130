# -*- test-case-name: tests.test_policy -*-
"""
IP allow and deny lists with CIDR for IPv4 and IPv6.

A list of networks is parsed once (C{10.0.0.0/8}, C{2001:db8::/32}, a bare
address for one host) and checked per request.  Deny wins: an address in a
deny network is refused even when an allow network also holds it; when an
allow list is given, an address outside it is refused too.  IPv4 addresses
seen as IPv4-mapped IPv6 (C{::ffff:10.1.2.3}, from a dual-stack listener)
are checked as the IPv4 address they are, so one rule covers both.

Parsed client addresses are cached (a bounded LRU): the same visitor makes
many requests, and several gates look at its address.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

import attrs

__all__ = ["IPRules", "networkList", "parseAddress", "visitorKey"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Networks one list may hold: a bound on what a bind request can make the
#: relay keep and check per request.
MAX_NETWORKS = 256


def parseNetwork(text: str) -> Network:
    """
    C{"10.0.0.0/8"}, C{"2001:db8::/32"} or C{"192.0.2.7"} to a network.

    @raise ValueError: naming the bad entry.
    """
    text = str(text).strip()
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR network like 10.0.0.0/8 or 2001:db8::/32") from None


def networkList(text: str | Iterable[str]) -> list[str]:
    """
    A comma- or space-separated list (or a list) of networks, each checked,
    in their normal written form.
    """
    items = text.replace(",", " ").split() if isinstance(text, str) else [str(t) for t in text]
    if len(items) > MAX_NETWORKS:
        raise ValueError(f"at most {MAX_NETWORKS} networks in one list")
    return [str(parseNetwork(item)) for item in items]


@functools.lru_cache(maxsize=4096)
def parseAddress(text: str) -> Address | None:
    """
    The client address C{text}, IPv4-mapped IPv6 turned into IPv4; C{None}
    if it is not an IP address (a UNIX socket peer, say).
    """
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def visitorKey(clientIP: str) -> str:
    """
    The key that counts as one visitor for rates and quotas: the IPv4
    address, or the IPv6 /64 network (one site gets a whole /64, so
    counting single IPv6 addresses would let a visitor step around a limit
    by changing address).
    """
    address = parseAddress(clientIP)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address) if address is not None else clientIP


@attrs.frozen
class IPRules:
    """
    One allow list and one deny list.
    """

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    @classmethod
    def fromLists(cls, allow: Sequence[str] = (), deny: Sequence[str] = ()) -> IPRules:
        return cls(tuple(parseNetwork(n) for n in allow), tuple(parseNetwork(n) for n in deny))

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)

    def permits(self, clientIP: str) -> bool:
        """
        Whether C{clientIP} may pass: in no deny network and, if there is an
        allow list, in one of its networks.  An address that cannot be
        parsed passes only when there are no rules at all (fail closed).
        """
        if not self:
            return True
        address = parseAddress(clientIP)
        if address is None:
            return False
        if any(address in network for network in self.deny if network.version == address.version):
            return False
        if self.allow:
            return any(address in network for network in self.allow if network.version == address.version)
        return True
