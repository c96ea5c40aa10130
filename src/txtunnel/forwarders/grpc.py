# -*- test-case-name: tests.test_grpc -*-
"""
gRPC (and any HTTP/2 service) behind a tunnel: the agent's HTTP/2 client.

A link stream opened with C{"h2"} in its header carries one HTTP/2 request
as L{txtunnel.h2messages}: the relay's HTTP/2 edge sends every request to
a C{grpc} tunnel that way, and the gRPC calls of an C{http} tunnel, which
this forwarder claims (L{GRPCForwarder.handlesRequest}, C{wire = "h2"}).  The
agent opens a cleartext HTTP/2 connection (prior knowledge, as gRPC
servers expect) to the local service for each such stream and joins the two
with an L{txtunnel.h2pipe.H2Pipe}: heads, body, trailers (C{grpc-status},
C{grpc-message}, metadata) and resets pass both ways, and C{grpc-timeout}
reaches the local server unchanged, so deadlines and cancellation behave
as they would on a direct connection.

A connection per call costs one local TCP handshake (loopback, well under
a millisecond) and keeps one stuck call from holding others' connection
window; calls are independent the way the link's streams are.

When the local service cannot be reached the agent answers the call
itself with gRPC status C{UNAVAILABLE} (14) and a message naming the
target, as a gRPC client connecting directly would report.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.claims import claimName, nameRequest
from txtunnel.forwarders.http import HTTPBinding
from txtunnel.h2messages import encodeTrailers
from txtunnel.h2pipe import H2Pipe
from txtunnel.http1 import RequestHead
from txtunnel.interfaces import IAgentTunnel, IForwarder, IRelay, IRelayTunnel
from txtunnel.link import Stream

__all__ = ["GRPCForwarder", "H2ClientProtocol", "connectH2"]

#: gRPC's status for "the service cannot be reached now".
UNAVAILABLE = 14

#: Receive window per stream and for the connection to the local service.
WINDOW = 1024 * 1024

#: Seconds to wait for the local service to accept a connection.
CONNECT_TIMEOUT = 10.0


@implementer(IPushProducer)
class H2ClientProtocol(Protocol):
    """
    A cleartext HTTP/2 connection to the local service carrying one call.
    """

    log = Logger()

    def __init__(self, target: str = "?") -> None:
        self.target = target
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.pipe: H2Pipe | None = None
        self.paused = False
        self._trailersOnly = False
        self._responded = False

    # -- H2Owner

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def newStream(self, pipe: H2Pipe) -> int:
        return int(self.conn.get_next_available_stream_id())

    def pipeDone(self, pipe: H2Pipe) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    # -- the connection

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        self.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: WINDOW, SettingCodes.ENABLE_PUSH: 0})
        self.conn.increment_flow_control_window(WINDOW)
        self.flush()
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        pipe = self.pipe
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            self.log.warn("HTTP/2 protocol error from the local service: {error}", error=str(e))
            self.flush()
            self.transport.loseConnection()  # type: ignore[union-attr]
            self._failed(f"the local service at {self.target} does not speak HTTP/2 ({e})")
            return
        for event in events:
            if pipe is None or pipe.streamID is None:
                break
            sid = getattr(event, "stream_id", None)
            if sid not in (None, 0, pipe.streamID):
                continue
            if isinstance(event, ResponseReceived):
                self._responded = True
                if event.stream_ended is not None:
                    self._trailersOnly = True
                    pipe.h2TrailersOnly(event.headers)
                else:
                    pipe.h2Headers(event.headers)
            elif isinstance(event, DataReceived):
                pipe.h2Data(event.data, event.flow_controlled_length)
            elif isinstance(event, TrailersReceived):
                pipe.h2Trailers(event.headers)
            elif isinstance(event, StreamEnded):
                if not self._trailersOnly:
                    pipe.h2Ended()
            elif isinstance(event, StreamReset):
                pipe.h2Reset(event.error_code)
            elif isinstance(event, (WindowUpdated, RemoteSettingsChanged)):
                pipe.windowOpened()
            elif isinstance(event, ConnectionTerminated):
                pipe.h2Closed()
        self.flush()

    # -- IPushProducer: the local socket fills up or drains

    def pauseProducing(self) -> None:
        self.paused = True
        pipe = self.pipe
        if pipe is not None and pipe.stream is not None and not pipe.stream.closed:
            pipe.stream.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.pipe is not None:
            self.pipe.pump()

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._failed(f"the local service at {self.target} closed the connection", unanswered=" without answering")

    def _failed(self, message: str, unanswered: str = "") -> None:
        """
        The connection is unusable: a call not yet answered is answered
        UNAVAILABLE (as a client connecting directly would report); one
        under way is reset as an internal error (the visitor's gRPC client
        reports C{INTERNAL}, not C{CANCELLED}).
        """
        pipe = self.pipe
        if pipe is None or pipe.finished:
            return
        stream = pipe.stream
        if not self._responded and stream is not None and not stream.closed:
            message += unanswered
            self.log.warn("{message}", message=message)
            _unavailable(stream, message)
            pipe._finish()
        else:
            message += " in the middle of a call"
            self.log.warn("{message}", message=message)
            pipe.h2Lost(message)


def _unavailable(stream: Stream, message: str) -> None:
    """
    Answer the call on C{stream} with gRPC status UNAVAILABLE.
    """
    stream.write(
        encodeTrailers(
            [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", str(UNAVAILABLE).encode()),
                (b"grpc-message", quote(message, safe=" ").encode("ascii")),
            ]
        )
    )
    stream.loseConnection()


log = Logger()


def connectH2(tunnel: IAgentTunnel, stream: Stream) -> None:
    """
    Join C{stream} (HTTP/2 messages) to a new HTTP/2 connection to the
    tunnel's local service.
    """
    host, port = tunnel.target
    endpoint = TCP4ClientEndpoint(tunnel.reactor, host, port, timeout=CONNECT_TIMEOUT)
    client = H2ClientProtocol(f"{host}:{port}")
    d = connectProtocol(endpoint, client)

    def connected(protocol: H2ClientProtocol) -> None:
        if stream.closed:
            protocol.transport.loseConnection()  # type: ignore[union-attr]
            return
        pipe = H2Pipe(protocol, None, responseSide=False)
        protocol.pipe = pipe
        stream.attach(pipe)
        stream.resumeProducing()

    def failed(f: Failure) -> None:
        if stream.closed:
            return
        message = f"cannot reach the local service at {host}:{port}: {f.getErrorMessage()}"
        log.warn("{message}", message=message)
        _unavailable(stream, message)

    d.addCallbacks(connected, failed)


@implementer(IForwarder)
class GRPCForwarder:
    """
    A local gRPC (or other cleartext HTTP/2) service at C{NAME.<domain>}:
    every request goes to it over HTTP/2.
    """

    name = "grpc"
    description = "gRPC and HTTP/2 (h2c) services at NAME.<domain> on the relay's public HTTP(S) listeners"
    #: Requests it takes come from the relay's HTTP/2 edge as HTTP/2 messages.
    wire = "h2"

    def handlesRequest(self, head: RequestHead) -> bool:
        """
        gRPC calls (C{application/grpc}, C{+proto}, C{+json}, C{-web}) that
        came over HTTP/2: an HTTP/1.1 request cannot carry gRPC's
        trailers, so one with that content type stays with C{http}.
        """
        contentType = head.header(b"content-type") or b""
        return head.version == "2" and contentType.lower().startswith(b"application/grpc")

    def bindRequest(self, tunnel: IAgentTunnel) -> dict[str, Any]:
        return nameRequest(tunnel)

    @inlineCallbacks
    def bind(self, relay: IRelay, tunnel: IRelayTunnel) -> Any:
        name = yield claimName(relay, relay.hosts, "http", tunnel, "subdomain")
        return HTTPBinding(relay, tunnel, name)

    def connect(self, tunnel: IAgentTunnel, stream: Stream) -> None:
        if not stream.header.get("h2"):
            # An HTTP/1.1 visitor: gRPC needs HTTP/2 end to end.
            from txtunnel.http1 import errorResponse

            stream.write(errorResponse(505, "this tunnel serves HTTP/2 only; use HTTP/2 (h2 or h2c)"))
            stream.loseConnection()
            return
        connectH2(tunnel, stream)
