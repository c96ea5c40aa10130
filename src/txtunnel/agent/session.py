# -*- test-case-name: tests.test_relay_agent,tests.test_reconnect -*-
"""
One link's session on the agent: hello, binds, and streams from the relay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

import txtunnel
from txtunnel.frames import PROTOCOL_VERSION
from txtunnel.link import Link, Stream

if TYPE_CHECKING:
    from txtunnel.agent.service import Agent, AgentTunnel

__all__ = ["AgentSession", "relayPolicy"]

FEATURES = ["window", "fin", "ping"]

#: Relay error codes that retrying with the same settings cannot fix.
FATAL_CODES = frozenset({"auth", "version"})


#: Policy settings the agent applies itself rather than send to the relay.
AGENT_SIDE = frozenset({"add-response-header", "remove-response-header"})


def relayPolicy(policy: Any) -> dict[str, Any]:
    """
    The part of a tunnel's visitor policy the relay enforces, as sent in
    the bind request.
    """
    if not isinstance(policy, dict):
        return {}
    return {k: v for k, v in policy.items() if k not in AGENT_SIDE and v}


class AgentSession:
    """
    Drives one link from the agent's side.

    States: C{hello} (hello sent), C{binding}/C{ready}, C{closed}.
    """

    log = Logger()

    def __init__(self, agent: Agent, link: Link, carrier: Any) -> None:
        self.agent = agent
        self.link = link
        self.carrier = carrier
        self.state = "hello"
        self.byId: dict[int, AgentTunnel] = {}
        link.controlReceived = self.controlReceived
        link.streamOpened = self.streamOpened
        link.streamClosed = self._streamClosed
        hello: dict[str, Any] = {
            "op": "hello",
            "versions": [PROTOCOL_VERSION],
            "features": FEATURES,
            "window": link.window,
            "agent": f"txtunnel/{txtunnel.__version__}",
        }
        if agent.token:
            hello["token"] = agent.token
        if agent.key:
            hello["key"] = agent.key
        identity = agent.loginToken()
        if identity:
            # From 'txtunnel login': the relay records who made the tunnels.
            hello["identity"] = identity
        link.sendControl(hello)
        agent.sessionStarted(self)

    def controlReceived(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "welcome" and self.state == "hello":
            self._welcome(message)
        elif op == "bound":
            self._bound(message)
        elif op == "refused":
            self._refused(message)
        elif op in ("updated", "update-refused"):
            self._updated(message)
        elif op == "allow":
            self._allowChanged(message)
        elif op == "error":
            code = str(message.get("code", "?"))
            reason = str(message.get("reason", "no reason given"))
            self.log.error("relay refused this agent: {reason}", reason=reason, code=code)
            if code in FATAL_CODES:
                self.agent.fatal(f"relay refused this agent: {reason}")
        else:
            self.log.warn("relay sent unknown control op {op!r}; ignored", op=op)

    def _welcome(self, message: dict[str, Any]) -> None:
        self.state = "binding"
        window = message.get("window")
        if isinstance(window, int) and 1024 <= window <= (1 << 30):
            self.link.peerWindow = window
        self.log.info("connected to relay {relay}", relay=self.agent.relayURL)
        if isinstance(message.get("identity-refused"), str):
            # In with the static token, but not as the logged-in person.
            self.log.warn("relay did not take the login token: {reason}", reason=message["identity-refused"][:200])
        self.agent.sessionWelcomed(self)
        for i, tunnel in enumerate(self.agent.tunnels, start=1):
            self.byId[i] = tunnel
            self._bind(i, tunnel)

    def _bind(self, bid: int, tunnel: AgentTunnel) -> None:
        request = dict(tunnel.forwarder.bindRequest(tunnel))
        if tunnel.options.get("client-ca"):
            # Visitors must present a certificate from this CA (PEM text).
            request["client-ca"] = tunnel.options["client-ca"]
        # After a reconnect, ask for the address the relay gave before.
        request.update(tunnel.reclaim)
        request.update({"op": "bind", "id": bid, "type": tunnel.type})
        policy = relayPolicy(tunnel.options.get("policy"))
        if policy:
            # Enforced by the relay; basic auth is only a salted hash here.
            request["policy"] = policy
        self.byId[bid] = tunnel
        self.link.sendControl(request)

    def update(self, tunnel: AgentTunnel) -> bool:
        """
        Send C{tunnel}'s current allow-list to the relay for its live
        binding; C{False} if it has none on this link.
        """
        for bid, known in self.byId.items():
            if known is tunnel and tunnel.address is not None:
                self.link.sendControl({"op": "update", "id": bid, "allow": list(tunnel.options.get("allow") or [])})
                return True
        return False

    def _allowChanged(self, message: dict[str, Any]) -> None:
        """
        The tunnel's creator changed its allow-list at the relay
        (C{txtunnel share}): keep it, so a reconnect binds with it.
        """
        tunnel = self.byId.get(message.get("id"))  # type: ignore[arg-type]
        entries = message.get("allow")
        if tunnel is None or not tunnel.options.get("allow") or not isinstance(entries, list):
            return
        if entries and all(isinstance(e, str) for e in entries):
            tunnel.options["allow"] = list(entries)
            self.log.info(
                "tunnel {tunnel!r} is now shared with {entries}", tunnel=tunnel.name, entries=", ".join(entries)
            )

    def _updated(self, message: dict[str, Any]) -> None:
        tunnel = self.byId.get(message.get("id"))  # type: ignore[arg-type]
        name = tunnel.name if tunnel is not None else "?"
        if message.get("op") == "updated":
            self.log.info("tunnel {tunnel!r}: allow-list updated on the relay", tunnel=name)
        else:
            reason = str(message.get("reason", "no reason given"))
            self.log.error("relay refused the new allow-list of {tunnel!r}: {reason}", tunnel=name, reason=reason)

    def goodbye(self) -> None:
        """
        Tell the relay this agent is leaving on purpose, so it frees the
        tunnels' addresses at once instead of keeping them for a reconnect.
        """
        if self.state != "closed":
            self.link.sendControl({"op": "bye"})

    def _bound(self, message: dict[str, Any]) -> None:
        tunnel = self.byId.get(message.get("id"))  # type: ignore[arg-type]
        if tunnel is None:
            return
        address = str(message.get("address"))
        if tunnel.options.get("allow") and not message.get("allow"):
            # Fail closed: this relay would serve the tunnel to anyone.
            self.link.sendControl({"op": "unbind", "id": message.get("id")})
            reason = "the relay does not enforce --allow (it is older than visitor login); tunnel not opened"
            self.log.error("relay refused tunnel {tunnel!r}: {reason}", tunnel=tunnel.name, reason=reason)
            self.agent.tunnelRefused(tunnel, reason)
            return
        if tunnel.lastAddress is not None and tunnel.lastAddress != address:
            self.log.warn(
                "tunnel {tunnel!r} has a new address: {address} (was {old})",
                tunnel=tunnel.name,
                address=address,
                old=tunnel.lastAddress,
            )
        tunnel.address = tunnel.lastAddress = address
        reclaim = message.get("reclaim")
        tunnel.reclaim = reclaim if isinstance(reclaim, dict) else {}
        self.agent.reclaimChanged(tunnel)
        host, port = tunnel.target
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.log.info("tunnel ready: {address} -> {target}", address=tunnel.address, target=target, tunnel=tunnel.name)
        self.agent.tunnelBound(tunnel)

    def _refused(self, message: dict[str, Any]) -> None:
        tunnel = self.byId.get(message.get("id"))  # type: ignore[arg-type]
        if tunnel is None:
            return
        reason = str(message.get("reason", "no reason given"))
        if tunnel.reclaim and tunnel.randomAddress:
            # The old address is gone (grace period over): take a new one.
            self.log.warn(
                "tunnel {tunnel!r} could not get its old address back: {reason}", tunnel=tunnel.name, reason=reason
            )
            tunnel.reclaim = {}
            self.agent.reclaimChanged(tunnel)
            self._bind(max(self.byId) + 1, tunnel)
            return
        self.log.error("relay refused tunnel {tunnel!r}: {reason}", tunnel=tunnel.name, reason=reason)
        self.agent.tunnelRefused(tunnel, reason)

    def _streamClosed(self, stream: Stream) -> None:
        tunnel = self.byId.get(stream.header.get("tunnel"))  # type: ignore[arg-type]
        kind = tunnel.type if tunnel is not None else "unknown"
        self.agent.metrics.streamClosed(kind, stream.bytesSent, stream.bytesReceived)

    def streamOpened(self, stream: Stream) -> None:
        tunnel = self.byId.get(stream.header.get("tunnel"))  # type: ignore[arg-type]
        if tunnel is None or tunnel.address is None:
            stream.reset("refused", "no such tunnel on this agent")
            return
        self.agent.metrics.streamOpened(tunnel.type)
        # Bytes wait in the stream (bounded by its window) until the
        # forwarder has attached a protocol and resumed it.
        stream.pauseProducing()
        try:
            tunnel.forwarder.connect(tunnel, stream)
        except Exception:
            self.log.failure("forwarder {type!r} failed on a new stream", type=tunnel.type)
            if not stream.closed:
                stream.reset("refused", "agent error")

    def linkLost(self, code: int | None, reason: str) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        for tunnel in self.byId.values():
            tunnel.address = None
        self.agent.sessionEnded(self, reason)
