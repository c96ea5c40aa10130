# -*- test-case-name: tests.test_http_tunnel,tests.test_tcp_tunnel,tests.test_udp,tests.test_tls_passthrough -*-
"""
Helpers every forwarder's relay half needs: claim a name (for name-routed
tunnels such as http and tls) or a port (for port-routed ones such as tcp and
udp) in the relay's store, with the refusals an agent is shown; and the
common agent half that connects a stream to a local TCP service.

They are public so that third-party forwarders get the same behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.error import CannotListenError, ConnectError
from twisted.logger import Logger
from twisted.python.failure import Failure

from txtunnel.errors import BindError
from txtunnel.interfaces import IAgentTunnel, IRelay, IRelayTunnel
from txtunnel.link import Stream
from txtunnel.names import checkName, randomName
from txtunnel.relay.hosts import HostTable
from txtunnel.relay.ports import PortPool
from txtunnel.splice import connectStream

__all__ = ["claimName", "claimPort", "connectOrReset", "nameRequest"]

log = Logger()

#: Random names tried before giving up (a clash is already unlikely).
RANDOM_TRIES = 8


def nameRequest(tunnel: IAgentTunnel) -> dict[str, Any]:
    """
    Agent half of L{claimName}: the bind fields asking for the tunnel's
    C{subdomain}, if it has one.
    """
    name = tunnel.options.get("subdomain")
    return {"name": name} if name else {}


@inlineCallbacks
def claimName(relay: IRelay, table: HostTable, namespace: str, tunnel: IRelayTunnel, what: str) -> Any:
    """
    Give C{tunnel} the name it asked for (C{request["name"]}) or a random
    readable one, claimed in the store under C{namespace} and routed by
    C{table}.

    @param what: how to name the thing in a refusal, e.g. C{"subdomain"}.
    @return: a L{Deferred} firing with the name.
    @raise BindError: for an invalid or taken name.
    """
    asked = tunnel.request.get("name")
    if asked is not None:
        if not isinstance(asked, str):
            raise BindError(f"the {what} must be a string")
        try:
            names = [checkName(asked)]
        except ValueError as e:
            raise BindError(str(e)) from None
    else:
        names = [randomName() for _ in range(RANDOM_TRIES)]
    for name in names:
        if table.get(name) is None:
            claimed = yield relay.store.claim(namespace, name, tunnel.owner)
            if claimed and table.get(name) is None:
                table.add(name, tunnel)
                return name
    if asked is not None:
        raise BindError(f"the {what} {asked!r} is in use on this relay; choose another")
    raise BindError("could not find a free random name; try again")


@inlineCallbacks
def claimPort(
    relay: IRelay,
    pool: PortPool,
    namespace: str,
    tunnel: IRelayTunnel,
    listen: Callable[[int], Any],
) -> Any:
    """
    Find C{tunnel} a public port: the one it asked for (C{request["port"]})
    or the next free one of C{pool}; claim it in the store under
    C{namespace} and call C{listen(port)}, which may return a L{Deferred}
    and may raise L{CannotListenError} (the port is then skipped, or
    refused if it was the one asked for).

    @return: a L{Deferred} firing with C{(port, listen's result)}.
    @raise BindError: naming the range, the port and why.
    """
    kind = namespace.upper()
    requested = tunnel.request.get("port")
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested not in pool:
            raise BindError(f"remote port {requested!r} is outside this relay's {kind} range {pool.low}-{pool.high}")
        if pool.inUse(requested):
            raise BindError(f"remote {kind} port {requested} is in use on this relay")
        candidates = [requested]
    else:
        candidates = list(pool.candidates())
    for port in candidates:
        claimed = yield relay.store.claim(namespace, str(port), tunnel.owner)
        if not claimed:
            if requested is not None:
                raise BindError(f"remote {kind} port {port} is held by another agent")
            continue
        try:
            result = yield maybeDeferred(listen, port)
        except CannotListenError as e:
            yield relay.store.release(namespace, str(port), tunnel.owner)
            if requested is not None:
                raise BindError(
                    f"remote {kind} port {port} cannot be opened on the relay host ({e.socketError})"
                ) from None
            continue
        pool.take(port)
        return (port, result)
    raise BindError(f"no free port left in this relay's {kind} range {pool.low}-{pool.high}")


def connectOrReset(tunnel: IAgentTunnel, stream: Stream) -> Deferred[Any]:
    """
    Agent half for byte-stream tunnels: connect C{stream} to the local TCP
    service; if it cannot be reached, reset the stream with the reason (the
    visitor's connection is then closed at once).
    """
    host, port = tunnel.target
    breaker = getattr(tunnel, "breaker", None)
    if breaker is not None and not breaker.allow():
        wait = max(1, round(breaker.retryAfter()))
        stream.reset("refused", f"local service {host}:{port} is failing; not trying it for {wait}s (circuit open)")
        return succeed(None)
    d = connectStream(tunnel.reactor, tunnel.target, stream)

    def connected(side: Any) -> Any:
        if breaker is not None:
            breaker.success()
        return side

    def failed(f: Failure) -> None:
        if stream.closed:
            return
        reason = f.getErrorMessage() if f.check(ConnectError) else repr(f.value)
        log.warn("cannot reach local service {host}:{port}: {reason}", host=host, port=port, reason=reason)
        if breaker is not None:
            breaker.failure(reason)
        stream.reset("refused", f"local service {host}:{port} unreachable: {reason}")

    return d.addCallbacks(connected, failed)
