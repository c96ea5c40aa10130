# -*- test-case-name: tests.test_end_to_end -*-
"""
The agent as a service: a reconnecting link to the relay and its tunnels.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from txtunnel.agent.session import AgentSession
from txtunnel.interfaces import IAgentTunnel, IForwarder
from txtunnel.link import DEFAULT_WINDOW
from txtunnel.tlscontext import LinkClientTLS, linkClientTLS, linkEndpoint
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

    def __repr__(self) -> str:
        return f"<AgentTunnel {self.name} {self.type} -> {self.target}>"


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
    ) -> None:
        self.reactor = reactor
        self.relayURL = relayURL
        self.token = token
        #: A secret that identifies this agent to the relay across
        #: reconnects (and, when kept in a file, across restarts).
        self.key = key or secrets.token_urlsafe(32)
        self.tunnels = tunnels
        self.session: AgentSession | None = None
        self.ready: Deferred[list[AgentTunnel]] = Deferred()
        self.failure: str | None = None
        self.stopping = False
        self._answered: set[str] = set()
        #: Called with the reason when the agent gives up (see L{fatal}).
        self.fatalHooks: list[Callable[[str], object]] = []
        #: TLS settings of a C{wss://} link (C{None}: verify against the
        #: system's roots, no client certificate).
        self.linkTLS: LinkClientTLS | None = None

    def sessionStarted(self, session: AgentSession) -> None:
        self.session = session
        self._answered.clear()

    def sessionEnded(self, session: AgentSession, reason: str) -> None:
        if self.session is session:
            self.session = None
        if self.failure is None and not self.stopping:
            self.log.warn("link to relay lost ({reason}); reconnecting", reason=reason)

    def tunnelBound(self, tunnel: AgentTunnel) -> None:
        self._answer(tunnel)

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
        if self.session is not None:
            self.session.carrier.closeLink("agent stopping")
        for hook in self.fatalHooks:
            hook(reason)
        if not self.ready.called:
            self.ready.errback(RuntimeError(reason))


class AgentService(MultiService):
    """
    A L{ClientService} that keeps the link up (backoff with jitter), under
    the agent's service tree.
    """

    log = Logger()

    def __init__(
        self,
        agent: Agent,
        *,
        keepalive: float = 10.0,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        super().__init__()
        self.agent = agent
        wsURL, _ = relayEndpointString(agent.relayURL)
        factory = LinkClientFactory(
            wsURL,
            lambda link, carrier: AgentSession(agent, link, carrier),
            agent.reactor,
            window=window,
            keepalive=keepalive,
            keepaliveTimeout=keepalive * 2.5,
        )
        factory.onConnectFailed = self._connectFailed
        self.factory = factory
        #: The link's TLS (C{None} for C{ws://}); by default the relay's
        #: certificate is checked against the system's roots.
        self.tls = agent.linkTLS or linkClientTLS(agent.relayURL)
        self.client = ClientService(
            linkEndpoint(agent.reactor, agent.relayURL, self.tls),
            factory,
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=2.0),
            clock=agent.reactor,
        )
        self.client.setServiceParent(self)
        agent.fatalHooks.append(lambda reason: self.client.stopService())

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
        self.agent.stopping = True
        session = self.agent.session
        if session is not None:
            session.goodbye()
            session.carrier.closeLink("agent shutting down")
        return super().stopService()  # type: ignore[no-any-return]
