# -*- test-case-name: tests.test_end_to_end -*-
"""
One agent's session on the relay: hello, authentication, binds, streams.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.errors import BindError
from txtunnel.frames import PROTOCOL_VERSION
from txtunnel.gates import validateBind
from txtunnel.interfaces import IBinding, IRelayTunnel
from txtunnel.link import Link, Stream

if TYPE_CHECKING:
    from txtunnel.relay.service import Relay

__all__ = ["FEATURES", "RelaySession", "RelayTunnel"]

#: What this relay's link implementation offers; the hello intersects it
#: with the agent's list.
FEATURES = ("window", "fin", "ping")

#: Tunnels one link may hold.
MAX_TUNNELS_PER_LINK = 50


@implementer(IRelayTunnel)
class RelayTunnel:
    """
    A bound (or binding) tunnel of one session.
    """

    def __init__(self, session: RelaySession, id: int, type: str, request: dict[str, Any]) -> None:
        self.session = session
        self.id = id
        self.type = type
        self.request = request
        self.owner = session.owner
        self.binding: IBinding | None = None

    def openStream(self, header: dict[str, Any], protocol: Any) -> Stream:
        return self.session.link.openStream(dict(header, tunnel=self.id), protocol)

    def __repr__(self) -> str:
        return f"<RelayTunnel {self.type}#{self.id} of {self.session.peer}>"


class RelaySession:
    """
    Drives one link from the relay's side.

    States: C{hello} (waiting for the agent's hello), C{ready} (binds
    accepted), C{closed}.
    """

    log = Logger()

    def __init__(self, relay: Relay, link: Link, carrier: Any, peer: str) -> None:
        self.relay = relay
        self.link = link
        self.carrier = carrier
        self.peer = link.peer
        self.peerHost = peer
        self.state = "hello"
        self.owner = "anonymous:" + link.peer
        #: The verified email of the agent's user, when it presented a login token.
        self.email: str | None = None
        self.tunnels: dict[int, RelayTunnel] = {}
        link.controlReceived = self.controlReceived
        link.streamOpened = lambda stream: stream.reset("refused", "the relay opens streams, agents do not")
        relay.sessions.add(self)

    def _refuse(self, code: str, reason: str) -> None:
        self.log.warn("refusing agent {peer}: {reason}", peer=self.peer, reason=reason, code=code)
        self.link.sendControl({"op": "error", "code": code, "reason": reason})
        self.carrier.closeLink(f"refused: {reason}")

    def controlReceived(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if self.state == "hello":
            if op != "hello":
                self._refuse("protocol", f"expected hello, got {op!r}")
                return
            self._hello(message)
        elif self.state == "ready":
            if op == "bind":
                self._bind(message)
            elif op == "unbind":
                self._unbind(message)
            elif op == "update":
                self._update(message)
            elif op == "bye":
                # A clean goodbye: nothing is kept for this agent.
                self._unbindAll()
            else:
                self.log.warn("agent {peer} sent unknown control op {op!r}; ignored", peer=self.peer, op=op)

    def _hello(self, message: dict[str, Any]) -> None:
        versions = message.get("versions")
        if not isinstance(versions, list) or PROTOCOL_VERSION not in versions:
            self._refuse(
                "version", f"this relay speaks link protocol version {PROTOCOL_VERSION}; agent offered {versions!r}"
            )
            return
        token = message.get("token")
        identity = message.get("identity")
        gate = self.relay.loginGate
        if isinstance(identity, str) and gate is not None:
            # A token from 'txtunnel login': who made this agent's tunnels.
            claims = gate.tokens.verify(identity, gate.now())
            if claims is None:
                self._refuse("auth", "the login token is invalid or expired; run 'txtunnel login' again")
                return
            self.email = str(claims["sub"])
        if self.email is None and not self.relay.checkToken(token if isinstance(token, str) else None):
            self._refuse("auth", "invalid or missing token" if token else "this relay requires a token (--token)")
            return
        key = message.get("key")
        if isinstance(key, str) and 16 <= len(key) <= 256:
            # The agent's random key, hashed: whoever presents it again gets
            # its names and ports back within the grace period.
            self.owner = "key:" + hashlib.sha256(key.encode()).hexdigest()[:32]
        elif isinstance(token, str) and token:
            self.owner = "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]
        offered = message.get("features")
        if not isinstance(offered, list):
            offered = []
        features = [f for f in FEATURES if f in offered]
        window = message.get("window")
        if isinstance(window, int) and 1024 <= window <= (1 << 30):
            self.link.peerWindow = window
        self.state = "ready"
        self.link.sendControl(
            {
                "op": "welcome",
                "version": PROTOCOL_VERSION,
                "features": features,
                "window": self.link.window,
                "domain": self.relay.domain,
            }
        )
        self.log.info("agent {peer} connected ({agent})", peer=self.peer, agent=str(message.get("agent", "?"))[:80])

    def _bind(self, message: dict[str, Any]) -> None:
        bid = message.get("id")
        kind = message.get("type")
        if not isinstance(bid, int) or bid in self.tunnels:
            self._refuse("protocol", f"bind with a missing or repeated id {bid!r}")
            return
        forwarder = self.relay.forwarders.get(kind) if isinstance(kind, str) else None
        if forwarder is None or not isinstance(kind, str):
            known = ", ".join(sorted(self.relay.forwarders))
            self.link.sendControl(
                {"op": "refused", "id": bid, "reason": f"this relay has no {kind!r} tunnels (it has: {known})"}
            )
            return
        if len(self.tunnels) >= MAX_TUNNELS_PER_LINK:
            self.link.sendControl(
                {"op": "refused", "id": bid, "reason": f"at most {MAX_TUNNELS_PER_LINK} tunnels per agent"}
            )
            return
        # Who made the tunnel is the relay's to say (from the agent's login), never the agent's.
        message.pop("creator", None)
        if self.email is not None:
            message["creator"] = self.email
        tunnel = RelayTunnel(self, bid, kind, message)
        self.tunnels[bid] = tunnel
        d = maybeDeferred(validateBind, self.relay.gates, message)
        d.addCallback(lambda _: forwarder.bind(self.relay, tunnel))

        def bound(binding: IBinding) -> None:
            if self.state == "closed" or self.tunnels.get(bid) is not tunnel:
                binding.close()
                return
            tunnel.binding = binding
            message: dict[str, Any] = {"op": "bound", "id": bid, "address": binding.address}
            if isinstance(tunnel.request.get("allow"), list):
                # The agent checks this: a relay that ignored the list would serve the tunnel open.
                message["allow"] = len(tunnel.request["allow"])
            reclaim = getattr(binding, "reclaim", None)
            if isinstance(reclaim, dict) and reclaim:
                message["reclaim"] = reclaim
            self.link.sendControl(message)
            self.log.info("tunnel {address} bound for agent {peer}", address=binding.address, peer=self.peer, type=kind)

        def failed(f: Failure) -> None:
            if self.tunnels.get(bid) is tunnel:
                del self.tunnels[bid]
            if f.check(BindError):
                reason = str(f.value)
            else:
                self.log.failure("forwarder {kind!r} failed to bind", f, kind=kind)
                reason = "internal error while binding"
            self.link.sendControl({"op": "refused", "id": bid, "reason": reason})

        d.addCallbacks(bound, failed)

    def _update(self, message: dict[str, Any]) -> None:
        """
        New per-tunnel settings for a bound tunnel (its allow-list), checked
        by the gates like a bind's; the address stays the same.  Only the
        list may change, and a shared tunnel stays shared.
        """
        bid = message.get("id")
        tunnel = self.tunnels.get(bid)  # type: ignore[arg-type]
        reply: dict[str, Any] = {"op": "updated", "id": bid}
        if tunnel is None or tunnel.binding is None:
            reply.update(op="update-refused", reason="no such bound tunnel")
        elif not isinstance(tunnel.request.get("allow"), list) or not isinstance(message.get("allow"), list):
            reply.update(op="update-refused", reason="only a shared tunnel's allow-list can change while it is up")
        elif not message["allow"]:
            reply.update(op="update-refused", reason="a shared tunnel keeps at least one allow-list entry")
        else:
            candidate = {"allow": message["allow"]}
            try:
                validateBind(self.relay.gates, candidate)
            except BindError as e:
                reply.update(op="update-refused", reason=str(e))
            else:
                tunnel.request["allow"] = candidate["allow"]
                reply["allow"] = len(candidate["allow"])
                self.log.info(
                    "tunnel {address} of agent {peer} now shared with {count} entries",
                    address=tunnel.binding.address,
                    peer=self.peer,
                    count=len(candidate["allow"]),
                )
        self.link.sendControl(reply)

    def _unbind(self, message: dict[str, Any]) -> None:
        tunnel = self.tunnels.pop(message.get("id"), None)  # type: ignore[arg-type]
        if tunnel is not None and tunnel.binding is not None:
            tunnel.binding.close()

    def _unbindAll(self) -> None:
        for tunnel in self.tunnels.values():
            if tunnel.binding is not None:
                tunnel.binding.close()
        self.tunnels.clear()

    def linkLost(self, reason: str) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        self.relay.sessions.discard(self)
        until = self.relay.wallClock() + self.relay.grace
        for tunnel in self.tunnels.values():
            binding = tunnel.binding
            if binding is None:
                continue
            binding.close()
            claim = getattr(binding, "claim", None)
            if claim is not None and self.relay.grace > 0 and self.relay.store is not None:
                # Kept for this agent: it gets the same address if it is back in time.
                self.relay.store.hold(claim[0], claim[1], self.owner, until)
        self.tunnels.clear()
        self.log.info("agent {peer} disconnected: {reason}", peer=self.peer, reason=reason)
