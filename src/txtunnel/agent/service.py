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
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from zope.interface import implementer

from txtunnel.agent.session import AgentSession
from txtunnel.interfaces import IAgentTunnel, IForwarder
from txtunnel.link import DEFAULT_WINDOW
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
        #: A login token from 'txtunnel login' for this relay, sent in the hello.
        self.identity: str | None = None
        self.session: AgentSession | None = None
        self.ready: Deferred[list[AgentTunnel]] = Deferred()
        self.failure: str | None = None
        self.stopping = False
        self._answered: set[str] = set()
        #: Called with the reason when the agent gives up (see L{fatal}).
        self.fatalHooks: list[Callable[[str], object]] = []

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
        wsURL, endpoint = relayEndpointString(agent.relayURL)
        factory = LinkClientFactory(
            wsURL,
            lambda link, carrier: AgentSession(agent, link, carrier),
            agent.reactor,
            window=window,
            keepalive=keepalive,
            keepaliveTimeout=keepalive * 2.5,
        )
        self.factory = factory
        self.client = ClientService(
            clientFromString(agent.reactor, endpoint),
            factory,
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=2.0),
            clock=agent.reactor,
        )
        self.client.setServiceParent(self)
        agent.fatalHooks.append(lambda reason: self.client.stopService())

    def startService(self) -> None:
        self.log.info("connecting to relay {relay}", relay=self.agent.relayURL)
        super().startService()

    def stopService(self) -> Deferred[Any]:
        self.agent.stopping = True
        session = self.agent.session
        if session is not None:
            session.goodbye()
            session.carrier.closeLink("agent shutting down")
        return super().stopService()  # type: ignore[no-any-return]
