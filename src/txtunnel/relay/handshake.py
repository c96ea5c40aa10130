# -*- test-case-name: tests.test_hostile -*-
"""
TLS on the relay's HTTPS listeners: a deadline on the handshake, and
agents' links refused over plain HTTP when the relay says so.

The edge's timeouts see only decrypted bytes, so a visitor that opens a
connection and sends nothing, or half a ClientHello, or a ClientHello and
never its Finished, holds a socket and a TLS object until the idle timeout
-- and for ever with C{--idle-timeout 0}.  A handshake is the start of a
request, so it gets the request head's C{--header-timeout}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

__all__ = ["HandshakeTimeoutTLSFactory", "plainLinkRefusal"]


class _TimedHandshake(BufferingTLSTransport):
    """
    A server TLS connection aborted if its handshake is not done in time.
    """

    log = Logger()
    factory: HandshakeTimeoutTLSFactory
    _handshakeCall: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        timeout = self.factory.handshakeTimeout
        if timeout > 0:
            self._handshakeCall = self.factory.clock.callLater(timeout, self._handshakeCheck, timeout)

    def _handshakeCheck(self, timeout: float) -> None:
        self._handshakeCall = None
        # Twisted's flag: set once the handshake completed.
        if self._handshakeDone:
            return
        peer = self.transport.getPeer() if self.transport is not None else None
        self.log.info(
            "closing TLS connection from {client}: no TLS handshake within {timeout:g}s (--header-timeout)",
            client=getattr(peer, "host", "?"),
            timeout=timeout,
        )
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        call = self._handshakeCall
        if call is not None and call.active():
            call.cancel()
        self._handshakeCall = None
        super().connectionLost(reason)


class HandshakeTimeoutTLSFactory(TLSMemoryBIOFactory):
    """
    A server-side L{TLSMemoryBIOFactory} whose connections must finish the
    TLS handshake within C{handshakeTimeout} seconds (0: no deadline).
    """

    protocol = _TimedHandshake

    def __init__(self, contextFactory: Any, wrappedFactory: Any, clock: IReactorTime, handshakeTimeout: float) -> None:
        super().__init__(contextFactory, False, wrappedFactory)
        self.clock = clock
        self.handshakeTimeout = handshakeTimeout


def plainLinkRefusal(relay: Any, transport: Any) -> str | None:
    """
    Why an agent's link upgrade on C{transport} is refused, or C{None}: with
    C{--links-over https} a link must come over TLS, as the agent's token
    and every visitor's traffic would otherwise cross the network in clear.
    """
    if getattr(relay, "settings", {}).get("links-over", "any") != "https" or ISSLTransport.providedBy(transport):
        return None
    return "this relay takes agent links over TLS only: connect with --relay wss://HOST (its --https listener)"
