# -*- test-case-name: tests.test_pool -*-
"""
Endpoint pooling: several agents serving one HTTP tunnel name.

Agents that bind the same name with the same pool key (C{--pool KEY}) join
one L{Pool}, which the relay's host table routes to like a single tunnel.
Each new visitor stream goes to the member with the fewest open streams on
its link (round robin among equals); a member whose link is gone is skipped
at once and removed when its session ends.

The key is a shared secret: the relay keeps only its hash, which becomes
the owner of the name's claim, so an agent without the key cannot join the
pool (or take the name while it is held).

Visitor gates look at the pool as at one tunnel: L{Pool.request} is its
oldest member's bind request, so a pool's allow-list, creator, client CA
and policy are checked like a single tunnel's.  For that to mean one thing
whichever member serves a visitor, an agent joins only with the same access
settings as the pool (L{accessSettings}); a live change to the allow-list
goes to every member (L{Pool.setAllow}).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from twisted.internet.error import ConnectionLost
from zope.interface import implementer

from txtunnel.errors import BindError
from txtunnel.interfaces import IBinding, IRelay, IRelayTunnel
from txtunnel.link import Stream

__all__ = ["Pool", "PooledBinding", "accessSettings", "poolOwner"]

#: Shortest pool key accepted: it is a secret, so it must not be guessable.
MIN_POOL_KEY = 16
MAX_POOL_KEY = 256


#: Bind request fields that say where a member is, not who may visit it:
#: the only ones members of one pool may differ in.
ROUTING_KEYS = frozenset({"op", "id", "type", "name", "pool"})


def accessSettings(request: dict[str, Any]) -> dict[str, Any]:
    """
    What a bind request says about who may visit the tunnel: every field
    but L{ROUTING_KEYS} (so a setting the relay learns later is compared
    too: fail closed).  Allow-lists compare as sets; basic-auth credentials
    by user name, since each agent salts its own hash of a password.
    """
    settings = {k: v for k, v in request.items() if k not in ROUTING_KEYS}
    if isinstance(settings.get("allow"), list):
        settings["allow"] = sorted(settings["allow"])
    policy = settings.get("policy")
    if isinstance(policy, dict) and isinstance(policy.get("basic-auth"), list):
        users = sorted(c.split("$")[2] if isinstance(c, str) and c.count("$") >= 4 else c for c in policy["basic-auth"])
        settings["policy"] = {**policy, "basic-auth": users}
    return settings


def _describe(key: str) -> str:
    return {
        "allow": "allow-list (--allow)",
        "creator": "creator (the agent's 'txtunnel login')",
        "policy": "visitor policy",
        "client-ca": "client CA (--client-ca)",
    }.get(key, repr(key))


def poolOwner(key: Any) -> str:
    """
    The claim owner for a pool key: its hash, never the key.

    @raise BindError: if the key is not a string of a sensible length.
    """
    if not isinstance(key, str) or not MIN_POOL_KEY <= len(key) <= MAX_POOL_KEY:
        raise BindError(f"a pool key must be a string of {MIN_POOL_KEY} to {MAX_POOL_KEY} characters")
    return "pool:" + hashlib.sha256(b"txtunnel-pool:" + key.encode()).hexdigest()[:32]


class Pool:
    """
    The tunnels serving one name, as one routing target.

    @ivar members: the member tunnels, in the order they joined.
    """

    def __init__(self, name: str, owner: str) -> None:
        self.name = name
        self.owner = owner
        self.members: list[IRelayTunnel] = []
        self._last: dict[str, Any] = {}
        #: When each member was last picked, to go round among equals.
        self._picked: dict[int, int] = {}
        self._turn = 0

    def admits(self, owner: str) -> bool:
        return hmac.compare_digest(self.owner.encode(), owner.encode())

    @property
    def request(self) -> dict[str, Any]:
        """
        The bind request visitor gates check for the pool: its oldest
        member's, which every member agrees with (L{checkJoin}).  With no
        member left (the pool is leaving the host table), the last one's.
        """
        if self.members:
            self._last = self.members[0].request
        return self._last

    def checkJoin(self, tunnel: IRelayTunnel) -> None:
        """
        Refuse a member whose access settings differ from the pool's: a
        visitor must meet the same gates whichever member serves them.

        @raise BindError: naming the first setting that differs.
        """
        if not self.members:
            return
        mine, theirs = accessSettings(tunnel.request), accessSettings(self.request)
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                raise BindError(
                    f"this agent's {_describe(key)} differs from that of the pool already serving {self.name!r}; "
                    "every agent of a pool must be shared with the same people and have the same visitor settings"
                )

    def setAllow(self, entries: list[str], origin: IRelayTunnel | None = None) -> None:
        """
        Give every member the allow-list C{entries}, and tell each member's
        agent (but C{origin}'s, which asked for it), so the members still
        agree after their reconnects.
        """
        for member in self.members:
            member.request["allow"] = list(entries)
            if member is not origin:
                member.session.link.sendControl(  # type: ignore[attr-defined]
                    {"op": "allow", "id": member.id, "allow": list(entries)}  # type: ignore[attr-defined]
                )

    def add(self, tunnel: IRelayTunnel) -> None:
        self.checkJoin(tunnel)
        self.members.append(tunnel)

    def remove(self, tunnel: IRelayTunnel) -> None:
        if tunnel in self.members:
            self.members.remove(tunnel)
        self._picked.pop(id(tunnel), None)

    def _live(self) -> list[Any]:
        return [m for m in self.members if not m.session.link.closed]  # type: ignore[attr-defined]

    def pick(self) -> Any:
        """
        The member for the next stream: fewest open streams; among equals,
        the one picked least recently.

        @raise ConnectionLost: when no member is connected.
        """
        live = self._live()
        if not live:
            raise ConnectionLost(f"no agent of the pool for {self.name!r} is connected")
        chosen = min(live, key=lambda m: (len(m.session.link.streams), self._picked.get(id(m), -1)))
        self._turn += 1
        self._picked[id(chosen)] = self._turn
        return chosen

    def openStream(self, header: dict[str, Any], protocol: Any) -> Stream:
        stream: Stream = self.pick().openStream(header, protocol)
        return stream

    def __repr__(self) -> str:
        return f"<Pool {self.name} of {len(self.members)}>"


@implementer(IBinding)
class PooledBinding:
    """
    One member's place in a pool.  Its C{claim} is offered for a hold only
    when it was the last member, so a member leaving never puts the name
    of a pool still serving on hold.
    """

    def __init__(self, relay: IRelay, tunnel: IRelayTunnel, pool: Pool) -> None:
        self.relay = relay
        self.tunnel = tunnel
        self.pool = pool
        self.name = pool.name
        self.address = relay.httpURL(pool.name)
        self.reclaim = {"name": pool.name}
        #: Who the hold is for: the pool, not the one agent.
        self.claimOwner = pool.owner
        self._last = False

    @property
    def claim(self) -> tuple[str, str] | None:
        return ("http", self.name) if self._last or self.pool.members == [self.tunnel] else None

    def close(self) -> Any:
        pool = self.pool
        last = pool.members == [self.tunnel]
        pool.remove(self.tunnel)
        if pool.members:
            return None
        self._last = last
        self.relay.hosts.remove(self.name, pool)
        return self.relay.store.release("http", self.name, pool.owner)
