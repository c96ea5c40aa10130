# -*- test-case-name: tests.test_end_to_end -*-
"""
The relay as a service tree: its state, its public listeners, its sessions.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from zope.interface import implementer

from txtunnel.interfaces import IForwarder, IRelay, IStore, IVisitorGate
from txtunnel.link import DEFAULT_WINDOW
from txtunnel.relay.edge import EdgeFactory
from txtunnel.relay.hosts import HostTable
from txtunnel.relay.ports import PortPool
from txtunnel.relay.session import RelaySession
from txtunnel.store import SQLiteStore
from txtunnel.wslink import LinkServerFactory

__all__ = ["Relay", "RelayService", "hashToken", "listenWithFallback"]

#: How many ports past a taken default port the relay tries.
FALLBACK_TRIES = 20


def hashToken(token: str) -> bytes:
    """
    The form in which the relay keeps a token: never the token itself.
    """
    return hashlib.sha256(b"txtunnel-token:" + token.encode("utf-8")).digest()


@implementer(IRelay)
class Relay:
    """
    What all of a relay's parts share.
    """

    log = Logger()

    def __init__(self, reactor: Any, settings: dict[str, Any], forwarders: dict[str, IForwarder]) -> None:
        self.reactor = reactor
        self.settings = settings
        self.domain = settings["domain"]
        self.hosts = HostTable(self.domain)
        self.tlsHosts = HostTable(self.domain)
        self.ports = PortPool(*settings["tcp-ports"])
        self.udpPorts = PortPool(*settings["udp-ports"])
        self.publicInterface = settings["public-interface"]
        self.forwarders = forwarders
        self.sessions: set[RelaySession] = set()
        self.store: IStore | None = None
        self.httpPort: int | None = None
        self.httpsPort: int | None = None
        self.tlsPort: int | None = None
        self._tokens = [hashToken(t) for t in settings["token"]]
        #: The checks every visitor request to an HTTP tunnel passes, in order.
        self.gates: list[IVisitorGate] = []
        self.loginGate: Any = None
        #: Gates for requests to the relay's own host other than the agents'
        #: link (its login pages); with none, such requests get a 404.
        self.apexGates: list[IVisitorGate] = []
        #: Seconds a disconnected agent's names and ports are kept for it.
        self.grace = float(settings.get("grace", 1800.0))
        self.linkFactory = LinkServerFactory(
            lambda link, carrier, peer: RelaySession(self, link, carrier, peer),
            reactor,
            window=settings.get("window", DEFAULT_WINDOW),
            keepalive=settings["keepalive"],
            keepaliveTimeout=settings["keepalive"] * 2.5,
        )

    @property
    def publicHost(self) -> str:
        """
        The host name for C{tcp://} addresses: the interface if it is a
        specific one, else the domain.
        """
        if self.publicInterface in ("", "0.0.0.0", "::"):
            return self.domain
        return self.publicInterface

    def wallClock(self) -> float:
        """
        Wall-clock time for holds that must survive a restart of the relay.
        """
        return float(self.reactor.seconds())

    def checkToken(self, token: str | None) -> bool:
        """
        Whether an agent presenting C{token} may connect.  With no tokens
        configured every agent may; the comparison is constant-time and
        touches only hashes.
        """
        if not self._tokens:
            return True
        if not token:
            return False
        candidate = hashToken(token)
        ok = False
        for known in self._tokens:
            ok |= hmac.compare_digest(candidate, known)
        return ok

    def httpURL(self, name: str) -> str:
        if self.httpPort is not None:
            port = "" if self.httpPort == 80 else f":{self.httpPort}"
            return f"http://{name}.{self.domain}{port}/"
        port = "" if self.httpsPort in (443, None) else f":{self.httpsPort}"
        return f"https://{name}.{self.domain}{port}/"


def _withALPN(endpoint: Any) -> Any:
    """
    Offer ALPN C{http/1.1} on an C{ssl:} endpoint.

    With Twisted 26 and OpenSSL 3, a server whose C{CertificateOptions} has
    no acceptable protocols answers every client that offers ALPN (curl,
    every browser) with an "internal error" alert; naming the protocol we
    speak fixes the handshake.  Measured with curl 7.88 against
    C{ssl:PORT:privateKey=...}.
    """
    options = getattr(endpoint, "_sslContextFactory", None)
    if isinstance(options, CertificateOptions) and getattr(options, "_acceptableProtocols", None) is None:
        options._acceptableProtocols = [b"http/1.1"]
    return endpoint


def _edgeScheme(port: Any) -> str:
    factory = getattr(port, "factory", None)
    return str(getattr(getattr(factory, "wrappedFactory", factory), "scheme", "http"))


def _portOf(endpoint: str) -> int | None:
    head = endpoint.split(":")
    if len(head) > 1 and head[0] in ("tcp", "ssl") and head[1].isdigit():
        return int(head[1])
    return None


@inlineCallbacks
def listenWithFallback(reactor: Any, endpoint: str, factory: Any, fallback: bool, what: str) -> Any:
    """
    Listen on C{endpoint}; when C{fallback} is set (the endpoint is a
    default, not the user's choice) and its port is taken, try the next
    ports and log the one used.
    """
    log = Logger()
    port = _portOf(endpoint)
    candidates = [(endpoint, port)]
    if fallback and port is not None:
        candidates += [(endpoint.replace(f":{port}", f":{port + i}", 1), port + i) for i in range(1, FALLBACK_TRIES)]
    for i, (candidate, number) in enumerate(candidates):
        try:
            listening: IListeningPort = yield _withALPN(serverFromString(reactor, candidate)).listen(factory)
        except CannotListenError as e:
            if i + 1 >= len(candidates):
                raise
            log.warn(
                "{what} port {port} is taken ({error}); trying the next", what=what, port=number, error=e.socketError
            )
            continue
        if i:
            log.warn(
                "{what} default port {port} was taken; listening on {actual} instead",
                what=what,
                port=port,
                actual=number,
            )
        return listening
    raise AssertionError("unreachable")


class RelayService(MultiService):
    """
    Starts the relay's listeners and store; stops them, closing every link.
    """

    log = Logger()

    def __init__(self, relay: Relay, *, httpDefaulted: bool = False, stateDirDefaulted: bool = False) -> None:
        super().__init__()
        self.relay = relay
        self.httpDefaulted = httpDefaulted
        self.stateDirDefaulted = stateDirDefaulted
        self.listening: list[IListeningPort] = []
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()
        self._start().addErrback(self._failed)

    @inlineCallbacks
    def _start(self) -> Any:
        relay = self.relay
        settings = relay.settings
        if not relay._tokens:
            self.log.warn("no --token given: any agent can open tunnels on this relay (fine for development only)")
        if settings["http"]:
            port = yield listenWithFallback(
                relay.reactor, settings["http"], EdgeFactory(relay, "http"), self.httpDefaulted, "HTTP"
            )
            self.listening.append(port)
            relay.httpPort = getattr(port.getHost(), "port", None)
        if settings["https"]:
            port = yield listenWithFallback(
                relay.reactor, settings["https"], EdgeFactory(relay, "https"), False, "HTTPS"
            )
            self.listening.append(port)
            relay.httpsPort = getattr(port.getHost(), "port", None)
        tlsListening = None
        if settings.get("tls"):
            from txtunnel.forwarders.tls import TLSRouterFactory

            tlsListening = yield listenWithFallback(
                relay.reactor, settings["tls"], TLSRouterFactory(relay), False, "TLS"
            )
            self.listening.append(tlsListening)
            relay.tlsPort = getattr(tlsListening.getHost(), "port", None)
        stateDir = settings["state-dir"]
        if self.stateDirDefaulted:
            stateDir = os.path.join(stateDir, f"relay-{relay.httpPort or relay.httpsPort or 0}")
        store = SQLiteStore.inDirectory(stateDir)
        # Tunnels of the previous run get the grace period to come back.
        yield store.holdAll(relay.wallClock() + relay.grace)
        relay.store = store
        self._startLogin(stateDir)
        for port in self.listening:
            if port is tlsListening:
                continue
            host = port.getHost()
            self.log.info(
                "relay listening on {host}:{port} for {domain} (agents connect to {scheme}://{host}:{port}/_txtunnel)",
                scheme="wss" if _edgeScheme(port) == "https" else "ws",
                host=getattr(host, "host", "?"),
                port=getattr(host, "port", "?"),
                domain=relay.domain,
            )
        if tlsListening is not None:
            host = tlsListening.getHost()
            self.log.info(
                "TLS passthrough on {host}:{port} for *.{domain}, routed by SNI",
                host=getattr(host, "host", "?"),
                port=getattr(host, "port", "?"),
                domain=relay.domain,
            )
        self.log.info(
            "tunnels: {kinds}; TCP ports {low}-{high} and UDP ports {udpLow}-{udpHigh} on {iface}; state in {state}",
            kinds=", ".join(sorted(relay.forwarders)),
            low=relay.ports.low,
            high=relay.ports.high,
            udpLow=relay.udpPorts.low,
            udpHigh=relay.udpPorts.high,
            iface=relay.publicInterface,
            state=stateDir,
        )
        self.ready.callback(None)

    def _startLogin(self, stateDir: str) -> None:
        """
        Put the login gate in front of shared tunnels.  It is there even
        with no providers configured, so a bind asking for an allow-list is
        refused rather than served open.
        """
        from txtunnel.oidc import providerFromSection
        from txtunnel.relay.login import LoginGate
        from txtunnel.signing import Signer, loadSecret

        relay = self.relay
        providers = {
            name: providerFromSection(relay.reactor, name, values)
            for name, values in relay.settings.get("providers", {}).items()
        }
        gate = LoginGate(
            relay, providers, Signer(loadSecret(stateDir)), relay.settings.get("session-lifetime", 43200.0)
        )
        relay.loginGate = gate
        relay.gates.append(gate)
        if providers:
            relay.apexGates.append(gate)
            self.log.info(
                "visitor login with {providers}; callback {url}/_txtunnel/callback",
                providers=", ".join(sorted(providers)),
                url=relay.httpURL("x").replace("://x.", "://").rstrip("/"),
            )

    def _failed(self, failure: Any) -> None:
        self.log.critical("relay failed to start: {error}", error=failure.getErrorMessage())
        if not self.ready.called:
            self.ready.errback(failure)
        else:
            return
        reactor = self.relay.reactor
        if getattr(reactor, "running", False):
            reactor.stop()
        elif hasattr(reactor, "callWhenRunning"):
            reactor.callWhenRunning(reactor.stop)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for session in list(self.relay.sessions):
            session.carrier.closeLink("relay shutting down")
            session.linkLost("relay shutting down")
        ports, self.listening = self.listening, []
        d: Deferred[Any] = DeferredList([Deferred.fromCoroutine(_stop(p)) for p in ports])
        store = self.relay.store
        if isinstance(store, SQLiteStore):
            d.addBoth(lambda r: store.close())
        return d


async def _stop(port: IListeningPort) -> None:
    result = port.stopListening()
    if isinstance(result, Deferred):
        await result
