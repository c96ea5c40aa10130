# -*- test-case-name: tests.test_tls_passthrough -*-
"""
TLS passthrough tunnels: C{NAME.<domain>} on the relay's TLS port, routed by
the server name (SNI) in the visitor's ClientHello, never decrypted.

The relay reads only the unencrypted ClientHello (L{txtunnel.sni}), picks
the tunnel by name, and from then on splices bytes both ways, ClientHello
included; the TLS session is between the visitor and the local service (or
whatever the agent connects to), which holds the certificate and key.  The
relay never has them and sees only ciphertext.

Or the agent holds them (C{--tls-cert FILE --tls-key FILE}): then the agent
ends the visitor's TLS session itself (L{terminatingOptions},
L{terminateTLS}) and speaks plain TCP to the local service, which needs no
certificate at all.  The relay is no wiser either way: it still routes by
SNI and splices ciphertext.

Relay half: L{TLSForwarder.bind} claims the name (namespace C{"tls"} in the
store, C{relay.tlsHosts} for routing); L{TLSRouterFactory} is the listener
the relay starts for C{--tls ENDPOINT}.  Agent half: a TCP connection to the
target per stream, as for C{tcp} tunnels.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.claims import claimName, connectOrReset, nameRequest
from txtunnel.config import optionalFile
from txtunnel.errors import BindError, QuotaSpent, StreamRefused, VisitorRefused
from txtunnel.interfaces import IAgentTunnel, IBinding, IForwarder, IRelay, IRelayTunnel
from txtunnel.link import Stream
from txtunnel.plugins import Setting
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

__all__ = [
    "TLSBinding",
    "TLSForwarder",
    "TLSRouter",
    "TLSRouterFactory",
    "terminateTLS",
    "terminatingOptions",
    "tlsURL",
]

#: The TLS alert for a visitor the relay's IP rules refuse.
ACCESS_DENIED = 49

#: Seconds a visitor has to send a complete ClientHello.
DEFAULT_HELLO_TIMEOUT = 10.0

#: Seconds the agent waits for the local service to accept a connection.
CONNECT_TIMEOUT = 10.0


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
    settings = (
        Setting(
            "tls-cert",
            optionalFile,
            None,
            "The agent ends the visitors' TLS itself with this certificate chain (PEM, leaf first).",
        ),
        Setting("tls-key", optionalFile, None, "The private key (PEM) of tls-cert. [default: in the tls-cert file]"),
    )
    log = Logger()

    def bindRequest(self, tunnel: IAgentTunnel) -> dict[str, Any]:
        return nameRequest(tunnel)

    @inlineCallbacks
    def bind(self, relay: IRelay, tunnel: IRelayTunnel) -> Any:
        if relay.tlsPort is None:
            raise BindError("this relay has no TLS passthrough listener (its operator can add one with --tls)")
        name = yield claimName(relay, relay.tlsHosts, "tls", tunnel, "TLS name")
        return TLSBinding(relay, tunnel, name)

    def checkSettings(self, options: dict[str, Any], where: Any) -> None:
        """
        Read C{tls-cert} and C{tls-key} now, into the one C{tls-server}
        option, so a bad file stops start-up with an error that names the
        key and the file.
        """
        cert, key = options.pop("tls-cert", None), options.pop("tls-key", None)
        if cert or key:
            options["tls-server"] = serverOptions(cert, key, where("tls-cert"), where("tls-key"))

    def connect(self, tunnel: IAgentTunnel, stream: Stream) -> None:
        server = tunnel.options.get("tls-server")
        if server is not None:
            terminateTLS(tunnel, stream, server)
        else:
            connectOrReset(tunnel, stream)


# -- the agent ends TLS itself (--tls-cert / --tls-key)


def terminatingOptions(certPath: str, keyPath: str | None) -> ssl.CertificateOptions:
    """
    The TLS server settings for an agent that holds its tunnel's
    certificate: the chain in C{certPath} (leaf first) and its key in
    C{keyPath} (or in C{certPath} too), TLS 1.2 or later, the relay's
    cipher list.  Read at start-up, so a bad file is a usage error.

    ALPN offers C{http/1.1} only: a client offering C{h2} would otherwise
    speak HTTP/2 to a local service that may not; clients that offer no
    ALPN are unaffected.

    @raise txtunnel.certificates.CertificateError: naming the file and
        what is wrong with it.
    """
    from txtunnel.certificates import loadServerCertificate
    from txtunnel.tlscontext import serverOptions

    return serverOptions(loadServerCertificate(certPath, keyPath, requireName=False), [b"http/1.1"])


def serverOptions(cert: str | None, key: str | None, certWhere: str, keyWhere: str) -> ssl.CertificateOptions:
    """
    L{terminatingOptions} for the files C{cert} and C{key}, with errors
    that say where each was given (C{certWhere}, C{keyWhere}).

    @raise ValueError: with the whole message.
    """
    from txtunnel.certificates import CertificateError

    if cert is None:
        raise ValueError(f"{keyWhere} needs {certWhere.rsplit(' ', 1)[-1]}: the certificate that goes with the key")
    try:
        return terminatingOptions(cert, key)
    except CertificateError as e:
        message = str(e)
        aboutKey = key is not None and key in message
        aboutCert = cert in message
        where = f"{certWhere} and {keyWhere}" if aboutKey and aboutCert else keyWhere if aboutKey else certWhere
        raise ValueError(f"{where}: {message}") from None


@implementer(IHalfCloseableProtocol)
class _LocalPlain(Protocol):
    """
    The agent's plain TCP connection to the local service, for one visitor
    whose TLS session the agent ends: what the service sends is encrypted
    onto the stream.
    """

    def __init__(self) -> None:
        #: The TLS layer on the stream (the visitor's side), once attached.
        self.tls: Any = None
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)

    def readConnectionLost(self) -> None:
        # TLS has no half-close that Twisted carries: close_notify, then close.
        if self.tls is not None:
            self.tls.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = True
        if self.tls is not None:
            if reason.check(ConnectionDone):
                self.tls.loseConnection()
            else:
                self.tls.abortConnection()


class _VisitorPlain(Protocol):
    """
    The visitor's decrypted bytes, inside the TLS layer on the stream: they
    go to the local service; each side is the other's producer.
    """

    log = Logger()

    def __init__(self, local: _LocalPlain, name: str) -> None:
        self.local = local
        self.name = name

    def connectionMade(self) -> None:
        local = self.local
        local.tls = self.transport
        self.transport.registerProducer(local.transport, True)  # type: ignore[union-attr]
        local.transport.registerProducer(self.transport, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if not self.local.lost:
            self.local.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        local = self.local
        # The TLS layer is gone with the visitor: the local side must not
        # close it again (an abort then fails inside Twisted's TLS).
        local.tls = None
        if not reason.check(ConnectionDone):
            self.log.info(
                "TLS tunnel {tunnel}: visitor connection ended: {why}", tunnel=self.name, why=reason.getErrorMessage()
            )
        if not local.lost and local.transport is not None:
            local.transport.loseConnection()


def terminateTLS(tunnel: IAgentTunnel, stream: Stream, server: ssl.CertificateOptions) -> None:
    """
    Agent half of a C{tls} tunnel with C{--tls-cert}: connect to the local
    service in clear, then end the visitor's TLS session on C{stream} with
    C{server}'s certificate.  The stream waits, paused, while the local
    connection is made; if the service cannot be reached it is reset with
    the reason, as for passthrough, and the tunnel's circuit breaker is
    asked first and told how it went, as for passthrough too
    (L{txtunnel.claims.connectOrReset}).
    """
    host, port = tunnel.target
    breaker = getattr(tunnel, "breaker", None)
    if breaker is not None and not breaker.allow():
        wait = max(1, round(breaker.retryAfter()))
        stream.reset("refused", f"local service {host}:{port} is failing; not trying it for {wait}s (circuit open)")
        return
    endpoint: Any
    if isIPAddress(host):
        endpoint = TCP4ClientEndpoint(tunnel.reactor, host, port, timeout=CONNECT_TIMEOUT)
    elif isIPv6Address(host):
        endpoint = TCP6ClientEndpoint(tunnel.reactor, host, port, timeout=CONNECT_TIMEOUT)
    else:
        endpoint = HostnameEndpoint(tunnel.reactor, host, port, timeout=CONNECT_TIMEOUT)
    local = _LocalPlain()
    factory = Factory.forProtocol(lambda: local)
    factory.noisy = False
    d = endpoint.connect(factory)

    def connected(protocol: _LocalPlain) -> None:
        if breaker is not None:
            breaker.success()
        if stream.closed:
            protocol.transport.loseConnection()  # type: ignore[union-attr]
            return
        setNoDelay(protocol.transport)
        inner = Factory.forProtocol(lambda: _VisitorPlain(local, tunnel.name))
        tls = TLSMemoryBIOFactory(server, False, inner)
        tls.noisy = False
        stream.attach(tls.buildProtocol(stream.getPeer()))
        stream.resumeProducing()

    def failed(f: Failure) -> None:
        if stream.closed:
            return
        reason = f.getErrorMessage() if f.check(ConnectError) else repr(f.value)
        TLSForwarder.log.warn("cannot reach local service {host}:{port}: {reason}", host=host, port=port, reason=reason)
        if breaker is not None:
            breaker.failure(reason)
        stream.reset("refused", f"local service {host}:{port} unreachable: {reason}")

    d.addCallbacks(connected, failed)
