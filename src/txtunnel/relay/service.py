# -*- test-case-name: tests.test_relay_agent,tests.test_reconnect -*-
"""
The relay as a service tree: its state, its public listeners, its sessions.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from zope.interface import implementer

from txtunnel.admin import AdminSite, IAdminSubject
from txtunnel.certificates import DevelopmentCA, loadServerCertificate
from txtunnel.drain import drain
from txtunnel.errors import BindError
from txtunnel.interfaces import IForwarder, IRelay, IStore, IVisitorGate
from txtunnel.iprules import IPRules
from txtunnel.link import DEFAULT_WINDOW, KEEPALIVE_TIMEOUT_FACTOR
from txtunnel.logs import TwistdLogging
from txtunnel.metrics import RelayMetrics, _now
from txtunnel.mtls import ClientCertificateGate, requiredCAs
from txtunnel.ratelimit import BucketTable, Rate
from txtunnel.relay.edge import DEFAULT_HEADER_TIMEOUT, EdgeFactory
from txtunnel.relay.handshake import HandshakeTimeoutTLSFactory
from txtunnel.relay.hosts import HostTable
from txtunnel.relay.policy import policyGates, quotaGate
from txtunnel.relay.ports import PortPool
from txtunnel.relay.session import RelaySession
from txtunnel.relay.tokens import TokenEntry, hashToken, loadTokensFile
from txtunnel.store import SQLiteStore
from txtunnel.tlscontext import DEFAULT_ALPN, ServerTLS, splitHTTPSEndpoint
from txtunnel.wslink import LinkServerFactory

__all__ = ["Relay", "RelayService", "hashToken", "listenWithFallback"]

#: How many ports past a taken default port the relay tries.
FALLBACK_TRIES = 20


@implementer(IRelay, IAdminSubject)
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
        self.adminPort: int | None = None
        self._tokens = [hashToken(t) for t in settings["token"]]
        #: This relay's own metrics registry (see L{txtunnel.metrics}).
        self.metrics = RelayMetrics(self)
        #: Whether to log an access event per request and connection.
        self.accessLog = bool(settings.get("access-log", True))
        #: Every token accepted, with what it reserves (C{--tokens-file}).
        self.tokenEntries = [TokenEntry(d) for d in self._tokens]
        if settings.get("tokens-file"):
            self.tokenEntries += loadTokensFile(settings["tokens-file"])
            self._tokens = [e.digest for e in self.tokenEntries]
        #: Reserved C{(kind, key)} -> the digest of the token that may bind it.
        self.reserved: dict[tuple[str, str], bytes] = {}
        for entry in self.tokenEntries:
            for reservation in entry.reserved:
                self.reserved[reservation] = entry.digest
        for kind, pool in (("tcp", self.ports), ("udp", self.udpPorts)):
            pool.reserved.update(int(key) for k, key in self.reserved if k == kind)
        #: Relay-wide IP rules (C{--ip-allow}, C{--ip-deny}): checked by the
        #: policy gate for HTTP and when any other visitor's stream opens.
        self.visitorRules = IPRules.fromLists(settings.get("ip-allow", []), settings.get("ip-deny", []))
        #: The checks every visitor request to an HTTP tunnel passes, in order.
        #: The relay's policy (IP rules, rates, quotas, basic auth, header
        #: rules) first, then client certificates.
        self.gates: list[IVisitorGate] = [*policyGates(self), ClientCertificateGate()]
        #: The bandwidth quotas, which also meter TCP, UDP and TLS streams.
        self.quota = quotaGate(self.gates)
        #: Streams one agent's link may carry at once.
        self.maxStreams = int(settings.get("max-streams", 1000))
        #: Tunnels the agents of one IP address may hold at once.
        self.maxTunnelsPerIP = int(settings.get("max-tunnels-per-ip", 10))
        bindRate = settings.get("bind-rate")
        #: Failed token attempts per agent address: ten a minute, then the
        #: address is refused for a while, so tokens cannot be guessed fast.
        self.authFailures = BucketTable(Rate(10, 60), lambda: float(reactor.seconds()), 10_000)
        #: New tunnels per agent IP address (C{--bind-rate}).
        self.bindLimiter = BucketTable(bindRate, lambda: float(reactor.seconds()), 10_000) if bindRate else None
        #: CAs an agent's client certificate must chain to (--agent-ca);
        #: empty when agents need none.
        self.agentCAs: list[Any] = list(settings.get("agent-cas") or [])
        #: Protocols the HTTPS listener offers by ALPN, in order of preference:
        #: HTTP/2 first (the edge hands C{h2} connections to
        #: L{txtunnel.relay.h2edge}), then HTTP/1.1.
        self.alpnProtocols: list[bytes] = [b"h2", *DEFAULT_ALPN]
        #: The HTTPS listener's TLS (set when it starts).
        self.serverTLS: ServerTLS | None = None
        self.loginGate: Any = None
        #: Gates for requests to the relay's own host other than the agents'
        #: link (its login pages); with none, such requests get a 404.
        self.apexGates: list[IVisitorGate] = []
        #: Seconds a disconnected agent's names and ports are kept for it.
        self.grace = float(settings.get("grace", 1800.0))
        #: C{(namespace, key) -> wall time}: claims held for an agent that
        #: is away, so visitors are told it is coming back (503) rather
        #: than that there is no such tunnel (404).
        self.held: dict[tuple[str, str], float] = {}
        #: Set while the relay drains on shutdown: no new streams start.
        self.draining = False
        #: Open visitor connections on the HTTP(S) edge.
        self.edges: set[Any] = set()
        self.linkFactory = LinkServerFactory(
            lambda link, carrier, peer: RelaySession(self, link, carrier, peer),
            reactor,
            window=settings.get("window", DEFAULT_WINDOW),
            keepalive=settings["keepalive"],
            keepaliveTimeout=settings["keepalive"] * KEEPALIVE_TIMEOUT_FACTOR,
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

    def pruneHeld(self) -> None:
        """
        Forget holds that have ended, so the table stays as small as the
        set of agents that are away.
        """
        now = self.wallClock()
        for claim in [claim for claim, until in self.held.items() if until <= now]:
            del self.held[claim]

    def heldFor(self, namespace: str, key: str) -> float | None:
        """
        Seconds left on the hold of an away agent's claim, or C{None} when
        nothing is held under that name.
        """
        until = self.held.get((namespace, key))
        if until is None:
            return None
        left = until - self.wallClock()
        if left <= 0:
            del self.held[(namespace, key)]
            return None
        return left

    def releaseIdle(self, which: Callable[[Any], bool] = lambda edge: True) -> None:
        """
        Ask the visitor connections picked by C{which} to close as soon as
        they owe no response (at once if they owe none): a drain waits for
        requests in flight, not for idle keep-alive connections.
        """
        for edge in list(self.edges):
            if which(edge):
                edge.closeWhenIdle()

    def openStreams(self) -> int:
        """
        Streams open on all agents' links that will end by themselves
        (not UDP flows): what a drain waits for.
        """
        return sum(session.link.finiteStreams() for session in self.sessions)

    def checkToken(self, token: str | None) -> bool:
        """
        Whether an agent presenting C{token} may connect.  With no tokens
        configured every agent may; the comparison is constant-time and
        touches only hashes.
        """
        return self.matchToken(token) is not None

    def matchToken(self, token: str | None) -> TokenEntry | None:
        """
        The entry of C{token}, C{TokenEntry(b"")} for any agent on a relay
        without tokens, or C{None} to refuse.  Every entry is compared, in
        constant time, whatever matches.
        """
        if not self.tokenEntries:
            return TokenEntry(b"")
        if not token:
            return None
        candidate = hashToken(token)
        found = None
        for entry in self.tokenEntries:
            if hmac.compare_digest(candidate, entry.digest):
                found = entry
        return found

    def isReady(self) -> tuple[bool, str]:
        """
        Ready once listening with its store open (see L{txtunnel.admin}).
        """
        if self.draining:
            return False, "draining: shutting down"
        if self.store is None or (self.httpPort is None and self.httpsPort is None):
            return False, "starting"
        return True, "listening"

    def stats(self) -> dict[str, Any]:
        """
        Links and tunnels, for the admin C{/stats} page.
        """
        agents = []
        for session in sorted(self.sessions, key=lambda s: s.peer):
            tunnels = [
                {"type": t.type, "address": t.binding.address}
                for t in session.tunnels.values()
                if t.binding is not None
            ]
            agents.append(
                {"peer": session.peer, "state": session.state, "streams": len(session.link.streams), "tunnels": tunnels}
            )
        return {
            "domain": self.domain,
            "agents": agents,
            "connections": dict(self.metrics.connections),
            "uptime": round(_now(self.reactor) - self.metrics.started, 3),
        }

    def wantsClientCertificate(self, serverName: str | None) -> bool:
        """
        Whether a TLS client that sent C{serverName} (SNI) is asked for a
        client certificate: agents (any name but a tunnel's) when the relay
        has C{--agent-ca}, and visitors of a tunnel bound with C{client-ca}.
        Nobody else is asked, so browsers are not prompted for nothing.
        """
        kind, name = self.hosts.split(serverName.encode("ascii", "replace")) if serverName else ("apex", None)
        if kind != "tunnel":
            return bool(self.agentCAs)
        tunnel = self.hosts.get(name or "")
        try:
            return tunnel is not None and requiredCAs(tunnel) is not None
        except BindError:
            return True

    def httpURL(self, name: str) -> str:
        if self.httpPort is not None:
            port = "" if self.httpPort == 80 else f":{self.httpPort}"
            return f"http://{name}.{self.domain}{port}/"
        port = "" if self.httpsPort in (443, None) else f":{self.httpsPort}"
        return f"https://{name}.{self.domain}{port}/"


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
            listening: IListeningPort = yield serverFromString(reactor, candidate).listen(factory)
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


class RelayService(TwistdLogging, MultiService):
    """
    Starts the relay's listeners and store; stops them, closing every link.
    """

    log = Logger()

    def __init__(
        self,
        relay: Relay,
        *,
        httpDefaulted: bool = False,
        stateDirDefaulted: bool = False,
        adminDefaulted: bool = False,
    ) -> None:
        super().__init__()
        self.relay = relay
        self.adminDefaulted = adminDefaulted
        self.httpDefaulted = httpDefaulted
        self.stateDirDefaulted = stateDirDefaulted
        self.listening: list[IListeningPort] = []
        #: The admin site's port: kept open while draining, so /health/ready
        #: says so.
        self.adminListening: IListeningPort | None = None
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
        # A TLS handshake is the start of a request: it has the head's time.
        handshakeTimeout = float(settings.get("header-timeout", DEFAULT_HEADER_TIMEOUT))
        if settings["http"]:
            endpoint, certFile, keyFile, chainFile = splitHTTPSEndpoint(settings["http"])
            httpFactory: Any = EdgeFactory(relay, "http")
            if certFile is not None:
                # An ssl: endpoint given to --http: TLS as on --https (ALPN
                # included, which curl and browsers need), served as before.
                certificate = loadServerCertificate(certFile, keyFile, chainFile)
                httpFactory = HandshakeTimeoutTLSFactory(
                    ServerTLS([certificate], relay.alpnProtocols), httpFactory, relay.reactor, handshakeTimeout
                )
            port = yield listenWithFallback(relay.reactor, endpoint, httpFactory, self.httpDefaulted, "HTTP")
            self.listening.append(port)
            relay.httpPort = getattr(port.getHost(), "port", None)
        if settings["https"]:
            relay.serverTLS = self._serverTLS()
            tlsFactory = HandshakeTimeoutTLSFactory(
                relay.serverTLS, EdgeFactory(relay, "https"), relay.reactor, handshakeTimeout
            )
            port = yield listenWithFallback(
                relay.reactor, settings.get("https-endpoint") or settings["https"], tlsFactory, False, "HTTPS"
            )
            self.listening.append(port)
            relay.httpsPort = getattr(port.getHost(), "port", None)
        tlsListening = adminListening = None
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
        for (namespace, key), until in store.heldClaims().items():
            relay.held[(namespace, key)] = until
        if settings.get("admin"):
            adminListening = yield listenWithFallback(
                relay.reactor,
                settings["admin"],
                AdminSite(relay, settings.get("admin-token")),
                self.adminDefaulted,
                "admin",
            )
            self.adminListening = adminListening
            host = adminListening.getHost()
            relay.adminPort = getattr(host, "port", None)
            self.log.info(
                "admin endpoint on http://{host}:{port}/ (/metrics, /health, /stats)",
                host=getattr(host, "host", "?"),
                port=relay.adminPort,
            )
        self._startLogin(stateDir)
        for port in self.listening:
            if port is tlsListening:
                continue
            host = port.getHost()
            scheme = "wss" if _edgeScheme(port) == "https" else "ws"
            self.log.info(
                "relay listening on {host}:{port} for {domain} (agents connect to {scheme}://{host}:{port}/_txtunnel)"
                if isinstance(getattr(port, "factory", None), HandshakeTimeoutTLSFactory)
                or settings.get("links-over", "any") != "https"
                else "relay listening on {host}:{port} for {domain} (no agent links here: --links-over https)",
                scheme=scheme,
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

    def _serverTLS(self) -> ServerTLS:
        """
        The HTTPS listener's TLS: the configured certificates, or a
        self-signed one in the state directory when none is given.
        """
        relay = self.relay
        certificates = list(relay.settings.get("https-certificates") or [])
        developmentCA = None
        if not certificates:
            directory = os.path.join(relay.settings["state-dir"], "tls")
            developmentCA, made = DevelopmentCA.inDirectory(directory, relay.domain)
            self.log.warn(
                "no HTTPS certificate given: serving certificates for {domain} and names under it from "
                "{how} development CA {path} (development only: browsers warn; trust it with curl --cacert "
                "{path} and the agent's --ca {path}, or use --insecure)",
                how="a new" if made else "the existing",
                domain=relay.domain,
                path=developmentCA.path,
            )
            certificates = [developmentCA.defaultCertificate()]
        else:
            for cert in certificates:
                self.log.info(
                    "HTTPS certificate for {names} from {source}", names=", ".join(cert.names), source=cert.source
                )
        return ServerTLS(certificates, relay.alpnProtocols, relay.wantsClientCertificate, developmentCA)

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
        """
        Stop accepting (listeners closed, new requests answered 503), let
        the streams in flight finish for up to C{drain-timeout} seconds,
        then close every link; agents' names are held for them as after any
        drop, so they come back to the same addresses.
        """
        super().stopService()
        relay = self.relay
        relay.draining = True
        ports, self.listening = self.listening, []
        d: Deferred[Any] = DeferredList([Deferred.fromCoroutine(_stop(p)) for p in ports])
        timeout = float(relay.settings.get("drain-timeout", 0.0))
        deadline = relay.reactor.seconds() + timeout
        d.addCallback(lambda _: drain(relay.reactor, relay.openStreams, timeout, relay.releaseIdle))
        d.addCallback(self._closeLinks)
        # A finished stream's last bytes may still wait in a slow visitor's
        # socket buffer: closing the connection sends them first, so wait
        # (within the drain timeout) for that before the process exits.
        d.addCallback(
            lambda _: drain(
                relay.reactor,
                self._visitorConnections,
                max(0.0, deadline - relay.reactor.seconds()),
                what="visitor connections still being written",
            )
        )
        admin, self.adminListening = self.adminListening, None
        if admin is not None:
            d.addBoth(lambda r: Deferred.fromCoroutine(_stop(admin)).addCallback(lambda _: r))
        d.addBoth(self._stopGates)
        store = relay.store
        if isinstance(store, SQLiteStore):
            d.addBoth(lambda r: store.close())
        return d

    def _stopGates(self, result: Any) -> Any:
        """
        Let gates that keep state write it (quota counts) before the store
        closes.
        """
        for gate in self.relay.gates:
            stop = getattr(gate, "stop", None)
            if stop is not None:
                try:
                    stop()
                except Exception:
                    self.log.failure("stopping gate {gate!r} failed", gate=gate)
        return result

    def _closeLinks(self, left: int) -> None:
        if left:
            self.log.warn("drain timeout: closing {left} streams still open", left=left)
        for session in list(self.relay.sessions):
            session.carrier.closeLink("relay shutting down")
            # Streams still open are reset now (their visitors get a 502 or
            # a closed connection), not after the close handshake.
            session.link.connectionLost("relay shutting down")
            session.linkLost("relay shutting down")
        for edge in list(self.relay.edges):
            if edge.transport is not None and _isVisitor(edge):
                edge.transport.loseConnection()

    def _visitorConnections(self) -> int:
        return sum(1 for edge in self.relay.edges if _isVisitor(edge))


def _isVisitor(edge: Any) -> bool:
    """
    Whether C{edge} is a visitor's connection (HTTP/1.1, or HTTP/2 with a
    closeWhenIdle of its own), not an agent's link.
    """
    return edge._delegate is None or hasattr(edge._delegate, "closeWhenIdle")


async def _stop(port: IListeningPort) -> None:
    result = port.stopListening()
    if isinstance(result, Deferred):
        await result
