"""
L{txtunnel.splice.writeNow}: what a transport has buffered goes to its
socket at once, through any wrapping layer, never re-entering itself and
never touching a socket that is gone or closing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IWriteDescriptor
from zope.interface import implementer

from txtunnel.splice import writeNow


@implementer(IWriteDescriptor)
class Socket:
    """
    A socket's descriptor whose C{doWrite} records its calls and, like a
    transport resuming its producer, may write (and so call L{writeNow})
    again from inside.
    """

    def __init__(self, connected: bool = True, disconnecting: bool = False) -> None:
        self.connected = connected
        self.disconnecting = disconnecting
        self.calls = 0
        self.again = 0

    def doWrite(self) -> None:
        self.calls += 1
        if self.again:
            self.again -= 1
            writeNow(self)

    def fileno(self) -> int:
        return -1

    def logPrefix(self) -> str:
        return "socket"

    def connectionLost(self, reason: Any) -> None:
        pass


class Wrapper:
    """
    A layer above the socket (as TLS is): its C{transport} is the socket.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport


def test_writes_through_wrappers() -> None:
    """
    The socket under a TLS-like layer is the one written.
    """
    socket = Socket()
    writeNow(Wrapper(Wrapper(socket)))
    assert socket.calls == 1


def test_no_recursion() -> None:
    """
    A write made while the socket is being written waits for the reactor
    (one C{doWrite}, not a chain of them).
    """
    socket = Socket()
    socket.again = 5
    writeNow(socket)
    assert socket.calls == 1
    writeNow(socket)  # and the socket is free again afterwards
    assert socket.calls == 2


def test_gone_or_closing_sockets_untouched() -> None:
    """
    A socket not connected, or closing, is left to the reactor; so is
    anything with no socket under it.
    """
    for socket in (Socket(connected=False), Socket(disconnecting=True)):
        writeNow(socket)
        assert socket.calls == 0
    writeNow(Wrapper(None))
    writeNow(object())


class Aggregator:
    """
    What Twisted's C{BufferingTLSTransport} keeps small writes in until the
    reactor's next turn.
    """

    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def test_tls_layer_that_holds_writes_is_flushed_first() -> None:
    """
    A TLS layer provides what its transport provides, IWriteDescriptor
    included: its held writes are flushed, then the socket under it is
    written.
    """
    from zope.interface import directlyProvides, providedBy

    socket = Socket()
    layer = Wrapper(socket)
    layer._aggregator = Aggregator()  # type: ignore[attr-defined]
    directlyProvides(layer, providedBy(socket))
    layer.connected = True  # type: ignore[attr-defined]
    layer.disconnecting = False  # type: ignore[attr-defined]
    layer.doWrite = socket.doWrite  # type: ignore[attr-defined]
    writeNow(Wrapper(layer))
    assert layer._aggregator.flushes == 1  # type: ignore[attr-defined]
    assert socket.calls == 1
