# -*- test-case-name: tests.test_end_to_end -*-
"""
TCP tunnels: a public port on the relay per tunnel, a stream per connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError, ConnectError
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.errors import BindError
from txtunnel.interfaces import IAgentTunnel, IBinding, IForwarder, IRelay, IRelayTunnel
from txtunnel.link import Stream
from txtunnel.splice import SocketSide, connectStream

__all__ = ["TCPForwarder"]


class _VisitorSide(SocketSide):
    """
    A public TCP connection: opens its stream as soon as it is accepted.
    """

    def __init__(self, tunnel: IRelayTunnel) -> None:
        self.tunnel = tunnel
        self.lost = False

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        try:
            self.stream = self.tunnel.openStream({"peer": getattr(peer, "host", "?")}, None)
        except Exception:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        super().connectionMade()


@implementer(IBinding)
class TCPBinding:
    def __init__(self, relay: IRelay, tunnel: IRelayTunnel, port: int, listening: Any) -> None:
        self.relay = relay
        self.tunnel = tunnel
        self.port = port
        self.listening = listening
        self.address = f"tcp://{_hostForURL(relay.publicHost)}:{port}"

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
        pool = relay.ports
        requested = tunnel.request.get("port")
        if requested is not None:
            if not isinstance(requested, int) or requested not in pool:
                raise BindError(f"remote port {requested!r} is outside this relay's TCP range {pool.low}-{pool.high}")
            if pool.inUse(requested):
                raise BindError(f"remote port {requested} is in use on this relay")
            candidates: Any = [requested]
        else:
            candidates = pool.candidates()
        interface = relay.publicInterface.replace(":", r"\:")
        for port in list(candidates):
            claimed = yield relay.store.claim("tcp", str(port), tunnel.owner)
            if not claimed:
                if requested is not None:
                    raise BindError(f"remote port {port} is held by another agent")
                continue
            factory = Factory.forProtocol(lambda: _VisitorSide(tunnel))
            factory.noisy = False
            try:
                listening = yield serverFromString(relay.reactor, f"tcp:{port}:interface={interface}").listen(factory)
            except CannotListenError as e:
                yield relay.store.release("tcp", str(port), tunnel.owner)
                if requested is not None:
                    raise BindError(
                        f"remote port {port} cannot be opened on the relay host ({e.socketError})"
                    ) from None
                continue
            pool.take(port)
            return TCPBinding(relay, tunnel, port, listening)
        raise BindError(f"no free port left in this relay's TCP range {pool.low}-{pool.high}")

    def connect(self, tunnel: IAgentTunnel, stream: Stream) -> None:
        d = connectStream(tunnel.reactor, tunnel.target, stream)

        def failed(f: Failure) -> None:
            if stream.closed:
                return
            host, port = tunnel.target
            reason = f.getErrorMessage() if f.check(ConnectError) else repr(f.value)
            self.log.warn("cannot reach local service {host}:{port}: {reason}", host=host, port=port, reason=reason)
            stream.reset("refused", f"local service {host}:{port} unreachable: {reason}")

        d.addErrback(failed)
