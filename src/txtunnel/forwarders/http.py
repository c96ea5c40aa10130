# -*- test-case-name: tests.test_http_tunnel,tests.test_streaming,tests.test_websocket -*-
"""
HTTP tunnels: C{NAME.<domain>} on the relay's public HTTP(S) listeners.

The relay's edge (L{txtunnel.relay.edge}) routes requests by C{Host} and
streams them here byte for byte; this forwarder claims the name on the relay
and, on the agent, connects each stream to the local web server, answering
502 or 504 itself when that server cannot.

Bytes pass both ways as they come, each write forwarded at once: nothing is
buffered, so WebSocket frames and streamed responses (SSE, NDJSON,
C{multipart/x-mixed-replace}) reach the visitor when the server writes them.
The agent follows the requests and responses on each stream (heads parsed,
bodies counted, see L{txtunnel.sse.SSEHeartbeat}) to stop the response
timer once a connection has switched protocols and to keep idle event
streams alive with a heartbeat comment.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionRefusedError, TimeoutError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.claims import claimName, nameRequest
from txtunnel.config import positiveFloat
from txtunnel.errors import BindError
from txtunnel.http1 import Answer, BodyBytes, HTTPError, RawBytes, RequestEnd, RequestFramer, RequestHead, errorResponse
from txtunnel.interfaces import IAgentTunnel, IBinding, IForwarder, IRelay, IRelayTunnel
from txtunnel.link import Stream
from txtunnel.names import checkName
from txtunnel.plugins import Setting
from txtunnel.relay.pool import Pool, PooledBinding, poolOwner
from txtunnel.rewrite import ResponseHeadRewriter
from txtunnel.splice import SocketSide, StreamSide, connectStream
from txtunnel.sse import DEFAULT_INTERVAL, SSEHeartbeat
from txtunnel.webhooks import MAX_BODY, WebhookVerifier, dechunk, parseVerifier

__all__ = ["HTTPForwarder", "RequestSide"]

log = Logger()

#: Seconds the local service may take to start answering a request.
DEFAULT_RESPONSE_TIMEOUT = 120.0


def refuseOpenCircuit(tunnel: IAgentTunnel, stream: Stream, breaker: Any) -> None:
    """
    Answer 503 at once while the tunnel's circuit breaker is open: the
    local service has been failing, and trying it again would only make
    this visitor wait for the same failure.
    """
    host, port = tunnel.target
    wait = max(1, math.ceil(breaker.retryAfter()))
    reason = f"the local service at {host}:{port} is failing; not trying it for {wait}s (circuit open)"
    stream.attach(Protocol())
    stream.write(Answer(503, reason, [("Retry-After", str(wait))]).toBytes())
    stream.loseConnection()


@inlineCallbacks
def joinPool(relay: IRelay, tunnel: IRelayTunnel) -> Any:
    """
    Bind C{tunnel} into the pool serving the name it asks for, making the
    pool if there is none yet; the pool key's hash owns the name's claim.
    """
    owner = poolOwner(tunnel.request.get("pool"))
    asked = tunnel.request.get("name")
    if not isinstance(asked, str):
        raise BindError("a pooled tunnel needs a subdomain: every agent of the pool asks for the same one")
    try:
        name = checkName(asked)
    except ValueError as e:
        raise BindError(str(e)) from None
    current = relay.hosts.get(name)
    if current is None:
        claimed = yield relay.store.claim("http", name, owner)
        current = relay.hosts.get(name)
        if current is None:
            if not claimed:
                raise BindError(f"the subdomain {name!r} is in use on this relay; choose another")
            current = Pool(name, owner)
            relay.hosts.add(name, current)
    if not isinstance(current, Pool) or not current.admits(owner):
        raise BindError(f"the subdomain {name!r} is in use on this relay by another agent or pool")
    current.add(tunnel)
    return PooledBinding(relay, tunnel, current)


@implementer(IBinding)
class HTTPBinding:
    def __init__(self, relay: IRelay, tunnel: IRelayTunnel, name: str) -> None:
        self.relay = relay
        self.tunnel = tunnel
        self.name = name
        self.address = relay.httpURL(name)
        self.claim = ("http", name)
        self.reclaim = {"name": name}

    def close(self) -> Any:
        self.relay.hosts.remove(self.name, self.tunnel)
        return self.relay.store.release("http", self.name, self.tunnel.owner)


class _Watch:
    """
    The response timer of one agent-side HTTP stream: armed by request bytes,
    disarmed by response bytes.  When it fires before the local service has
    said anything, the visitor gets a 504.
    """

    def __init__(
        self, tunnel: IAgentTunnel, stream: Stream, timeout: float, heartbeat: SSEHeartbeat, follower: Any = None
    ) -> None:
        self.tunnel = tunnel
        #: The agent's L{txtunnel.traffic.Follower} for this connection, if it follows traffic.
        self.follower = follower
        self.stream = stream
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.answered = False
        self.call: IDelayedCall | None = None
        #: When the local service must have answered by (the reactor's
        #: seconds), while request bytes wait for an answer.
        self.deadline: float | None = None
        self.socket: SocketSide | None = None

    def requestBytes(self) -> None:
        if self.timeout <= 0 or self.heartbeat.switched:
            # After a switch (WebSocket, CONNECT) a quiet server is fine.
            return
        # The timer is lazy: request bytes move the deadline and response
        # bytes clear it, and the one delayed call of the connection, when
        # it comes, looks at the deadline (no callLater and cancel per
        # request on a busy keep-alive connection).
        self.deadline = self.tunnel.reactor.seconds() + self.timeout
        if self.call is None:
            self.call = self.tunnel.reactor.callLater(self.timeout, self._check)

    def responseBytes(self) -> None:
        if not self.answered:
            breaker = getattr(self.tunnel, "breaker", None)
            if breaker is not None:
                breaker.success()
            self.answered = True
        self.deadline = None

    def cancel(self) -> None:
        self.deadline = None
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def _check(self) -> None:
        self.call = None
        if self.deadline is None:
            return
        left = self.deadline - self.tunnel.reactor.seconds()
        if left > 0:
            self.call = self.tunnel.reactor.callLater(left, self._check)
            return
        self.expired()

    def expired(self) -> None:
        self.call = None
        self.deadline = None
        host, port = self.tunnel.target
        reason = f"the local service at {host}:{port} did not answer within {self.timeout:g}s"
        breaker = getattr(self.tunnel, "breaker", None)
        if breaker is not None and not self.answered:
            breaker.failure(reason)
        if not self.answered:
            self.stream.write(errorResponse(504, reason))
            self.stream.loseConnection()
        else:
            self.stream.reset("timeout", reason)
        if self.socket is not None and self.socket.transport is not None:
            self.socket.transport.abortConnection()  # type: ignore[attr-defined]


class _RequestSide(StreamSide):
    def __init__(self, watch: _Watch, rewriter: ResponseHeadRewriter | None = None) -> None:
        super().__init__()
        self.watch = watch
        self.rewriter = rewriter

    def dataReceived(self, data: bytes) -> None:
        if self.rewriter is not None:
            self.rewriter.requestData(data)
        heartbeat = self.watch.heartbeat
        events = heartbeat.requestData(data)
        if self.watch.follower is not None:
            self.watch.follower.requestEvents(events, heartbeat.lost)
        self.watch.requestBytes()
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.watch.cancel()
        self.watch.heartbeat.stop()
        if self.watch.follower is not None:
            self.watch.follower.connectionLost()
        super().connectionLost(reason)


class _VerifyingRequestSide(_RequestSide):
    """
    The request side of a tunnel that requires signed webhooks: each
    request is held (head and body, at most L{MAX_BODY} bytes) until its
    signature is checked, then passed on whole; an unsigned one is answered
    with a 401 and the stream closed, so it never reaches the service.
    """

    def __init__(self, watch: _Watch, verifier: WebhookVerifier, rewriter: ResponseHeadRewriter | None = None) -> None:
        super().__init__(watch, rewriter)
        self.verifier = verifier
        self.framer = RequestFramer()
        self.head: RequestHead | None = None
        self.body = bytearray()
        self.refused = False
        #: Requests passed to the service on this stream so far.
        self.passed = 0

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        try:
            events = self.framer.feed(data)
        except HTTPError as e:
            self.refuse(e.status, e.reason)
            return
        for event in events:
            if isinstance(event, RequestHead):
                if event.upgrade:
                    self.refuse(400, "this tunnel takes signed webhook requests, not protocol upgrades")
                    return
                self.head = event
                del self.body[:]
            elif isinstance(event, BodyBytes):
                self.body += event.data
                if len(self.body) > MAX_BODY:
                    self.refuse(413, f"a webhook body may be at most {MAX_BODY} bytes on this tunnel")
                    return
            elif isinstance(event, RequestEnd) and self.head is not None:
                head, raw = self.head, bytes(self.body)
                self.head = None
                del self.body[:]
                chunked = (head.header(b"transfer-encoding") or b"").lower().endswith(b"chunked")
                try:
                    body = dechunk(raw) if chunked else raw
                except ValueError:
                    self.refuse(400, "malformed chunked body")
                    return
                why = self.verifier.check(head, body, self.watch.tunnel.reactor.seconds())
                if why is not None:
                    self.refuse(401, f"webhook signature check failed: {why}")
                    return
                self.passed += 1
                super().dataReceived(head.raw + raw)
            elif isinstance(event, RawBytes):
                self.refuse(400, "unexpected bytes after the request")
                return

    def refuse(self, status: int, reason: str) -> None:
        self.refused = True
        stream = self.watch.stream
        log.info("webhook refused with {status}: {reason}", status=status, reason=reason)
        if self.passed == 0 and not stream.closed:
            # Nothing of the service's can be in flight: answer, then close.
            stream.write(errorResponse(status, reason))
        if not stream.closed:
            stream.loseConnection()
        socket = self.watch.socket
        if socket is not None and socket.transport is not None:
            socket.transport.loseConnection()


class _ResponseSide(SocketSide):
    def __init__(self, stream: Stream, watch: _Watch, rewriter: ResponseHeadRewriter | None = None) -> None:
        super().__init__(stream)
        self.watch = watch
        self.rewriter = rewriter
        watch.socket = self

    def dataReceived(self, data: bytes) -> None:
        self.watch.responseBytes()
        completed = self.watch.heartbeat.responseData(data)
        if self.watch.follower is not None:
            self.watch.follower.responseCompleted(completed)
        if self.rewriter is not None:
            data = self.rewriter.responseData(data)
            if not data:
                return
        super().dataReceived(data)

    def readConnectionLost(self) -> None:
        # The server has finished sending: nothing more to keep alive.
        self.watch.heartbeat.stop()
        super().readConnectionLost()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.watch.heartbeat.stop()
        if self.watch.follower is not None:
            self.watch.follower.connectionLost()
        super().connectionLost(reason)


def refuseMessages(stream: Stream, reason: str) -> None:
    """
    Answer a request that came as HTTP/2 messages (L{txtunnel.h2messages})
    with a 502 naming C{reason}, and end the stream.
    """
    from txtunnel.h2messages import encodeTrailers

    log.warn("{reason}", reason=reason)
    stream.write(encodeTrailers([(b":status", b"502"), (b"x-txtunnel-error", b"1")]))
    stream.loseConnection()


def responseRewriter(policy: Any) -> ResponseHeadRewriter | None:
    """
    The response header rules of a tunnel's policy (C{add-response-header},
    C{remove-response-header}), or C{None} when it has none.
    """
    if not isinstance(policy, dict):
        return None
    add = [tuple(a.split(": ", 1)) for a in policy.get("add-response-header", [])]
    drop = policy.get("remove-response-header", [])
    if not add and not drop:
        return None
    return ResponseHeadRewriter([(n.encode(), v.encode()) for n, v in add], [d.lower().encode() for d in drop])


def _verifier(text: str) -> WebhookVerifier | None:
    return parseVerifier(text) if str(text).strip() else None


#: The SSE heartbeat, a setting of C{http} and C{sse} tunnels.
SSE_HEARTBEAT = Setting(
    "sse-heartbeat",
    positiveFloat,
    None,
    f"Seconds an event stream may be idle before a comment line is sent between events; 0 for none."
    f" [default: {DEFAULT_INTERVAL:g}]",
)
#: Webhook signatures checked by the agent (L{txtunnel.webhooks}).
VERIFY_WEBHOOK = Setting(
    "verify-webhook",
    _verifier,
    None,
    "KIND:SECRET: pass only webhook requests signed with SECRET by KIND's scheme; others get 401.",
)


@implementer(IForwarder)
class HTTPForwarder:
    """
    HTTP/1.1 web apps (WebSocket upgrades and streamed responses pass
    through as bytes).
    """

    name = "http"
    description = "HTTP at NAME.<domain> on the relay's public HTTP(S) listeners"
    settings: tuple[Setting, ...] = (SSE_HEARTBEAT, VERIFY_WEBHOOK)
    log = Logger()

    def bindRequest(self, tunnel: IAgentTunnel) -> dict[str, Any]:
        request = nameRequest(tunnel)
        if tunnel.options.get("pool"):
            request["pool"] = tunnel.options["pool"]
        allow = tunnel.options.get("allow")
        if allow:
            # Shared with these visitors only: the relay's login gate checks it.
            request["allow"] = list(allow)
        return request

    @inlineCallbacks
    def bind(self, relay: IRelay, tunnel: IRelayTunnel) -> Any:
        if tunnel.request.get("pool") is not None:
            binding = yield joinPool(relay, tunnel)
            return binding
        name = yield claimName(relay, relay.hosts, "http", tunnel, "subdomain")
        return HTTPBinding(relay, tunnel, name)

    def connect(self, tunnel: IAgentTunnel, stream: Stream) -> None:
        chosen = self.chosenFor(tunnel, stream)
        if chosen is not None:
            chosen.connect(tunnel, stream)
            return
        if stream.header.get("h2"):
            # HTTP/2 messages that no forwarder here can take.
            refuseMessages(stream, f"this agent has no forwarder {stream.header.get('forwarder')!r} for this request")
            return
        self.serve(tunnel, stream, float(tunnel.options.get("sse-heartbeat", DEFAULT_INTERVAL)))

    def chosenFor(self, tunnel: IAgentTunnel, stream: Stream) -> IForwarder | None:
        """
        The forwarder the relay chose for the request that opened C{stream}
        (C{"forwarder"} in its header, see L{txtunnel.plugins.requestForwarder}),
        if it is another one that claims requests; C{None} to serve it here.
        A tunnel that takes signed webhooks only keeps every HTTP/1.1
        stream, so no other forwarder can let an unsigned request by.
        """
        from txtunnel.plugins import forwarderNamed

        name = stream.header.get("forwarder")
        if name is None and stream.header.get("h2"):
            name = "grpc"  # a relay from before the choice went in the header
        if not isinstance(name, str) or name == self.name:
            return None
        if tunnel.options.get("verify-webhook") is not None and not stream.header.get("h2"):
            return None
        chosen = forwarderNamed(name)
        if chosen is None or getattr(chosen, "handlesRequest", None) is None:
            # Only forwarders that claim requests may be handed an HTTP stream.
            self.log.warn("the relay chose forwarder {forwarder!r}, which this agent lacks", forwarder=name)
            return None
        return chosen

    def serve(self, tunnel: IAgentTunnel, stream: Stream, interval: float, guard: Any = None) -> None:
        """
        Carry C{stream}, HTTP/1.1 bytes, to the local web server: the
        response timer, the SSE heartbeat every C{interval} seconds (0 for
        none), the circuit breaker and the traffic follower around a plain
        splice.  C{guard}, if given, makes the request side: called with
        the L{_Watch} and the response rewriter.
        """
        breaker = getattr(tunnel, "breaker", None)
        if breaker is not None and not breaker.allow():
            refuseOpenCircuit(tunnel, stream, breaker)
            return
        timeout = float(tunnel.options.get("response-timeout", DEFAULT_RESPONSE_TIMEOUT))
        heartbeat = SSEHeartbeat(tunnel.reactor, interval, stream.write)
        traffic = getattr(tunnel, "traffic", None)
        # The heartbeat parses the connection; the follower reads its events.
        follower = traffic.follow(tunnel.name, heartbeat.responses) if traffic is not None else None
        if follower is not None:
            heartbeat.bodyListener = follower.responseBody
        watch = _Watch(tunnel, stream, timeout, heartbeat, follower)
        rewriter = responseRewriter(tunnel.options.get("policy"))
        verifier = tunnel.options.get("verify-webhook")
        if guard is not None:
            requestSide = guard(watch, rewriter)
        elif verifier is not None:
            requestSide = _VerifyingRequestSide(watch, verifier, rewriter)
        else:
            requestSide = _RequestSide(watch, rewriter)
        d = connectStream(
            tunnel.reactor, tunnel.target, stream, lambda s: _ResponseSide(s, watch, rewriter), requestSide
        )

        def failed(f: Failure) -> None:
            heartbeat.stop()
            if follower is not None:
                follower.connectionLost()
            if stream.closed:
                return
            watch.cancel()
            host, port = tunnel.target
            if f.check(TimeoutError):
                status, reason = 504, f"the local service at {host}:{port} did not accept a connection in time"
            elif f.check(ConnectionRefusedError):
                status, reason = 502, f"the local service at {host}:{port} refused the connection"
            elif f.check(ConnectError):
                status, reason = 502, f"cannot reach the local service at {host}:{port}: {f.getErrorMessage()}"
            else:
                status, reason = 502, f"cannot reach the local service at {host}:{port}"
                self.log.failure("unexpected error connecting to {host}:{port}", f, host=host, port=port)
            self.log.warn("{reason}", reason=reason)
            metrics = getattr(traffic, "metrics", None)
            if metrics is not None:
                metrics.localError(tunnel.name)
            if breaker is not None:
                breaker.failure(reason)
            stream.write(errorResponse(status, reason))
            stream.loseConnection()

        d.addErrback(failed)


#: The request side of one HTTP/1.1 stream (it feeds the response timer,
#: the SSE heartbeat and the traffic follower, then the local server), for
#: forwarders built on L{HTTPForwarder.serve}: subclass it for a C{guard}.
RequestSide = _RequestSide
