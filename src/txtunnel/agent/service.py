# -*- test-case-name: tests.test_relay_agent,tests.test_reconnect -*-
"""
The agent as a service: a reconnecting link to the relay and its tunnels.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.admin import IAdminSubject
from txtunnel.agent.breaker import (
    DEFAULT_BREAKER_COOLDOWN,
    DEFAULT_BREAKER_FAILURES,
    CircuitBreaker,
    HealthCheck,
)
from txtunnel.agent.reclaim import ReclaimFile
from txtunnel.agent.session import AgentSession
from txtunnel.agent.states import Backoff, ClockJumpWatch, LinkState, LinkStates
from txtunnel.drain import DEFAULT_DRAIN_TIMEOUT, drain
from txtunnel.interfaces import IAgentTunnel, IForwarder
from txtunnel.link import DEFAULT_WINDOW, KEEPALIVE_TIMEOUT_FACTOR
from txtunnel.logs import TwistdLogging
from txtunnel.metrics import AgentMetrics, _now
from txtunnel.tlscontext import LinkClientTLS, linkClientTLS, linkEndpoint
from txtunnel.traffic import Traffic
from txtunnel.wslink import LinkClientFactory, relayEndpointString

__all__ = ["Agent", "AgentService", "AgentTunnel"]


@implementer(IAgentTunnel)
class AgentTunnel:
    """
    One tunnel the agent serves, from its configuration.
    """

    def __init__(
        self,
        name: str,
        type: str,
        target: tuple[str, int],
        options: dict[str, Any],
        forwarder: IForwarder,
        reactor: Any,
    ) -> None:
        self.name = name
        self.type = type
        self.target = target
        self.options = options
        self.forwarder = forwarder
        self.reactor = reactor
        self.address: str | None = None
        #: The address the relay gave last, to tell the user if it changes.
        self.lastAddress: str | None = None
        #: What to send back to the relay to get the same address again.
        self.reclaim: dict[str, Any] = {}
        #: Where the HTTP forwarder reports requests (L{txtunnel.traffic}), set by the agent.
        self.traffic: Traffic | None = None
        #: Fails fast (503) while the local service keeps failing.
        self.breaker = CircuitBreaker(
            reactor,
            threshold=int(options.get("breaker-failures", DEFAULT_BREAKER_FAILURES)),
            cooldown=float(options.get("breaker-cooldown", DEFAULT_BREAKER_COOLDOWN)),
            name=name,
        )
        check = options.get("health-check")
        #: Probes the local service on a schedule, when configured.
        self.health: HealthCheck | None = None
        if check:
            self.health = HealthCheck(
                reactor, target, check, self.breaker, interval=float(options.get("health-interval", 10.0))
            )

    @property
    def randomAddress(self) -> bool:
        """
        Whether the relay picks this tunnel's name or port (no
        C{--subdomain} or C{--remote-port}): then only C{reclaim} gets the
        same address back.
        """
        return not any(self.options.get(k) for k in ("subdomain", "remote-port"))

    def __repr__(self) -> str:
        return f"<AgentTunnel {self.name} {self.type} -> {self.target}>"


@implementer(IAdminSubject)
class Agent:
    """
    What the agent's parts share: its tunnels and how it reacts to the relay.

    @ivar ready: fires (once) when every tunnel has an answer from the
        relay, with the list of bound tunnels.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        relayURL: str,
        token: str | None,
        tunnels: list[AgentTunnel],
        key: str | None = None,
        reclaims: ReclaimFile | None = None,
    ) -> None:
        self.reactor = reactor
        self.relayURL = relayURL
        self.token = token
        #: A secret that identifies this agent to the relay across
        #: reconnects (and, when kept in a file, across restarts).
        self.key = key or secrets.token_urlsafe(32)
        self.tunnels = tunnels
        #: Where the random addresses' C{reclaim} fields are kept across
        #: restarts (next to the key file), or C{None}.
        self.reclaims = reclaims
        if reclaims is not None:
            for tunnel in tunnels:
                if tunnel.randomAddress:
                    tunnel.reclaim = reclaims.load(relayURL, tunnel.type, tunnel.name)
        #: A login token from 'txtunnel login' for this relay, sent in the hello.
        self.identity: str | None = None
        #: Reads the stored login token again before each connection, so a
        #: long-running agent picks up a renewed 'txtunnel login' (and stops
        #: sending one that expired); C{None} keeps L{identity} as set.
        self.identitySource: Callable[[], str | None] | None = None
        self.session: AgentSession | None = None
        self.ready: Deferred[list[AgentTunnel]] = Deferred()
        self.failure: str | None = None
        self.stopping = False
        self._answered: set[str] = set()
        #: Called with the reason when the agent gives up (see L{fatal}).
        self.fatalHooks: list[Callable[[str], object]] = []
        #: This agent's own metrics registry (see L{txtunnel.metrics}).
        self.metrics = AgentMetrics(self)
        #: Requests seen by HTTP tunnels, for the inspector, console and metrics.
        self.traffic = Traffic(reactor, metrics=self.metrics)
        for tunnel in tunnels:
            tunnel.traffic = self.traffic
        #: TLS settings of a C{wss://} link (C{None}: verify against the
        #: system's roots, no client certificate).
        self.linkTLS: LinkClientTLS | None = None
        #: The link's connection state machine; a status console or metrics
        #: read C{states.state} or add to C{states.observers}.
        self.states = LinkStates(relayURL)

    @property
    def state(self) -> LinkState:
        """
        Where the link to the relay is now (see L{LinkState}).
        """
        return self.states.state

    def loginToken(self) -> str | None:
        """
        The login token to send in the next hello: read again from where
        'txtunnel login' keeps it, when the agent knows where that is.
        """
        if self.identitySource is not None:
            try:
                self.identity = self.identitySource()
            except Exception as e:
                self.log.warn("cannot read the stored login token: {why}", why=str(e))
                self.identity = None
        return self.identity

    def sessionStarted(self, session: AgentSession) -> None:
        self.session = session
        self._answered.clear()
        self.states.event("opened")
        self.metrics.linkUp()

    def sessionWelcomed(self, session: AgentSession) -> None:
        self.states.event("welcomed")

    def isReady(self) -> tuple[bool, str]:
        """
        Ready while the link is up and at least one tunnel is bound.
        """
        if self.failure is not None:
            return False, self.failure
        if self.stopping:
            return False, "draining: shutting down"
        if self.session is None or self.session.state == "hello":
            return False, "not connected to the relay"
        if not any(t.address for t in self.tunnels):
            return False, "no tunnel bound yet"
        return True, "connected"

    def stats(self) -> dict[str, Any]:
        """
        The link and the tunnels, for the admin C{/stats} page.
        """
        session = self.session
        return {
            "relay": self.relayURL,
            "state": self.state.value,
            "streams": len(session.link.streams) if session is not None else 0,
            "tunnels": [
                {"name": t.name, "type": t.type, "target": f"{t.target[0]}:{t.target[1]}", "address": t.address}
                for t in self.tunnels
            ],
            "uptime": round(_now(self.reactor) - self.metrics.started, 3),
        }

    def sessionEnded(self, session: AgentSession, reason: str) -> None:
        if self.session is session:
            self.session = None
        if self.failure is None and not self.stopping:
            self.log.warn("link to relay lost ({reason}); reconnecting", reason=reason)
            self.states.event("lost", reason=reason)

    def tunnelBound(self, tunnel: AgentTunnel) -> None:
        self._answer(tunnel)

    def reclaimChanged(self, tunnel: AgentTunnel) -> None:
        """
        The relay gave C{tunnel} new C{reclaim} fields (or they were
        dropped): keep them for the next start of this agent.
        """
        if self.reclaims is not None and tunnel.randomAddress:
            self.reclaims.save(self.relayURL, tunnel.type, tunnel.name, tunnel.reclaim)

    def tunnelRefused(self, tunnel: AgentTunnel, reason: str) -> None:
        self._answered.add(tunnel.name)
        if len(self._answered) == len(self.tunnels) and not any(t.address for t in self.tunnels):
            self.fatal(f"no tunnel could be opened: {reason}")
        else:
            self._answer(tunnel)

    def _answer(self, tunnel: AgentTunnel) -> None:
        self._answered.add(tunnel.name)
        if len(self._answered) == len(self.tunnels) and not self.ready.called:
            self.ready.callback([t for t in self.tunnels if t.address])

    def fatal(self, reason: str) -> None:
        """
        Something retrying cannot fix (a bad token, every tunnel refused).
        """
        if self.failure is not None:
            return
        self.failure = reason
        self.log.critical("agent stopping: {reason}", reason=reason)
        self.states.event("close", reason=reason)
        if self.session is not None:
            self.session.carrier.closeLink("agent stopping")
        for hook in self.fatalHooks:
            hook(reason)
        if not self.ready.called:
            self.ready.errback(RuntimeError(reason))


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """
    The relay's endpoint, telling the agent's state machine about each
    attempt and each failure to connect (the L{ClientService} reports
    neither).
    """

    def __init__(self, endpoint: IStreamClientEndpoint, agent: Agent, onFailure: Callable[[], object]) -> None:
        self.endpoint = endpoint
        self.agent = agent
        self.onFailure = onFailure

    def __repr__(self) -> str:
        # Twisted's ClientService names the endpoint in its retry lines.
        return f"<relay {getattr(self.agent, 'relayURL', self.endpoint)}>"

    def connect(self, factory: Any) -> Deferred[Any]:
        self.agent.states.event("attempt")
        d = self.endpoint.connect(factory)

        def failed(f: Failure) -> Failure:
            self.agent.states.event("failed", reason=f.getErrorMessage())
            self.onFailure()
            return f

        return d.addErrback(failed)


class AgentService(TwistdLogging, MultiService):
    """
    A L{ClientService} that keeps the link up (backoff with jitter), under
    the agent's service tree.

    @ivar backoff: the reconnect delays and attempt limit.
    @ivar drainTimeout: seconds L{stopService} lets streams in flight finish.
    """

    log = Logger()

    def __init__(
        self,
        agent: Agent,
        *,
        keepalive: float = 10.0,
        window: int = DEFAULT_WINDOW,
        admin: str = "",
        adminToken: str | None = None,
        adminDefaulted: bool = False,
        inspect: str = "",
        inspectDefaulted: bool = False,
        accessLog: bool = False,
        backoff: Backoff | None = None,
        drainTimeout: float = DEFAULT_DRAIN_TIMEOUT,
        clockWatch: bool = True,
    ) -> None:
        super().__init__()
        self.agent = agent
        self.keepalive = keepalive
        self.backoff = backoff if backoff is not None else Backoff()
        self.drainTimeout = drainTimeout
        #: Endpoints of the admin site and the inspector ("" for none), and
        #: whether each is the default (then a taken port moves on).
        self.admin = (admin, adminDefaulted)
        self.adminToken = adminToken
        self.inspect = (inspect, inspectDefaulted)
        self.listening: list[Any] = []
        #: Ports the admin site and the inspector listen on, once they do.
        self.adminPort: int | None = None
        self.inspectPort: int | None = None
        #: Fires once the admin site and the inspector listen (or failed to).
        self.sitesReady: Deferred[None] = succeed(None)
        if inspect:
            agent.traffic.keep = True
        agent.traffic.accessLog = accessLog
        wsURL, _ = relayEndpointString(agent.relayURL)
        factory = LinkClientFactory(
            wsURL,
            lambda link, carrier: AgentSession(agent, link, carrier),
            agent.reactor,
            window=window,
            keepalive=keepalive,
            keepaliveTimeout=keepalive * KEEPALIVE_TIMEOUT_FACTOR,
        )
        factory.onConnectFailed = self._connectFailed
        # A link that closes before its session starts (refused handshake)
        # is a failed attempt too.
        factory.onLinkLost = self._handshakeLost
        self.factory = factory
        #: The link's TLS (C{None} for C{ws://}); by default the relay's
        #: certificate is checked against the system's roots.
        self.tls = agent.linkTLS or linkClientTLS(agent.relayURL)
        self.client = ClientService(
            _WatchedEndpoint(linkEndpoint(agent.reactor, agent.relayURL, self.tls), agent, self._checkAttempts),
            factory,
            retryPolicy=lambda failed: self.backoff.delay(max(1, agent.states.failures)),
            clock=agent.reactor,
        )
        self.client.setServiceParent(self)
        agent.fatalHooks.append(lambda reason: self.client.stopService())
        agent.states.observers.append(self._stateChanged)
        self.clockWatch: ClockJumpWatch | None = None
        if clockWatch and keepalive > 0:
            self.clockWatch = ClockJumpWatch(agent.reactor, self._clockJumped)

    def _handshakeLost(self, carrier: Any, code: int | None, reason: str | None) -> None:
        self.agent.states.event("failed", reason=reason or f"closed ({code})")
        self._checkAttempts()

    def _stateChanged(self, old: LinkState, new: LinkState, event: str, info: dict[str, Any]) -> None:
        if new is LinkState.RECONNECTING and event == "lost":
            self._checkAttempts()

    def _checkAttempts(self) -> None:
        """
        Give up once the configured number of attempts in a row have failed.
        """
        failures = self.agent.states.failures
        if self.backoff.exhausted(failures) and not self.agent.stopping:
            self.agent.fatal(f"gave up after {failures} failed attempts to reach the relay")

    def _clockJumped(self, seconds: float) -> None:
        """
        After a sleep: check a link that looks up at once, and do not sit
        out the rest of a backoff wait that began before the sleep (the
        network has likely changed since): dial again now.
        """
        session = self.agent.session
        if session is not None:
            timeout = min(self.keepalive, 5.0)
            self.log.info(
                "probing the link to the relay: it is closed unless it answers within {timeout:g}s", timeout=timeout
            )
            session.link.probe(timeout)

            def verdict() -> None:
                # The probe closes a silent link itself; say so when it did not.
                if self.agent.session is session and not session.link.closed:
                    self.log.info("the link to the relay answered the probe; it stays up")

            self.agent.reactor.callLater(timeout + 0.1, verdict)
        elif self.reconnectNow():
            self.log.info("woke from sleep while waiting to reconnect; reconnecting now")

    def reconnectNow(self) -> bool:
        """
        Cut short a backoff wait and dial the relay at once (after a sleep,
        or when a user or a test asks).

        @return: whether a wait was cut short (C{False} unless the link is
            C{reconnecting} and the agent is not stopping).
        """
        if self.agent.state is not LinkState.RECONNECTING or not self.client.running or self.agent.stopping:
            return False
        restarted = self.client.stopService()

        def again(_: object) -> None:
            if self.running and not self.agent.stopping and not self.client.running:
                self.client.startService()

        restarted.addCallback(again)
        return True

    def startService(self) -> None:
        tls = self.tls
        if tls is not None and tls.insecure:
            self.log.warn(
                "*** --insecure: the relay's TLS certificate is NOT verified. Anyone between this agent and "
                "{relay} can pose as the relay and read or change every tunnel's traffic. Use it for "
                "development only; give --ca FILE for a relay with a private CA. ***",
                relay=self.agent.relayURL,
            )
        self.log.info("connecting to relay {relay}", relay=self.agent.relayURL)
        super().startService()
        if self.clockWatch is not None:
            self.clockWatch.start()
        for tunnel in self.agent.tunnels:
            if tunnel.health is not None:
                tunnel.health.start()
        self.sitesReady = self._listen()

    @inlineCallbacks
    def _listen(self) -> Any:
        from txtunnel.admin import AdminSite
        from txtunnel.inspector import InspectorSite
        from txtunnel.relay.service import listenWithFallback

        sites = (
            ("admin", self.admin, lambda: AdminSite(self.agent, self.adminToken), "admin endpoint on"),
            ("inspector", self.inspect, lambda: InspectorSite(self.agent), "traffic inspector on"),
        )
        for what, (endpoint, defaulted), site, says in sites:
            if not endpoint:
                continue
            try:
                port = yield listenWithFallback(self.agent.reactor, endpoint, site(), defaulted, what)
            except Exception as e:
                self.log.error("cannot start the {what} on {endpoint}: {error}", what=what, endpoint=endpoint, error=e)
                continue
            if not self.running:
                yield port.stopListening()
                return
            self.listening.append(port)
            host = port.getHost()
            number = getattr(host, "port", None)
            setattr(self, "adminPort" if what == "admin" else "inspectPort", number)
            self.log.info(
                "{says} http://{host}:{port}/", says=says, host=getattr(host, "host", "?"), port=number, what=what
            )

    def _connectFailed(self, reason: Any) -> None:
        """
        A link that failed before it was up: say why when TLS is the
        reason.  A relay whose certificate cannot be verified is fatal
        until the agent has once connected (a wrong --ca or host name will
        not fix itself); after that it is logged and retried, since a
        relay may be renewing its certificate.
        """
        from OpenSSL import SSL
        from service_identity import VerificationError

        tls = self.tls
        if tls is None or not reason.check(SSL.Error, VerificationError) or self.agent.stopping:
            return
        why = tls.describe(reason)
        message = f"cannot verify the relay {self.agent.relayURL}: {why}"
        if "verify" in why or isinstance(reason.value, VerificationError) or tls.lastError:
            message += " (give --ca FILE if it uses a private CA; --insecure skips the check, for development only)"
        if self.agent.ready.called:
            self.log.error("{message}; retrying", message=message)
        else:
            self.agent.fatal(message)

    def stopService(self) -> Deferred[Any]:
        """
        Say goodbye (the relay stops routing new visitors here and lets
        idle connections go), let the streams in flight finish for up to
        C{drainTimeout} seconds, then close the link and stop; the admin
        site and the inspector stay up until then.
        """
        d: Deferred[Any] = maybeDeferred(self._drainAndStop)
        return d.addBoth(self._stopSites)

    def _stopSites(self, result: Any) -> Deferred[Any]:
        ports, self.listening = self.listening, []
        stopped = DeferredList([maybeDeferred(port.stopListening) for port in ports])
        return stopped.addCallback(lambda _: result)

    def _drainAndStop(self) -> Deferred[Any]:
        self.agent.stopping = True
        if self.clockWatch is not None:
            self.clockWatch.stop()
        for tunnel in self.agent.tunnels:
            if tunnel.health is not None:
                tunnel.health.stop()
        session = self.agent.session
        if session is None:
            self.agent.states.event("close", reason="shutting down")
            return super().stopService()  # type: ignore[no-any-return]
        # Not closed yet: streams still flow until the drain is over.
        self.agent.states.event("drain", reason="shutting down")
        session.goodbye()
        for tunnel in self.agent.tunnels:
            # The relay frees the addresses on goodbye: nothing to reclaim.
            tunnel.reclaim = {}
            self.agent.reclaimChanged(tunnel)

        def openStreams() -> int:
            if self.agent.session is not session or session.link.closed:
                return 0
            return session.link.finiteStreams()

        d = drain(self.agent.reactor, openStreams, self.drainTimeout)

        def drained(left: int) -> Deferred[Any]:
            if left:
                self.log.warn("drain timeout: closing {left} streams still open", left=left)
            if not session.link.closed:
                session.carrier.closeLink("agent shutting down")
            self.agent.states.event("close", reason="drained" if not left else f"drain timeout, {left} streams cut")
            return super(AgentService, self).stopService()  # type: ignore[no-any-return]

        return d.addCallback(drained)
