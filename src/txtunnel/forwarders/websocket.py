# -*- test-case-name: tests.test_websocket,tests.test_relay_agent -*-
"""
WebSocket tunnels: C{Upgrade: websocket} requests at C{NAME.<domain>}.

An C{http} tunnel hands every WebSocket upgrade to this forwarder (its
L{WebSocketForwarder.handlesRequest} claims them); a C{websocket} tunnel,
asked for by name, serves only upgrades and answers anything else 400.
Either way the handshake goes to the local server as it came, and after
its C{101} the connection carries the WebSocket frames untouched both ways
(text, binary, fragments, ping/pong, close codes, C{permessage-deflate}
negotiated end to end): this is the HTTP forwarder's splice, with no SSE
heartbeat (a switched connection has none) and the response timer
stopped by the switch.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from txtunnel.forwarders.http import HTTPForwarder, RequestSide
from txtunnel.http1 import HTTPError, RequestFramer, RequestHead, errorResponse
from txtunnel.interfaces import IAgentTunnel, IForwarder
from txtunnel.link import Stream
from txtunnel.rewrite import ResponseHeadRewriter

__all__ = ["WebSocketForwarder", "isWebSocketUpgrade"]


def isWebSocketUpgrade(head: RequestHead) -> bool:
    """
    Whether C{head} asks to switch to WebSocket (RFC 6455 section 4.1: a
    GET with C{Upgrade: websocket}, tokens compared case-insensitively).
    """
    if not head.upgrade or head.method != b"GET":
        return False
    for name, value in head.headers:
        if name.lower() == b"upgrade" and b"websocket" in {t.strip().lower() for t in value.split(b",")}:
            return True
    return False


class _UpgradesOnly(RequestSide):
    """
    The request side of a C{websocket} tunnel: the first request head is
    read before anything reaches the local server, and one that is not a
    WebSocket upgrade is answered 400.  After it, bytes pass unread.
    """

    def __init__(self, watch: Any, rewriter: ResponseHeadRewriter | None = None) -> None:
        super().__init__(watch, rewriter)
        self.framer: RequestFramer | None = RequestFramer()
        self.held = bytearray()

    def dataReceived(self, data: bytes) -> None:
        framer = self.framer
        if framer is None:
            super().dataReceived(data)
            return
        self.held += data
        try:
            events = framer.feed(data)
        except HTTPError as e:
            self.refuse(e.status, e.reason)
            return
        for event in events:
            if isinstance(event, RequestHead):
                if not isWebSocketUpgrade(event):
                    self.refuse(400, "this tunnel takes WebSocket upgrades only (GET with Upgrade: websocket)")
                    return
                self.framer = None
                held, self.held = bytes(self.held), bytearray()
                super().dataReceived(held)
                return

    def refuse(self, status: int, reason: str) -> None:
        self.framer = None
        stream = self.watch.stream
        WebSocketForwarder.log.info("refused with {status}: {reason}", status=status, reason=reason)
        if not stream.closed:
            stream.write(errorResponse(status, reason))
            stream.loseConnection()
        socket = self.watch.socket
        if socket is not None and socket.transport is not None:
            socket.transport.loseConnection()


@implementer(IForwarder)
class WebSocketForwarder(HTTPForwarder):
    """
    WebSocket connections to a local server, claimed from C{http} tunnels
    or served by a C{websocket} tunnel of their own.
    """

    name = "websocket"
    description = "WebSocket (Upgrade: websocket) at NAME.<domain> on the relay's public HTTP(S) listeners"
    #: None of C{http}'s own settings: an upgraded connection has no events or webhooks.
    settings = ()

    def handlesRequest(self, head: RequestHead) -> bool:
        # HTTP/2 has no Upgrade (RFC 8441's extended CONNECT is refused by
        # the relay's HTTP/2 edge), so only HTTP/1.1 heads can be claimed.
        return head.version != "2" and isWebSocketUpgrade(head)

    def connect(self, tunnel: IAgentTunnel, stream: Stream) -> None:
        guard: Any = None if tunnel.type == "http" else _UpgradesOnly
        self.serve(tunnel, stream, 0.0, guard)
