# -*- test-case-name: tests.test_tls_passthrough -*-
"""
TLS passthrough tunnels: C{NAME.<domain>} on the relay's TLS port, routed by
the server name (SNI) in the visitor's ClientHello, never decrypted.

The relay reads only the unencrypted ClientHello (L{txtunnel.sni}), picks
the tunnel by name, and from then on splices bytes both ways, ClientHello
included; the TLS session is between the visitor and the local service (or
whatever the agent connects to), which holds the certificate and key.  The
relay never has them and sees only ciphertext.

Relay half: L{TLSForwarder.bind} claims the name (namespace C{"tls"} in the
store, C{relay.tlsHosts} for routing); L{TLSRouterFactory} is the listener
the relay starts for C{--tls ENDPOINT}.  Agent half: a TCP connection to the
target per stream, as for C{tcp} tunnels.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.claims import claimName, connectOrReset, nameRequest
from txtunnel.errors import BindError, QuotaSpent, StreamRefused, VisitorRefused
from txtunnel.interfaces import IAgentTunnel, IBinding, IForwarder, IRelay, IRelayTunnel
from txtunnel.link import Stream
from txtunnel.sni import (
    DECODE_ERROR,
    DEFAULT_LIMIT,
    INTERNAL_ERROR,
    NEED_MORE,
    UNRECOGNIZED_NAME,
    ClientHelloError,
    ClientHelloParser,
    alertRecord,
)
from txtunnel.splice import SocketSide, setNoDelay, splice

__all__ = ["TLSBinding", "TLSForwarder", "TLSRouter", "TLSRouterFactory", "tlsURL"]

#: The TLS alert for a visitor the relay's IP rules refuse.
ACCESS_DENIED = 49

#: Seconds a visitor has to send a complete ClientHello.
DEFAULT_HELLO_TIMEOUT = 10.0


def tlsURL(relay: IRelay, name: str) -> str:
    """
    The public address of the TLS tunnel C{name}.
    """
    return f"tls://{name}.{relay.domain}:{relay.tlsPort}"


class TLSRouter(SocketSide):
    """
    One visitor connection on the relay's TLS port.

    Until the ClientHello is complete its bytes are kept (at most the
    factory's C{helloLimit} plus one read); then the connection is routed by
    its server name and spliced to a new stream of that tunnel, the kept
    bytes first.  A visitor that sends something else, a name no tunnel
    has, or nothing within C{helloTimeout} seconds is closed with a log line.
    """

    log = Logger()

    def __init__(self, factory: TLSRouterFactory) -> None:
        self.factory = factory
        self.relay = factory.relay
        self.parser = ClientHelloParser(factory.helloLimit)
        self.stream: Stream | None = None  # type: ignore[assignment]
        self.lost = False
        self.refused = False
        self.peerHost = "?"
        self.timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.peerHost = str(getattr(peer, "host", "?"))
        setNoDelay(self.transport)
        self.timer = self.relay.reactor.callLater(self.factory.helloTimeout, self._expired)

    def _stopTimer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if self.stream is None and not self.refused:
            self._refuse(f"no complete ClientHello within {self.factory.helloTimeout:g}s", None, abort=True)

    def _refuse(self, reason: str, alert: int | None, abort: bool = False) -> None:
        self.refused = True
        self._stopTimer()
        self.log.info("TLS visitor {peer} refused: {reason}", peer=self.peerHost, reason=reason)
        transport: Any = self.transport
        if transport is None or self.lost:
            return
        if abort:
            transport.abortConnection()
            return
        if alert is not None:
            transport.write(alertRecord(alert))
        transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream.write(data)
            return
        if self.refused:
            return
        try:
            name = self.parser.feed(data)
        except ClientHelloError as e:
            self._refuse(e.reason, DECODE_ERROR if e.isTLS else None)
            return
        if name is NEED_MORE:
            return
        self._route(name)

    def _route(self, name: str | None) -> None:
        if name is None:
            self._refuse("no server name (SNI) in the ClientHello", UNRECOGNIZED_NAME)
            return
        kind, label = self.relay.tlsHosts.split(name.encode("ascii"))
        tunnel = self.relay.tlsHosts.get(label) if kind == "tunnel" and label else None
        if tunnel is None:
            self._refuse(f"no TLS tunnel for server name {name!r}", UNRECOGNIZED_NAME)
            return
        try:
            stream = tunnel.openStream({"peer": self.peerHost, "sni": name}, None)
        except StreamRefused as e:
            self._refuse(
                f"{name!r}: {e}", ACCESS_DENIED if isinstance(e, VisitorRefused | QuotaSpent) else INTERNAL_ERROR
            )
            return
        except Exception as e:  # the agent's link went away just now
            self._refuse(f"the agent of {name!r} is not connected ({e})", INTERNAL_ERROR)
            return
        self._stopTimer()
        self.stream = stream
        hello = self.parser.buffered
        self.parser = ClientHelloParser(0)  # drop the kept bytes with the parser
        splice(stream, self)
        stream.write(hello)

    def readConnectionLost(self) -> None:
        if self.stream is not None:
            super().readConnectionLost()
        elif not self.refused:
            self._refuse("closed before a complete ClientHello", None)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._stopTimer()
        if self.stream is not None:
            super().connectionLost(reason)
        self.lost = True


class TLSRouterFactory(Factory):
    """
    The relay's TLS passthrough listener: a L{TLSRouter} per visitor.

    @ivar helloTimeout: seconds a visitor has to send its ClientHello.
    @ivar helloLimit: the largest ClientHello accepted, in bytes.
    """

    noisy = False
    helloTimeout = DEFAULT_HELLO_TIMEOUT
    helloLimit = DEFAULT_LIMIT

    def __init__(self, relay: IRelay, helloTimeout: float | None = None, helloLimit: int | None = None) -> None:
        self.relay = relay
        if helloTimeout is not None:
            self.helloTimeout = helloTimeout
        if helloLimit is not None:
            self.helloLimit = helloLimit

    def buildProtocol(self, addr: Any) -> TLSRouter:
        return TLSRouter(self)


@implementer(IBinding)
class TLSBinding:
    def __init__(self, relay: IRelay, tunnel: IRelayTunnel, name: str) -> None:
        self.relay = relay
        self.tunnel = tunnel
        self.name = name
        self.address = tlsURL(relay, name)
        self.claim = ("tls", name)
        self.reclaim = {"name": name}

    def close(self) -> Any:
        self.relay.tlsHosts.remove(self.name, self.tunnel)
        return self.relay.store.release("tls", self.name, self.tunnel.owner)


@implementer(IForwarder)
class TLSForwarder:
    """
    TLS passthrough: visitors' TLS connections for C{NAME.<domain>} on the
    relay's TLS port reach the local service still encrypted.
    """

    name = "tls"
    description = "TLS passthrough at NAME.<domain> on the relay's TLS port, routed by SNI"
    log = Logger()

    def bindRequest(self, tunnel: IAgentTunnel) -> dict[str, Any]:
        return nameRequest(tunnel)

    @inlineCallbacks
    def bind(self, relay: IRelay, tunnel: IRelayTunnel) -> Any:
        if relay.tlsPort is None:
            raise BindError("this relay has no TLS passthrough listener (its operator can add one with --tls)")
        name = yield claimName(relay, relay.tlsHosts, "tls", tunnel, "TLS name")
        return TLSBinding(relay, tunnel, name)

    def connect(self, tunnel: IAgentTunnel, stream: Stream) -> None:
        connectOrReset(tunnel, stream)
