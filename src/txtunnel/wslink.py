# -*- test-case-name: tests.test_wss_link,tests.test_relay_agent -*-
"""
The link's carrier: a WebSocket (autobahn) whose binary messages carry frames.

Both ends are thin adapters: they feed message payloads to a
L{txtunnel.link.Link} and send what it hands them; the session logic (hello,
auth, binds) lives in L{txtunnel.relay.session} and L{txtunnel.agent.session}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import txaio
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.frames import HEADER, MAX_FRAME_PAYLOAD
from txtunnel.interfaces import ILinkCarrier
from txtunnel.link import Link
from txtunnel.splice import sendNow, setNoDelay, writeNow

__all__ = [
    "LINK_PATH",
    "LinkClientFactory",
    "LinkClientProtocol",
    "LinkServerFactory",
    "LinkServerProtocol",
    "relayEndpointString",
]

txaio.use_twisted()
# autobahn logs every frame at debug level; the link's own logs say what matters.
txaio.set_global_log_level("info")  # type: ignore[attr-defined]

_DONE = Failure(ConnectionDone())

#: Where agents connect on the relay's public HTTP(S) listener.
LINK_PATH = "/_txtunnel"

#: The largest batch of frames in one WebSocket message (what a peer must
#: accept: every large DATA frame goes as a message of its own).
BATCH_LIMIT = 256 * 1024

#: A batch is sent, and written to the socket at once (L{writeNow}), when
#: it reaches this size: small enough that the peer starts on the first
#: requests of a busy reactor turn while this side reads the rest, large
#: enough to share one message among several small frames.  Measured
#: through an HTTP tunnel at c=50: 2 KiB gave about 4,500 req/s, 16 KiB
#: and 64 KiB 3,500-4,000, the end of each turn only (the old way) 3,200.
FLUSH_AT = 2 * 1024

#: WebSocket close codes the link uses (4000-4999 are for applications).
CLOSE_PROTOCOL_ERROR = 4002
CLOSE_REFUSED = 4003
CLOSE_NORMAL = 1000

#: Close reasons for a link found dead, dropped at once.
DEAD_LINK_REASONS = frozenset({"keepalive timeout", "probe timeout"})


def _options(factory: Any) -> None:
    factory.setProtocolOptions(
        maxFramePayloadSize=BATCH_LIMIT + MAX_FRAME_PAYLOAD + HEADER.size,
        maxMessagePayloadSize=BATCH_LIMIT + MAX_FRAME_PAYLOAD + HEADER.size,
        autoFragmentSize=0,
        openHandshakeTimeout=15,
        closeHandshakeTimeout=5,
        utf8validateIncoming=False,
        failByDrop=False,
    )


class _LinkCarrierMixin:
    """
    What both ends share: own a L{Link}, feed it, send for it.
    """

    link: Link | None = None
    factory: Any
    transport: Any
    role: str = "?"

    def _startLink(self, peer: str) -> Link:
        f = self.factory
        link = Link(
            self,  # type: ignore[arg-type]
            role=self.role,
            clock=f.clock,
            peer=peer,
            window=f.window,
            keepalive=f.keepalive,
            keepaliveTimeout=f.keepaliveTimeout,
        )
        self.link = link
        # autobahn's own tcpNoDelay option never reaches the agent's socket;
        # without this, small frames wait up to 40 ms in Nagle's buffer.
        setNoDelay(self.transport)
        self.transport.registerProducer(link, True)
        link.start()
        return link

    _batch: list[bytes] | None = None
    _batchSize = 0

    def sendLinkBytes(self, data: bytes) -> None:
        """
        Small frames produced in one turn of the reactor share WebSocket
        messages, so per-message cost (framing, masking, a write) is paid
        once per batch instead of once per frame; each batch goes to the
        socket as soon as it reaches L{FLUSH_AT} bytes, or at the end of
        the turn, and a large frame goes at once as a message of its own.
        """
        if len(data) >= FLUSH_AT and self._batch is None:
            self.sendMessage(data, isBinary=True)  # type: ignore[attr-defined]
            writeNow(self.transport)
            return
        if self._batch is None:
            self._batch = []
            self._batchSize = 0
            self.factory.clock.callLater(0, self._sendBatch)
        self._batch.append(data)
        self._batchSize += len(data)
        if self._batchSize >= FLUSH_AT:
            self._sendBatch()

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """
        autobahn's C{sendData}, with the open link's frames sent to the
        socket at once (L{sendNow}) instead of on the reactor's next turn.
        """
        if sync or chopsize or self.send_queue or self.state != self.STATE_OPEN:  # type: ignore[attr-defined]
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
            return
        sendNow(self.transport, data)
        self.trafficStats.outgoingOctetsWireLevel += len(data)  # type: ignore[attr-defined]

    def _sendBatch(self) -> None:
        batch, self._batch = self._batch, None
        if batch and self.state == self.STATE_OPEN:  # type: ignore[attr-defined]
            self.sendMessage(b"".join(batch) if len(batch) > 1 else batch[0], isBinary=True)  # type: ignore[attr-defined]
            writeNow(self.transport)

    def closeLink(self, reason: str) -> None:
        self._sendBatch()
        if reason.startswith("protocol error"):
            code = CLOSE_PROTOCOL_ERROR
        elif reason.startswith("refused"):
            code = CLOSE_REFUSED
        else:
            code = CLOSE_NORMAL
        self.sendClose(code, reason[:120])  # type: ignore[attr-defined]
        if reason in DEAD_LINK_REASONS:
            # Nothing comes back on a dead link: waiting for the close
            # handshake would only delay the reconnect.
            self.dropConnection(abort=True)  # type: ignore[attr-defined]

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        link = self.link
        if link is None:
            return
        if not isBinary:
            link._protocolError("text message on the link; frames are binary")
            return
        link.dataReceived(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        link = self.link
        if link is not None:
            link.connectionLost(f"link closed ({code}{': ' + reason if reason else ''})")
        self.linkClosed(code, reason)

    def linkClosed(self, code: int | None, reason: str | None) -> None:
        pass


@implementer(ILinkCarrier)
class LinkServerProtocol(_LinkCarrierMixin, WebSocketServerProtocol):  # type: ignore[misc]
    """
    The relay's end of a link.  The factory's C{sessionFactory} is called
    with the new L{Link} and the agent's address and runs the session.
    """

    role = "relay"

    def onOpen(self) -> None:
        peer = self.transport.getPeer()
        address = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        link = self._startLink(address)
        self.session = self.factory.sessionFactory(link, self, getattr(peer, "host", "?"))

    def linkClosed(self, code: int | None, reason: str | None) -> None:
        session = getattr(self, "session", None)
        if session is not None:
            session.linkLost(reason or "closed")


@implementer(ILinkCarrier)
class LinkClientProtocol(_LinkCarrierMixin, WebSocketClientProtocol):  # type: ignore[misc]
    """
    The agent's end of a link.
    """

    role = "agent"

    def onOpen(self) -> None:
        link = self._startLink(self.factory.url)
        self.session = self.factory.sessionFactory(link, self)

    def failHandshake(self, reason: str) -> None:
        """
        A refused upgrade names the relay's reason (the body of its answer,
        marked C{X-Txtunnel-Error}), not only the status: an agent told
        "403 Forbidden" cannot know it should use C{wss://}.
        """
        headers = getattr(self, "http_headers", None) or {}
        data = getattr(self, "data", b"")
        end = data.find(b"\r\n\r\n") if headers.get("x-txtunnel-error") else -1
        if end >= 0:
            words = data[end + 4 : end + 4 + 500].decode("utf-8", "replace").strip()
            words = "".join(c for c in words if c.isprintable())
            if words:
                reason = f"{reason} ({words})"
        super().failHandshake(reason)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        # A connection that ends before the link is up (a TLS handshake
        # that failed verification, say) is reported with its reason, which
        # the WebSocket layer would otherwise reduce to "closed uncleanly".
        onFailed = getattr(self.factory, "onConnectFailed", None)
        if self.link is None and onFailed is not None:
            onFailed(reason)
        super().connectionLost(reason)

    def linkClosed(self, code: int | None, reason: str | None) -> None:
        session = getattr(self, "session", None)
        if session is not None:
            session.linkLost(code, reason or "closed")
        onLost = getattr(self.factory, "onLinkLost", None)
        if session is None and onLost is not None:
            onLost(self, code, reason)


class LinkServerFactory(WebSocketServerFactory):  # type: ignore[misc]
    protocol = LinkServerProtocol
    noisy = False

    def __init__(
        self,
        sessionFactory: Callable[..., Any],
        clock: IReactorTime,
        *,
        window: int,
        keepalive: float,
        keepaliveTimeout: float,
    ) -> None:
        super().__init__()
        self.sessionFactory = sessionFactory
        self.clock = clock
        self.window = window
        self.keepalive = keepalive
        self.keepaliveTimeout = keepaliveTimeout
        _options(self)


class LinkClientFactory(WebSocketClientFactory):  # type: ignore[misc]
    protocol = LinkClientProtocol
    noisy = False

    def __init__(
        self,
        url: str,
        sessionFactory: Callable[..., Any],
        clock: IReactorTime,
        *,
        window: int,
        keepalive: float,
        keepaliveTimeout: float,
    ) -> None:
        super().__init__(url=url, headers={})
        #: Called with the reason when a connection ends before its link is up.
        self.onConnectFailed: Callable[[Failure], object] | None = None
        #: Called C{(carrier, code, reason)} when a link closes before its
        #: session started (a refused or failed handshake).
        self.onLinkLost: Callable[[Any, int | None, str | None], object] | None = None
        self.sessionFactory = sessionFactory
        self.clock = clock
        self.window = window
        self.keepalive = keepalive
        self.keepaliveTimeout = keepaliveTimeout
        _options(self)


def relayEndpointString(url: str) -> tuple[str, str]:
    """
    Turn a relay URL (C{ws://host:port} or C{wss://host:port}) into the
    WebSocket URL of its link and a client endpoint string.

    @raise ValueError: for anything else, naming what was expected.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss", "http", "https"):
        raise ValueError(f"relay URL {url!r} must start with ws:// or wss://")
    secure = parts.scheme in ("wss", "https")
    host = parts.hostname
    if not host:
        raise ValueError(f"relay URL {url!r} has no host")
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError:
        raise ValueError(f"relay URL {url!r} has an invalid port") from None
    if parts.path not in ("", "/", LINK_PATH) or parts.query or parts.fragment:
        raise ValueError(f"relay URL {url!r} must not have a path: agents always connect to {LINK_PATH}")
    path = LINK_PATH
    hostText = f"[{host}]" if ":" in host else host
    wsURL = f"{'wss' if secure else 'ws'}://{hostText}:{port}{path}"
    escaped = host.replace(":", r"\:")
    kind = "tls" if secure else "tcp"
    return wsURL, f"{kind}:host={escaped}:port={port}:timeout=15"
