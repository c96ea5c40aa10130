# -*- test-case-name: tests.test_gates -*-
"""
Visitor gates: the relay's one seam for deciding, per HTTP request, whether
a visitor may reach a tunnel.

Every policy that looks at a visitor's request before it is forwarded --
IP rules, rate limits, basic auth, a login for shared tunnels -- is an
L{txtunnel.interfaces.IVisitorGate} in the relay's ordered list (C{Relay.gates}).  The edge
asks each gate in turn; the first that answers (a 401, a 403, a redirect
to a login page) answers the visitor, and the request never reaches the
agent.  A gate sees the tunnel and the agent's bind request, so per-tunnel
settings travel in the bind request and are checked by the same gate that
enforces relay-wide ones.

Gates may take time (a store lookup, a token check); the edge holds the
connection's later requests, paused, until the verdict is in.  A gate that
fails with an exception refuses the request: gates fail closed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger

from txtunnel.http1 import Answer, RequestHead
from txtunnel.interfaces import IVisitorGate

__all__ = ["Answer", "VisitorRequest", "checkGates", "runGates", "validateBind"]

log = Logger()


@attrs.define
class VisitorRequest:
    """
    One visitor request on its way to a tunnel, as gates see it.

    Gates may add headers to what the local service receives (for example
    the logged-in visitor's email) or drop headers it must not see (for
    example a credential the relay has checked); the edge applies both
    when it forwards the head.
    """

    head: RequestHead
    clientIP: str
    scheme: str
    host: bytes
    name: str
    tunnel: Any
    addHeaders: list[tuple[bytes, bytes]] = attrs.field(factory=list)
    dropHeaders: set[bytes] = attrs.field(factory=set)
    #: The visitor's connection (a TLS transport on the HTTPS listener, for
    #: gates that look at the client certificate).
    transport: Any = None
    #: Called with the number of bytes that pass between the visitor and
    #: the tunnel for this request and later ones on the same stream
    #: (heads included, both directions), e.g. to count a bandwidth quota.
    meters: list[Callable[[int], object]] = attrs.field(factory=list)

    @property
    def bindRequest(self) -> dict[str, Any]:
        """
        The agent's bind request for the tunnel: where per-tunnel policy
        settings arrive.
        """
        request = getattr(self.tunnel, "request", None)
        return request if isinstance(request, dict) else {}


def validateBind(gates: Iterable[Any], bindRequest: dict[str, Any]) -> None:
    """
    Let every gate that can refuse bad per-tunnel settings see C{bindRequest}.
    """
    for gate in gates:
        validate = getattr(gate, "validate", None)
        if validate is not None:
            validate(bindRequest)


async def _run(
    gates: Sequence[IVisitorGate], request: VisitorRequest, pending: Deferred[Answer | None] | None = None
) -> Answer | None:
    """
    The rest of L{runGates} once the first of C{gates} has answered with
    C{pending}.
    """
    for gate in gates:
        try:
            result: Answer | Deferred[Answer | None] | None
            if pending is not None:
                result, pending = pending, None
            else:
                result = gate.check(request)
            if isinstance(result, Deferred):
                result = await result
        except Exception:
            return _failed(gate)
        if result is not None:
            return result
    return None


def checkGates(gates: Sequence[IVisitorGate], request: VisitorRequest) -> Answer | None | Deferred[Answer | None]:
    """
    Ask C{gates} in order: the first L{Answer}, or C{None} when all let the
    request by -- or, from the first gate that takes time (returns a
    L{Deferred}), a L{Deferred} that fires with one of those.

    Gates are asked for every request, and nearly always answer at once:
    then this costs no coroutine, no L{Deferred} and no callbacks.
    """
    for i, gate in enumerate(gates):
        try:
            result = gate.check(request)
        except Exception:
            return _failed(gate)
        if isinstance(result, Deferred):
            return ensureDeferred(_run(gates[i:], request, result))
        if result is not None:
            return result
    return None


def runGates(gates: Sequence[IVisitorGate], request: VisitorRequest) -> Deferred[Answer | None]:
    """
    L{checkGates} as a L{Deferred}, which has already fired when every
    gate answered at once.
    """
    result = checkGates(gates, request)
    return result if isinstance(result, Deferred) else succeed(result)


def _failed(gate: IVisitorGate) -> Answer:
    log.failure("visitor gate {gate!r} failed; refusing the request", gate=gate)
    return Answer(500, "the relay could not check this request")
