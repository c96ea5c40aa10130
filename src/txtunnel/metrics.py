# -*- test-case-name: tests.test_admin -*-
"""
Prometheus metrics of a relay or an agent.

Each L{Relay} and L{Agent} owns one L{RelayMetrics} or L{AgentMetrics}, and
each of those its own C{CollectorRegistry}, never the process-wide default
one: several relays in one process (tests, an embedding application) then
keep separate numbers.  Code that has something to count calls a method
here (C{requestDone}, C{limitRejected}, ...); what is already known from
the object graph -- tunnels, links, open streams -- is read when
C{/metrics} is scraped, so it can never drift from the truth.

Every name exported here is listed in C{docs/metrics.rst}; a test checks
that the two agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["AgentMetrics", "RelayMetrics", "methodLabel", "statusClass"]

#: Methods that get their own label value; any other is C{OTHER}, so a
#: visitor cannot make up label values (and series) at will.
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "PRI"},
)

#: Distinct tunnel label values kept; requests of later tunnels are counted
#: under C{OTHER}, so a relay that sees many short-lived random names keeps
#: a bounded number of series.
MAX_TUNNEL_LABELS = 500

#: Request duration buckets, in seconds: from a cached answer on loopback to
#: the response timeout.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

#: Limits that may reject something; their counters start at 0 so a
#: dashboard sees them before the first rejection.
LIMITS = (
    "tunnels-per-link",
    "request-head",
    "tunnels-per-ip",
    "bind-rate",
    "max-streams",
    "ip-rules",
    "rate",
    "quota",
)


def _now(reactor: Any) -> float:
    """
    The reactor's time, or 0 for one that keeps none (a bare MemoryReactor).
    """
    seconds = getattr(reactor, "seconds", None)
    return float(seconds()) if seconds is not None else 0.0


def methodLabel(method: bytes | str) -> str:
    text = method.decode("ascii", "replace") if isinstance(method, bytes) else method
    return text if text in METHODS else "OTHER"


def statusClass(status: int) -> str:
    """
    C{"2xx"} for 204; C{"error"} when there was no status at all.
    """
    if 100 <= status <= 599:
        return f"{status // 100}xx"
    return "error"


class _Live:
    """
    A collector that reads gauges from the running object when scraped.
    """

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()

    def describe(self) -> list[Metric]:
        return []


class _WithoutCreated:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class _StreamBytes:
    """
    Bytes of closed streams by protocol, plus the open ones' counters when
    scraped: the total is exact even for a WebSocket open for days.
    """

    def __init__(self) -> None:
        self.closed: dict[tuple[str, str], int] = {}

    def add(self, protocol: str, sent: int, received: int) -> None:
        for direction, n in (("sent", sent), ("received", received)):
            key = (protocol, direction)
            self.closed[key] = self.closed.get(key, 0) + n


class _Common:
    """
    What the relay's and the agent's metrics share.
    """

    prefix = ""
    #: How the stream directions are named from the visitor's side: on the
    #: relay bytes sent on a stream came I{in} from a visitor.
    directions = {"sent": "in", "received": "out"}

    def __init__(self) -> None:
        p = self.prefix
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            f"{p}_requests",
            "HTTP requests answered, by tunnel, method and status class.",
            ["tunnel", "method", "status_class"],
            registry=self.registry,
        )
        self.duration = Histogram(
            f"{p}_request_duration_seconds",
            "Seconds from a request's head to the end of its response.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.streamsOpened = Counter(
            f"{p}_streams", "Link streams opened, by tunnel protocol.", ["protocol"], registry=self.registry
        )
        self._bytes = _StreamBytes()
        self._tunnelLabels: set[str] = set()
        self._requestCounters: dict[tuple[str, str, int], Any] = {}
        #: Whether an admin site serves these metrics (set by
        #: L{txtunnel.admin.AdminSite}): the agent then follows its HTTP
        #: traffic to count requests even with no inspector or access log.
        self.served = False
        self.registry.register(_Live(self._collectLive))

    def render(self) -> bytes:
        """
        The text exposition format, for C{/metrics}, without the
        C{_created} series (timestamps nobody graphs, which would double
        the page).
        """
        return generate_latest(_WithoutCreated(self.registry))  # type: ignore[arg-type]

    # -- hooks

    def requestDone(self, tunnel: str, method: bytes | str, status: int, seconds: float) -> None:
        if tunnel not in self._tunnelLabels:
            if len(self._tunnelLabels) >= MAX_TUNNEL_LABELS:
                tunnel = "OTHER"
            else:
                self._tunnelLabels.add(tunnel)
        method = methodLabel(method)
        key = (tunnel, method, status // 100 if 100 <= status <= 599 else 0)
        counter = self._requestCounters.get(key)
        if counter is None:
            # prometheus_client's labels() costs more than the increment:
            # one lookup per (tunnel, method, status class), then a dict get.
            # Bounded: tunnels by MAX_TUNNEL_LABELS, methods by METHODS.
            counter = self._requestCounters[key] = self.requests.labels(tunnel, method, statusClass(status))
        counter.inc()
        self.duration.observe(max(0.0, seconds))  # a clock may step back

    def streamOpened(self, protocol: str) -> None:
        self.streamsOpened.labels(protocol).inc()

    def streamClosed(self, protocol: str, sent: int, received: int) -> None:
        self._bytes.add(protocol, sent, received)

    # -- read when scraped

    def liveStreams(self) -> Iterable[tuple[str, Any]]:
        """
        C{(protocol, stream)} for each open stream.
        """
        return ()

    def _collectLive(self) -> Iterator[Metric]:
        p = self.prefix
        totals = dict(self._bytes.closed)
        open_: dict[str, int] = {}
        for protocol, stream in self.liveStreams():
            open_[protocol] = open_.get(protocol, 0) + 1
            for direction, n in (("sent", stream.bytesSent), ("received", stream.bytesReceived)):
                totals[(protocol, direction)] = totals.get((protocol, direction), 0) + n
        streams = GaugeMetricFamily(f"{p}_streams_open", "Link streams open, by tunnel protocol.", labels=["protocol"])
        for protocol, count in sorted(open_.items()):
            streams.add_metric([protocol], count)
        yield streams
        data = CounterMetricFamily(
            f"{p}_bytes",
            "Payload bytes carried by link streams, by tunnel protocol and direction "
            "(in: from visitors toward the local service; out: back to visitors).",
            labels=["protocol", "direction"],
        )
        for (protocol, direction), n in sorted(totals.items()):
            data.add_metric([protocol, self.directions[direction]], n)
        yield data


class RelayMetrics(_Common):
    """
    The relay's metrics; see C{docs/metrics.rst}.
    """

    prefix = "txtunnel_relay"

    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.started = _now(relay.reactor)
        super().__init__()
        p = self.prefix
        self.linksAccepted = Counter(f"{p}_links", "Agent links that completed the hello.", registry=self.registry)
        self.linksLost = Counter(f"{p}_links_lost", "Agent links that ended.", registry=self.registry)
        self.linkRefusals = Counter(
            f"{p}_link_refusals", "Agent links refused, by error code.", ["code"], registry=self.registry
        )
        self.limitRejections = Counter(
            f"{p}_limit_rejections",
            "Requests or binds refused by a limit, by limit.",
            ["limit"],
            registry=self.registry,
        )
        for limit in LIMITS:
            self.limitRejections.labels(limit)
        self.connections: dict[str, int] = {}

    def connectionOpened(self, scheme: str) -> None:
        self.connections[scheme] = self.connections.get(scheme, 0) + 1

    def connectionClosed(self, scheme: str) -> None:
        self.connections[scheme] = self.connections.get(scheme, 1) - 1

    def linkAccepted(self) -> None:
        self.linksAccepted.inc()

    def linkLost(self) -> None:
        self.linksLost.inc()

    def linkRefused(self, code: str) -> None:
        self.linkRefusals.labels(code).inc()

    def limitRejected(self, limit: str) -> None:
        """
        Count one refusal by C{limit} (any short name; policy code adds its own).
        """
        self.limitRejections.labels(limit).inc()

    def liveStreams(self) -> Iterable[tuple[str, Any]]:
        for session in list(self.relay.sessions):
            for stream in list(session.link.streams.values()):
                opened = session.opened.get(stream.id)
                yield (opened[1] if opened is not None else "unknown"), stream

    def _collectLive(self) -> Iterator[Metric]:
        yield from super()._collectLive()
        p = self.prefix
        sessions = [s for s in list(self.relay.sessions) if s.state == "ready"]
        agents = GaugeMetricFamily(f"{p}_agents_connected", "Agents with a link up.")
        agents.add_metric([], len(sessions))
        yield agents
        counts: dict[str, int] = {name: 0 for name in self.relay.forwarders}
        for session in sessions:
            for tunnel in session.tunnels.values():
                if tunnel.binding is not None:
                    counts[tunnel.type] = counts.get(tunnel.type, 0) + 1
        tunnels = GaugeMetricFamily(f"{p}_tunnels", "Tunnels bound, by protocol.", labels=["protocol"])
        for protocol, count in sorted(counts.items()):
            tunnels.add_metric([protocol], count)
        yield tunnels
        connections = GaugeMetricFamily(
            f"{p}_connections_open",
            "Connections open on the public HTTP(S) listeners (agents' links included), by scheme.",
            labels=["scheme"],
        )
        for scheme, count in sorted(self.connections.items()):
            connections.add_metric([scheme], count)
        yield connections


class AgentMetrics(_Common):
    """
    The agent's metrics; see C{docs/metrics.rst}.
    """

    prefix = "txtunnel_agent"
    #: On the agent, bytes sent on a stream go I{out} toward the visitor.
    directions = {"sent": "out", "received": "in"}

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.started = _now(agent.reactor)
        self._everUp = False
        super().__init__()
        p = self.prefix
        self.connects = Counter(
            f"{p}_links", "Links to the relay opened (counted when the hello is sent).", registry=self.registry
        )
        self.reconnects = Counter(
            f"{p}_reconnects", "Links to the relay made again after one was lost.", registry=self.registry
        )
        self.localErrors = Counter(
            f"{p}_local_errors",
            "Streams the local service could not take (refused, unreachable, timed out).",
            ["tunnel"],
            registry=self.registry,
        )

    @property
    def everConnected(self) -> bool:
        """
        Whether a link to the relay was ever up (so a missing one is a
        reconnect).
        """
        return self._everUp

    def linkUp(self) -> None:
        if self._everUp:
            self.reconnects.inc()
        self._everUp = True
        self.connects.inc()

    def localError(self, tunnel: str) -> None:
        self.localErrors.labels(tunnel).inc()

    def liveStreams(self) -> Iterable[tuple[str, Any]]:
        session = self.agent.session
        if session is None:
            return
        for stream in list(session.link.streams.values()):
            tunnel = session.byId.get(stream.header.get("tunnel"))
            yield (tunnel.type if tunnel is not None else "unknown"), stream

    def _collectLive(self) -> Iterator[Metric]:
        yield from super()._collectLive()
        p = self.prefix
        session = self.agent.session
        up = GaugeMetricFamily(f"{p}_connected", "1 while the link to the relay is up and welcomed, else 0.")
        up.add_metric([], 1 if session is not None and session.state != "hello" else 0)
        yield up
        current = getattr(getattr(self.agent, "state", None), "value", None)
        if isinstance(current, str):
            from txtunnel.agent.states import LinkState

            states = GaugeMetricFamily(
                f"{p}_link_state", "1 for the state the link to the relay is in, 0 for the others.", labels=["state"]
            )
            for state in LinkState:
                states.add_metric([state.value], 1 if state.value == current else 0)
            yield states
        counts: dict[str, int] = {}
        for tunnel in self.agent.tunnels:
            counts.setdefault(tunnel.type, 0)
            if tunnel.address:
                counts[tunnel.type] += 1
        tunnels = GaugeMetricFamily(f"{p}_tunnels", "Tunnels bound on the relay, by protocol.", labels=["protocol"])
        for protocol, count in sorted(counts.items()):
            tunnels.add_metric([protocol], count)
        yield tunnels
