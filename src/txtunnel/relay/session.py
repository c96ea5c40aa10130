# -*- test-case-name: tests.test_relay_agent,tests.test_reconnect -*-
"""
One agent's session on the relay: hello, authentication, binds, streams.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.access import logConnection
from txtunnel.errors import BindError, QuotaSpent, TooManyStreams, VisitorRefused
from txtunnel.frames import PROTOCOL_VERSION
from txtunnel.gates import validateBind
from txtunnel.interfaces import IBinding, IRelayTunnel
from txtunnel.iprules import visitorKey
from txtunnel.link import Link, Stream
from txtunnel.mtls import agentAllowed
from txtunnel.names import checkName
from txtunnel.relay.tokens import RESERVABLE, TokenEntry

if TYPE_CHECKING:
    from txtunnel.relay.policy import StreamMeter
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
        link = self.session.link
        relay = self.session.relay
        if relay.draining:
            raise ConnectionLost("the relay is shutting down")
        if relay.visitorRules and not relay.visitorRules.permits(str(header.get("peer", ""))):
            raise VisitorRefused("your address may not use this relay")
        limit = relay.maxStreams
        if limit and len(link.streams) >= limit:
            relay.metrics.limitRejected("max-streams")
            raise TooManyStreams(f"the tunnel's agent is carrying its limit of {limit} connections; try again shortly")
        address = self.binding.address if self.binding is not None else "-"
        # The relay's name for the tunnel, as HTTP access events have it: the TLS name, the TCP or UDP port.
        claim = getattr(self.binding, "claim", None)
        name = str(claim[1]) if claim else address
        meter = self._meter(name, str(header.get("peer", "")))
        stream = link.openStream(dict(header, tunnel=self.id), protocol)
        if meter is not None:
            meter.cut = lambda reason: self._cut(stream, reason)
            stream.meter = meter
        relay.metrics.streamOpened(self.type)
        self.session.opened[stream.id] = (relay.reactor.seconds(), self.type, address, name)
        return stream

    def _meter(self, name: str, peer: str) -> StreamMeter | None:
        """
        The quota meter for a TCP, UDP or TLS visitor's stream (HTTP ones
        are metered per request by the edge's gates).

        @raise QuotaSpent: when the visitor's or the tunnel's is spent.
        """
        relay = self.session.relay
        quota = relay.quota
        if quota is None or self.type not in ("tcp", "udp", "tls"):
            return None
        try:
            return quota.streamMeter(self.type, name, peer)
        except QuotaSpent:
            relay.metrics.limitRejected("quota")
            raise

    def _cut(self, stream: Stream, reason: str) -> None:
        if stream.closed:
            return
        relay = self.session.relay
        relay.metrics.limitRejected("quota")
        self.session.log.info(
            "closing {kind} visitor {client_ip} of tunnel {tunnel}: {reason}",
            kind=self.type,
            client_ip=stream.header.get("peer", "?"),
            tunnel=self.binding.address if self.binding is not None else "-",
            reason=reason,
        )
        stream.reset("quota", reason)

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
        #: When each open stream was opened, for which kind of tunnel,
        #: address and name (for metrics and the connection access log).
        self.opened: dict[int, tuple[float, str, str, str]] = {}
        #: The token this agent presented (its reservations), once known.
        self.token: TokenEntry | None = None
        link.controlReceived = self.controlReceived
        link.streamOpened = lambda stream: stream.reset("refused", "the relay opens streams, agents do not")
        link.streamClosed = self._streamClosed
        relay.sessions.add(self)

    def _streamClosed(self, stream: Stream) -> None:
        started, kind, address, name = self.opened.pop(stream.id, (None, "unknown", "-", "-"))
        self.relay.metrics.streamClosed(kind, stream.bytesSent, stream.bytesReceived)
        if started is not None and kind != "http" and self.relay.accessLog:
            # HTTP is logged per request by the edge; others per connection.
            logConnection(
                name,
                str(stream.header.get("peer", "?")),
                kind,
                stream.bytesSent,
                stream.bytesReceived,
                self.relay.reactor.seconds() - started,
                address,
            )

    def _refuse(self, code: str, reason: str) -> None:
        self.relay.metrics.linkRefused(code)
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
                # A clean goodbye: nothing is kept for this agent, and
                # visitors' idle connections to it let go of their streams
                # so that it can finish draining.
                self._unbindAll()
                self.relay.releaseIdle(lambda edge: edge.link is self.link)
            else:
                self.log.warn("agent {peer} sent unknown control op {op!r}; ignored", peer=self.peer, op=op)

    def _hello(self, message: dict[str, Any]) -> None:
        versions = message.get("versions")
        if not isinstance(versions, list) or PROTOCOL_VERSION not in versions:
            self._refuse(
                "version", f"this relay speaks link protocol version {PROTOCOL_VERSION}; agent offered {versions!r}"
            )
            return
        agentCAs = getattr(self.relay, "agentCAs", None)
        if agentCAs and not agentAllowed(getattr(self.carrier, "transport", None), agentCAs):
            self._refuse(
                "auth",
                "this relay requires agents to connect over wss:// with a client certificate from its agent CA "
                "(--cert and --key)",
            )
            return
        token = message.get("token")
        failures = self.relay.authFailures
        # One IPv4 address, or one IPv6 /64, counts as one agent address.
        where = visitorKey(self.peerHost)
        wait = failures.wait(where)
        if wait > 0:
            # Not "auth": an agent with a good token behind the same address
            # should keep retrying, not give up.
            self._refuse("busy", f"too many failed token attempts from this address; retry in {max(1, round(wait))}s")
            return
        identity = message.get("identity")
        gate = self.relay.loginGate
        badIdentity = None
        if isinstance(identity, str) and gate is not None:
            # A token from 'txtunnel login': who made this agent's tunnels.
            claims = gate.tokens.verify(identity, gate.now())
            if claims is None:
                badIdentity = "the login token is invalid or expired; run 'txtunnel login' again"
            else:
                self.email = str(claims["sub"])
        self.token = self.relay.matchToken(token if isinstance(token, str) else None)
        if self.email is None and self.token is None:
            failures.take(where)
            if badIdentity is not None:
                self._refuse("auth", badIdentity + (" (and the static token is not valid)" if token else ""))
            else:
                self._refuse("auth", "invalid or missing token" if token else "this relay requires a token (--token)")
            return
        if badIdentity is not None:
            # A valid static token still lets the agent in (a long-running
            # agent outlives its login), as nobody in particular.
            self.log.warn(
                "agent {peer}: {reason}; it connects with its static token", peer=self.peer, reason=badIdentity
            )
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
        self.relay.metrics.linkAccepted()
        self.link.sendControl(
            {
                "op": "welcome",
                "version": PROTOCOL_VERSION,
                "features": features,
                "window": self.link.window,
                "domain": self.relay.domain,
                **({"identity-refused": badIdentity} if badIdentity is not None else {}),
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
            self.relay.metrics.limitRejected("tunnels-per-link")
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
        d = ensureDeferred(self._limits(kind, message))
        d.addCallback(lambda _: validateBind(self.relay.gates, message))
        d.addCallback(lambda _: forwarder.bind(self.relay, tunnel))

        def bound(binding: IBinding) -> None:
            if self.state == "closed" or self.tunnels.get(bid) is not tunnel:
                binding.close()
                return
            tunnel.binding = binding
            claim = getattr(binding, "claim", None)
            if claim is not None:
                self.relay.held.pop(tuple(claim), None)
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

    async def _limits(self, kind: str, message: dict[str, Any]) -> None:
        """
        Refuse this bind before it reaches the forwarder if the name or port
        is reserved for another token, this agent's address holds too many
        tunnels, or it asks for new tunnels too fast.  Taking back an
        address this agent holds (after a reconnect) is not a new tunnel.

        @raise BindError: with the reason.
        """
        relay = self.relay
        key = None
        if kind in RESERVABLE:
            asked = message.get("port") if RESERVABLE[kind] else message.get("name")
            if isinstance(asked, (str, int)) and not isinstance(asked, bool):
                key = str(asked)
                if not RESERVABLE[kind]:
                    try:
                        # As the forwarder will claim it: "ALICE" is alice.
                        key = checkName(key)
                    except ValueError:
                        pass  # the forwarder refuses it with the reason
                holder = relay.reserved.get((kind, key))
                if holder is not None and (self.token is None or self.token.digest != holder):
                    what = "port" if RESERVABLE[kind] else "name"
                    raise BindError(f"the {kind} {what} {key} is reserved for another token on this relay")
        # One IPv4 address, or one IPv6 /64, counts as one agent address.
        where = visitorKey(self.peerHost)
        limit = relay.maxTunnelsPerIP
        if limit:
            # This bind is already among the session's tunnels.
            held = sum(len(s.tunnels) for s in relay.sessions if visitorKey(s.peerHost) == where) - 1
            if held >= limit:
                relay.metrics.limitRejected("tunnels-per-ip")
                raise BindError(f"at most {limit} tunnels per agent address; this address holds {held}")
        limiter = relay.bindLimiter
        if limiter is not None:
            if key is not None and relay.store is not None and (await relay.store.owner(kind, key)) == self.owner:
                return
            wait = limiter.take(where)
            if wait > 0:
                relay.metrics.limitRejected("bind-rate")
                raise BindError(f"too many new tunnels from this address; try again in {max(1, round(wait))}s")

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
                pool = getattr(tunnel.binding, "pool", None)
                if pool is not None:
                    # Every member of a pool keeps the same list.
                    pool.setAllow(candidate["allow"], origin=tunnel)
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
        if self.state == "ready":
            self.relay.metrics.linkLost()
        self.state = "closed"
        self.relay.sessions.discard(self)
        until = self.relay.wallClock() + self.relay.grace
        self.relay.pruneHeld()
        for tunnel in self.tunnels.values():
            binding = tunnel.binding
            if binding is None:
                continue
            binding.close()
            claim = getattr(binding, "claim", None)
            if claim is not None and self.relay.grace > 0 and self.relay.store is not None:
                # Kept for this agent: it gets the same address if it is back in time.
                owner = getattr(binding, "claimOwner", self.owner)
                self.relay.store.hold(claim[0], claim[1], owner, until)
                self.relay.held[(claim[0], claim[1])] = until
        self.tunnels.clear()
        self.log.info("agent {peer} disconnected: {reason}", peer=self.peer, reason=reason)
