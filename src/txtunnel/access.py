# -*- test-case-name: tests.test_access_log -*-
"""
The access log: one structured event per request or connection.

Events go to C{twisted.logger} under the namespace C{txtunnel.access}
with stable keys (C{tunnel}, C{client_ip}, C{method}, C{path}, C{status},
C{bytes_in}, C{bytes_out}, C{duration}; for HTTP requests also C{forwarder},
the forwarder that handled it); with C{--log-format json} each one is a
JSON line (L{txtunnel.logs}), see C{docs/logs.rst}.  Paths are logged
without their query string, which often carries tokens.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger, LogLevel

from txtunnel.logs import LINE_KEY, EndOfTurn

__all__ = ["ACCESS_NAMESPACE", "AccessBatch", "Exchange", "batch", "logAccess", "logCapture", "logConnection"]

ACCESS_NAMESPACE = "txtunnel.access"

_log = Logger(namespace=ACCESS_NAMESPACE)


class Exchange:
    """
    One request (or a connection that switched protocols) as the relay's
    edge sees it, counted while it passes.
    """

    __slots__ = ("tunnel", "clientIP", "method", "path", "host", "started", "bytesIn", "bytesOut", "forwarder")

    def __init__(self, tunnel: str, clientIP: str, method: bytes, target: bytes, host: bytes, started: float) -> None:
        self.tunnel = tunnel
        self.clientIP = clientIP
        self.method = method.decode("ascii", "replace")
        self.path = target.split(b"?", 1)[0].decode("utf-8", "replace")[:2048]
        self.host = host.decode("ascii", "replace")[:255]
        self.started = started
        self.bytesIn = 0
        self.bytesOut = 0
        #: The forwarder that handled it (L{txtunnel.plugins.requestForwarder}), once chosen.
        self.forwarder = "-"


class AccessBatch(EndOfTurn):
    """
    Access events held for the end of the reactor's turn, then emitted
    together.

    An access event is logged for every request, so it is kept cheap: the
    line is built with an f-string and given as a literal C{log_format}
    (braces escaped), which the observers copy instead of parsing a format
    with ten fields; txtunnel's own observers (L{txtunnel.logs}) take the
    line as it is from C{log_txtunnel_line}.  And the events of one turn
    are handed to the observers together, after the turn's I/O: measured
    through an HTTP tunnel at c=50 under twistd, emitting each event as
    its request ended cost the relay about 45 us a request, emitting them
    together at the end of the turn about 25 (the logging code stays hot
    in the cache instead of evicting the request path's,
    docs/performance.rst).  An event keeps the time its request ended
    (C{log_time}); none waits longer than the turn
    (L{txtunnel.logs.EndOfTurn}).
    """

    def emit(self, line: str, fields: dict[str, Any]) -> None:
        fields["log_format"] = line.replace("{", "{{").replace("}", "}}")
        fields[LINE_KEY] = line
        fields["log_time"] = time.time()
        self.hold(fields)

    def release(self, items: list[Any]) -> None:
        observer = _log.observer
        for event in items:
            event.update(log_logger=_log, log_level=LogLevel.info, log_namespace=ACCESS_NAMESPACE, log_source=None)
            observer(event)


#: The batch every access event of this process goes through.
batch = AccessBatch()


def _emit(line: str, **fields: Any) -> None:
    """
    Emit one access event whose message is C{line}, already formatted
    (see L{AccessBatch}).
    """
    batch.emit(line, fields)


def logCapture(capture: Any) -> None:
    """
    Emit the agent's access event for a finished request of its traffic
    (a L{txtunnel.traffic.Capture}); bytes are the bodies' sizes.
    """
    path = capture.target.split("?", 1)[0][:2048]
    duration = round(capture.duration or 0.0, 6)
    _emit(
        f"{capture.clientIP} {capture.method} {path} {capture.status} in={capture.requestSize} "
        f"out={capture.responseSize} {duration:.3f}s [{capture.tunnel}]",
        access="agent",
        tunnel=capture.tunnel,
        client_ip=capture.clientIP,
        method=capture.method,
        path=path,
        status=capture.status,
        bytes_in=capture.requestSize,
        bytes_out=capture.responseSize,
        duration=duration,
        replay_of=capture.replayOf,
    )


def logConnection(
    tunnel: str, clientIP: str, protocol: str, bytesIn: int, bytesOut: int, duration: float, address: str = "-"
) -> None:
    """
    Emit the access event for one TCP, UDP or TLS connection (a UDP flow),
    when it ends.

    @param tunnel: the tunnel's name on the relay (its TLS name, or its
        TCP or UDP port), as HTTP events name theirs.
    @param address: its public address (C{tcp://host:port}, ...).
    """
    duration = round(max(0.0, duration), 6)
    _emit(
        f"{clientIP} {protocol} {address} in={bytesIn} out={bytesOut} {duration:.3f}s [{tunnel}]",
        access="relay",
        tunnel=tunnel,
        address=address,
        client_ip=clientIP,
        protocol=protocol,
        bytes_in=bytesIn,
        bytes_out=bytesOut,
        duration=duration,
    )


def logAccess(exchange: Exchange, status: int, now: float, side: str = "relay", **extra: Any) -> float:
    """
    Emit the access event for C{exchange}; returns its duration in seconds.

    @param status: the response's status code, or 0 when there was none.
    """
    duration = max(0.0, now - exchange.started)
    e = exchange
    _emit(
        f"{e.clientIP} {e.method} {e.host}{e.path} {status} in={e.bytesIn} out={e.bytesOut} "
        f"{duration:.3f}s [{e.tunnel}]",
        access=side,
        tunnel=e.tunnel,
        client_ip=e.clientIP,
        method=e.method,
        host=e.host,
        path=e.path,
        status=status,
        bytes_in=e.bytesIn,
        bytes_out=e.bytesOut,
        duration=round(duration, 6),
        **{"forwarder": exchange.forwarder, **extra},
    )
    return duration
