# -*- test-case-name: tests.test_tcp_tunnel -*-
"""
TCP tunnels: a public port on the relay per tunnel, a stream per connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.claims import claimPort, connectOrReset
from txtunnel.errors import QuotaSpent
from txtunnel.interfaces import IAgentTunnel, IBinding, IForwarder, IRelay, IRelayTunnel
from txtunnel.link import Stream
from txtunnel.splice import SocketSide

__all__ = ["TCPForwarder"]


class _VisitorSide(SocketSide):
    """
    A public TCP connection: opens its stream as soon as it is accepted.
    """

    log = Logger()

    def __init__(self, tunnel: IRelayTunnel) -> None:
        self.tunnel = tunnel
        self.lost = False

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        try:
            self.stream = self.tunnel.openStream({"peer": getattr(peer, "host", "?")}, None)
        except Exception as e:
            # No link, too many streams, an address the relay refuses or a spent quota.
            if isinstance(e, QuotaSpent):
                self.log.info(
                    "TCP visitor {client_ip} refused on port {port}: {reason}",
                    client_ip=getattr(peer, "host", "?"),
                    port=getattr(self.transport.getHost(), "port", "?"),  # type: ignore[union-attr]
                    reason=str(e),
                )
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        super().connectionMade()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if getattr(self, "stream", None) is None:
            self.lost = True  # refused before a stream was opened
            return
        super().connectionLost(reason)


#: Pending connections a public port queues; Twisted's default of 50 made
#: every 50th of a burst of connects wait a second for a SYN retransmit.
BACKLOG = 1024


@implementer(IBinding)
class TCPBinding:
    def __init__(self, relay: IRelay, tunnel: IRelayTunnel, port: int, listening: Any) -> None:
        self.relay = relay
        self.tunnel = tunnel
        self.port = port
        self.listening = listening
        self.address = f"tcp://{_hostForURL(relay.publicHost)}:{port}"
        self.claim = ("tcp", str(port))
        self.reclaim = {"port": port}

    def close(self) -> Any:
        self.relay.ports.free(self.port)
        self.relay.store.release("tcp", str(self.port), self.tunnel.owner)
        return self.listening.stopListening()


def _hostForURL(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@implementer(IForwarder)
class TCPForwarder:
    """
    Raw TCP: every public connection becomes one stream to the agent, which
    connects it to the local service.  Half-close and resets carry across.
    """

    name = "tcp"
    description = "raw TCP on a public port of the relay"
    log = Logger()

    def bindRequest(self, tunnel: IAgentTunnel) -> dict[str, Any]:
        port = tunnel.options.get("remote-port")
        return {"port": port} if port else {}

    @inlineCallbacks
    def bind(self, relay: IRelay, tunnel: IRelayTunnel) -> Any:
        interface = relay.publicInterface.replace(":", r"\:")
        factory = Factory.forProtocol(lambda: _VisitorSide(tunnel))
        factory.noisy = False

        def listen(port: int) -> Any:
            return serverFromString(relay.reactor, f"tcp:{port}:interface={interface}:backlog={BACKLOG}").listen(
                factory
            )

        port, listening = yield claimPort(relay, relay.ports, "tcp", tunnel, listen)
        return TCPBinding(relay, tunnel, port, listening)

    def connect(self, tunnel: IAgentTunnel, stream: Stream) -> None:
        connectOrReset(tunnel, stream)
