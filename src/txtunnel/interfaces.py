"""
The extension points of txtunnel.

L{IForwarder} is the one interface a protocol implements.  A forwarder is a
Twisted plugin: a module in any C{twisted/plugins/} directory on C{sys.path}
that holds an object providing both C{IPlugin} and L{IForwarder}.  The relay
and the agent find forwarders with C{getPlugins(IForwarder)}
(L{txtunnel.plugins}); requests to an C{http} tunnel go to whichever
forwarder claims them (C{handlesRequest}, see L{IForwarder}).  What the core
still knows by name is listed in C{docs/forwarders.rst} ("What a third party
can do").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from collections.abc import Iterable

    from twisted.internet.defer import Deferred

    from txtunnel.gates import VisitorRequest
    from txtunnel.http1 import Answer

__all__ = [
    "IAgentTunnel",
    "IBinding",
    "IForwarder",
    "ILinkCarrier",
    "IRelay",
    "IRelayTunnel",
    "IStore",
    "IVisitorGate",
]


class ILinkCarrier(Interface):
    """
    What carries a L{txtunnel.link.Link}'s bytes: a WebSocket connection in
    production, a list in unit tests.
    """

    def sendLinkBytes(data: bytes) -> None:
        """
        Send encoded frames to the peer, in order.
        """

    def closeLink(reason: str) -> None:
        """
        Close the carrier, telling the peer C{reason} if the carrier can.
        """


class IBinding(Interface):
    """
    A tunnel's public side on the relay, as set up by a forwarder.

    A binding may also have, optionally, C{claim}: the C{(namespace, key)}
    of the store claim it holds, which the relay keeps for the agent during
    the grace period after its link drops; and C{reclaim}: a C{dict} of
    fields the agent sends back in its bind request after a reconnect to get
    the same address (e.g. C{{"name": "brave-otter-1234"}}).
    """

    address = Attribute("The public address as a URL string, e.g. C{'tcp://127.0.0.1:20005'}.")

    def close() -> Deferred[None] | None:
        """
        Stop accepting public traffic for this tunnel and free its name or port.
        """


class IRelayTunnel(Interface):
    """
    A tunnel as the relay half of a forwarder sees it.
    """

    id = Attribute("The tunnel's id on its link (an C{int}).")
    type = Attribute("The forwarder name the agent asked for, e.g. C{'http'}.")
    owner = Attribute("Who holds the tunnel: a stable key for the agent's credentials.")
    request = Attribute("The bind request from the agent (a C{dict}).")

    def openStream(header: dict[str, Any], protocol: Any) -> Any:
        """
        Open a stream to the agent for this tunnel and attach C{protocol} to it.

        @return: the L{txtunnel.link.Stream}.
        @raise twisted.internet.error.ConnectionLost: if the link is gone.
        """


class IRelay(Interface):
    """
    What the relay offers to the relay half of a forwarder.
    """

    reactor = Attribute("The reactor.")
    domain = Attribute("The relay's domain, e.g. C{'localhost'}.")
    store = Attribute("The relay's L{IStore}.")
    hosts = Attribute("The L{txtunnel.relay.hosts.HostTable} routing HTTP Host names to tunnels.")
    ports = Attribute("The L{txtunnel.relay.ports.PortPool} of public TCP ports.")
    udpPorts = Attribute("The L{txtunnel.relay.ports.PortPool} of public UDP ports (C{--udp-ports}).")
    tlsHosts = Attribute(
        "The L{txtunnel.relay.hosts.HostTable} routing TLS server names (SNI) to tunnels on the TLS port."
    )
    tlsPort = Attribute("The port of the relay's TLS passthrough listener (an C{int}), or C{None} if it has none.")
    settings = Attribute("The relay's parsed options (a C{dict}).")
    publicInterface = Attribute("The address TCP/UDP tunnel ports listen on, e.g. C{'127.0.0.1'}.")
    publicHost = Attribute("The host name to put in C{tcp://} and C{udp://} addresses.")
    gates = Attribute(
        "The relay's ordered list of L{txtunnel.gates.IVisitorGate}s that every visitor request to an HTTP tunnel"
        " passes before it is forwarded."
    )

    def httpURL(name: str) -> str:
        """
        The public URL of the HTTP virtual host C{name}.
        """


class IAgentTunnel(Interface):
    """
    A tunnel as the agent half of a forwarder sees it.
    """

    name = Attribute("The tunnel's name in the agent's configuration.")
    type = Attribute("The forwarder name, e.g. C{'http'}.")
    target = Attribute("The local service: C{(host, port)}.")
    options = Attribute("Extra settings for the forwarder (a C{dict}).")
    reactor = Attribute("The reactor.")
    breaker = Attribute(
        "The tunnel's L{txtunnel.agent.breaker.CircuitBreaker}: C{allow()} before trying the local service,"
        " C{success()}/C{failure(reason)} after, C{retryAfter()} seconds while it is open."
    )
    traffic = Attribute(
        "The agent's L{txtunnel.traffic.Traffic} (inspector, access log, request metrics), or C{None}:"
        " C{follow(tunnelName)} gives a L{txtunnel.traffic.Follower} to feed one HTTP/1.1 connection's bytes."
    )


class IForwarder(Interface):
    """
    One protocol that txtunnel can tunnel.  It has a relay half (L{bind}: how
    public traffic for a tunnel is accepted) and an agent half (L{connect}:
    how one stream reaches the local service).

    A forwarder may also have, optionally:

     - C{handlesRequest(head) -> bool}: called by the relay's edges with
       each visitor request (a L{txtunnel.http1.RequestHead}; C{version}
       is C{"2"} from the HTTP/2 edge) to an C{http} tunnel; C{True} claims
       it, and its stream goes to this forwarder's L{connect} on the agent
       instead of the C{http} forwarder's (L{txtunnel.plugins.requestForwarder}).
       Over HTTP/1.1 the stream carries the visitor's connection from that
       request on, as bytes.  It must be quick and must not block: it runs
       for every request.
     - C{wire}: C{"h2"} if the requests it takes from the relay's HTTP/2
       edge should come as HTTP/2 messages (L{txtunnel.h2messages}, as
       gRPC needs); otherwise (the default, C{"http/1.1"}) they come as
       HTTP/1.1 bytes.
     - C{settings}: a sequence of L{txtunnel.plugins.Setting} (key, coerce
       function, default, one-line doc): the C{[tunnel:NAME]} keys a
       tunnel of this type takes besides the ones every tunnel has
       (C{type}, C{target}, C{subdomain}, ...).  The agent refuses any
       other key; a coerced value is C{tunnel.options[key]}.  Without it
       the type has only the shared keys.
     - C{checkSettings(options, where) -> None}: called once per tunnel of
       this type when the agent reads its configuration, after every
       setting is coerced, with the tunnel's options C{dict} (which it may
       change: e.g. read two files named by two settings into one value)
       and C{where(key)}, how the user wrote C{key} (C{"--tls-cert"},
       C{"agent.ini [tunnel:web] tls-cert"}); raises C{ValueError} with a
       whole message (that names the keys with C{where}) to refuse.
    """

    name = Attribute("The name agents use to ask for it, e.g. C{'tcp'}; a C{str}.")
    description = Attribute("One line for help text and docs.")

    def bindRequest(tunnel: IAgentTunnel) -> dict[str, Any]:
        """
        Agent half: the fields to send to the relay in the bind request for
        C{tunnel} (for example the subdomain or remote port asked for).
        """

    def bind(relay: IRelay, tunnel: IRelayTunnel) -> Deferred[IBinding] | IBinding:
        """
        Relay half: give C{tunnel} a public address.

        @raise txtunnel.errors.BindError: to refuse, with a reason the agent
            is shown (name taken, port out of range, ...).
        """

    def connect(tunnel: IAgentTunnel, stream: Any) -> None:
        """
        Agent half: carry C{stream} (a L{txtunnel.link.Stream}, paused) to the
        local service.  The forwarder attaches a protocol to the stream and
        resumes it when it is ready for bytes.
        """


class IStore(Interface):
    """
    What the relay must remember, behind one small interface so that a
    cluster can keep it somewhere shared (Redis) without touching routing.

    Every method returns a L{Deferred}.
    """

    def claim(namespace: str, key: str, owner: str) -> Deferred[bool]:
        """
        Take C{key} in C{namespace} (e.g. C{"http"}, C{"demo"}) for C{owner}.

        @return: C{True} if C{owner} now holds it (also when it already
            did), C{False} if someone else holds it.
        """

    def release(namespace: str, key: str, owner: str) -> Deferred[None]:
        """
        Give C{key} up if C{owner} holds it.
        """

    def owner(namespace: str, key: str) -> Deferred[str | None]:
        """
        Who holds C{key}, if anyone.
        """

    def hold(namespace: str, key: str, owner: str, until: float) -> Deferred[None]:
        """
        Keep C{key} for C{owner} until the wall-clock time C{until} although
        no tunnel uses it: the grace period after an agent's link drops.  A
        L{claim} by the same owner takes it back; after C{until} anyone may.
        """

    def holdAll(until: float) -> Deferred[None]:
        """
        At start-up: every claim left by live tunnels of the previous run is
        held until C{until}; holds that have expired are dropped.
        """

    def releaseAll(namespace: str) -> Deferred[None]:
        """
        Drop every claim in C{namespace}; used at start-up for claims that
        lived only as long as the process that made them.
        """

    def identify(emails: Iterable[str]) -> Deferred[str]:
        """
        The identity (a set of verified emails) that C{emails}, proven
        together by one login, belong to; identities that share an email
        merge.  Used by shared tunnels (L{txtunnel.relay.login}).
        """

    def emailsOf(email: str) -> Deferred[list[str]]:
        """
        Every verified email of the identity C{email} belongs to.
        """

    def putTicket(namespace: str, key: str, value: dict[str, Any], expires: float) -> Deferred[None]:
        """
        Keep a short-lived value (a login hand-off, a device code) until
        the wall-clock time C{expires}.
        """

    def getTicket(namespace: str, key: str) -> Deferred[dict[str, Any] | None]:
        """
        The unexpired value under C{key}, left in place.
        """

    def takeTicket(namespace: str, key: str) -> Deferred[dict[str, Any] | None]:
        """
        The unexpired value under C{key}, removed, so that it is good once.
        """


class IVisitorGate(Interface):
    """
    A check on visitor requests (a L{txtunnel.gates.VisitorRequest}) to HTTP tunnels, run by the relay's edge.

    A gate may also provide C{validate(bindRequest: dict) -> None}, called
    when an agent binds a tunnel, raising L{txtunnel.errors.BindError} for
    per-tunnel settings it cannot accept (a bad CIDR, say), so a mistake is
    reported to the agent and never becomes an open tunnel.
    """

    def check(request: VisitorRequest) -> Answer | None | Deferred[Answer | None]:
        """
        Decide on C{request}: C{None} lets it go on (to the next gate, then
        the tunnel); a L{txtunnel.http1.Answer} is sent to the visitor instead.
        """
