# -*- test-case-name: tests.test_udp -*-
"""
UDP tunnels: a public UDP port on the relay per tunnel, a stream per flow.

A I{flow} is everything exchanged with one remote C{(ip, port)}.  The relay
opens one link stream per flow when that remote's first datagram arrives;
the agent gives each stream its own local UDP socket, connected to the
target, so replies from the local service find their way back to the right
remote and two remotes never see each other's traffic.  A flow that has
been silent in both directions for the idle timeout (60 s unless the agent
asks for another, C{udp-idle-timeout}) is closed on both sides, which frees
the agent's socket; a later datagram from the same remote opens a new flow.

Framing on the link
-------------------

A stream is a byte stream, so each datagram is sent on it with a length
prefix, in both directions::

    +-------------------+------------------------------+
    | length 2 (BE, u16)|  datagram: `length` bytes    |  length ...
    +-------------------+------------------------------+

C{length} is 0 to 65,507 (the largest UDP payload over IPv4; empty
datagrams are legal UDP and are carried).  A length above 65,507 cannot come
from a well-behaved peer: it is a protocol error, and the stream is reset
with code C{"protocol"} and a log line.  A stream carries its flow's
datagrams in the order they were sent and keeps their boundaries; the link
never reorders them.

Bind request fields (agent to relay): C{"port"} (the public port asked
for, optional) and C{"idle-timeout"} (seconds, optional, 0 < t <= 86400).
Stream header (relay to agent): C{"peer"} and C{"port"}, the remote's
address.

No backpressure
---------------

UDP has none, and a tunnel must not buffer without bound for a sender that
will not slow down.  Each flow registers itself as a producer on its
stream; while the stream has bytes queued (its credit window is used up, or
the link itself is full), new datagrams in that direction are dropped and
counted.  So at most one datagram per flow waits beyond the window.  Drops
are logged at most once every L{DROP_LOG_INTERVAL} seconds per tunnel, with
counts by reason.  Each tunnel holds at most L{MAX_FLOWS} flows; a datagram
that would open one more is dropped and logged the same way.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import CannotListenError, ConnectionLost, InvalidAddressError, MessageLengthError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import DatagramProtocol, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.claims import claimPort
from txtunnel.errors import BindError, QuotaSpent, StreamRefused, VisitorRefused
from txtunnel.interfaces import IAgentTunnel, IBinding, IForwarder, IRelay, IRelayTunnel
from txtunnel.link import Stream
from txtunnel.plugins import Setting

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "MAX_DATAGRAM",
    "MAX_FLOWS",
    "MAX_IDLE_TIMEOUT",
    "DatagramFramer",
    "DatagramStream",
    "FramingError",
    "IdleTimer",
    "RateLimitedCounter",
    "UDPBinding",
    "UDPForwarder",
    "frameDatagram",
]

#: The largest UDP payload over IPv4 (65,535 - 20 IP - 8 UDP header bytes).
MAX_DATAGRAM = 65507

#: Seconds a flow may be silent in both directions before it is closed.
DEFAULT_IDLE_TIMEOUT = 60.0

#: The longest idle timeout an agent may ask for (a day).
MAX_IDLE_TIMEOUT = 86400.0


def parseIdleTimeout(text: str) -> float:
    """
    Seconds a UDP flow may stay silent: more than 0 (a flow must be able to
    end, or its socket would be held for ever) and at most a day.
    """
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= MAX_IDLE_TIMEOUT:
        raise ValueError(f"{text!r} must be more than 0 and at most {MAX_IDLE_TIMEOUT:g} seconds")
    return value


#: Flows one tunnel may hold at once, on the relay and on the agent; bounds
#: sockets and streams per tunnel against a flood of spoofed sources.
MAX_FLOWS = 1000

#: Seconds between two log lines about dropped datagrams of one tunnel.
DROP_LOG_INTERVAL = 10.0

#: What every UDP socket here reads at once: more than L{MAX_DATAGRAM}, so
#: an oversized (IPv6) datagram is seen as oversized, not cut short.  Twisted
#: reads 8,192 bytes by default, which would truncate larger datagrams.
RECV_SIZE = 65536

#: Socket buffer asked for on every UDP socket here (the kernel caps it at
#: C{net.core.rmem_max}/C{wmem_max}).  UDP senders burst, and a datagram
#: that finds the default ~200 KiB buffer full while the reactor is busy
#: is lost: with it, a 5,000 datagrams/s flow sent in bursts of 256 lost a
#: quarter of them at the relay.
SOCKET_BUFFER = 4 * 1024 * 1024

_LENGTH = struct.Struct(">H")


def _bigBuffers(port: Any) -> Any:
    """
    Ask for L{SOCKET_BUFFER} bytes of receive and send buffer on C{port}'s
    socket; return C{port}.
    """
    sock = port.getHandle()
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass  # keep the default: a smaller buffer only loses more under bursts
    return port


class FramingError(ValueError):
    """
    The peer framed a datagram longer than L{MAX_DATAGRAM}: a protocol error.

    @ivar datagrams: the complete datagrams that came before the bad frame
        in the same L{DatagramFramer.feed}; they are well-formed and may be
        delivered.
    """

    def __init__(self, message: str, datagrams: list[bytes]) -> None:
        super().__init__(message)
        self.datagrams = datagrams


def frameDatagram(datagram: bytes) -> bytes:
    """
    The bytes that carry C{datagram} on a stream: its 2-byte big-endian
    length, then the datagram.

    @raise ValueError: if C{datagram} is longer than L{MAX_DATAGRAM}; no UDP
        socket can produce one, so this is a bug in the caller.
    """
    if len(datagram) > MAX_DATAGRAM:
        raise ValueError(f"a datagram of {len(datagram)} bytes is over the UDP limit of {MAX_DATAGRAM}")
    return _LENGTH.pack(len(datagram)) + datagram


class DatagramFramer:
    """
    Sans-IO decoder of length-prefixed datagrams from a byte stream that may
    split them anywhere.

    Bytes are appended to one buffer and cut once per L{feed}, so a large
    datagram arriving in many small pieces costs linear time.  After a
    L{FramingError} the framer stays broken: the stream is out of step and
    nothing after the bad length can be trusted.
    """

    def __init__(self, maxDatagram: int = MAX_DATAGRAM) -> None:
        self.maxDatagram = maxDatagram
        self._buffer = bytearray()
        self._error: FramingError | None = None

    @property
    def pending(self) -> int:
        """
        Bytes held of a datagram not yet complete (0 between datagrams).
        """
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """
        Add C{data}; return the datagrams it completes, in order.

        @raise FramingError: on a length over C{maxDatagram}, now or before.
        """
        if self._error is not None:
            raise FramingError(str(self._error), [])
        buffer = self._buffer
        buffer += data
        datagrams: list[bytes] = []
        offset = 0
        end = len(buffer)
        while end - offset >= 2:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if length > self.maxDatagram:
                self._error = FramingError(
                    f"peer framed a datagram of {length} bytes; the limit is {self.maxDatagram}", []
                )
                buffer.clear()
                raise FramingError(str(self._error), datagrams)
            if end - offset - 2 < length:
                break
            datagrams.append(bytes(buffer[offset + 2 : offset + 2 + length]))
            offset += 2 + length
        if offset:
            del buffer[:offset]
        return datagrams


#: What each reason for dropping a datagram means, for the log line: only
#: the reasons counted are explained, so a datagram that was too large is
#: not blamed on backpressure.
DROP_REASONS = {
    "backlog": "UDP has no backpressure, so datagrams are dropped rather than buffered while the stream is full",
    "too-large": f"a datagram over {MAX_DATAGRAM:,} bytes cannot be carried",
    "closing": "the flow was closing",
    "not-ready": "the flow was not ready yet",
    "send-failed": "the socket refused to send",
    "too-many-flows": f"the tunnel has its {MAX_FLOWS} flows already",
    "unbound": "the tunnel's public port is closed",
    "refused": "the visitor was refused",
    "stream-limit": "the link has no stream to spare",
    "link-down": "the link to the agent is down",
    "no-local-socket": "no local UDP socket could be opened",
}


def explainDrops(reasons: Counter[str]) -> str:
    """
    Why datagrams were dropped, in words, for the C{reasons} counted.
    """
    return "; ".join(DROP_REASONS.get(reason, reason) for reason in sorted(reasons))


class RateLimitedCounter:
    """
    Counts events (dropped datagrams, refusals) by reason and logs them at
    most once per C{interval}: a flood must not turn into a flood of log
    lines, but the first event after a quiet spell is reported at once.

    @ivar total: events ever counted.
    @ivar byReason: events ever counted, by reason.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, message: str, interval: float = DROP_LOG_INTERVAL, **fields: Any) -> None:
        """
        @param message: a log format; it gets C{{count}} (events since the
            last line), C{{reasons}} (C{"reason=n, ..."}) and C{{why}}
            (L{explainDrops} of them) plus C{fields}.
        """
        self.clock = clock
        self.message = message
        self.interval = interval
        self.fields = fields
        self.total = 0
        self.byReason: Counter[str] = Counter()
        self._unlogged: Counter[str] = Counter()
        self._lastLog: float | None = None

    def count(self, reason: str) -> None:
        self.total += 1
        self.byReason[reason] += 1
        self._unlogged[reason] += 1
        now = self.clock.seconds()
        if self._lastLog is None or now - self._lastLog >= self.interval:
            self._report(now)

    def flush(self) -> None:
        """
        Log what was counted since the last line, if anything (on close).
        """
        if self._unlogged:
            self._report(self.clock.seconds())

    def _report(self, now: float) -> None:
        reasons = ", ".join(f"{reason}={n}" for reason, n in sorted(self._unlogged.items()))
        self.log.warn(
            self.message,
            count=sum(self._unlogged.values()),
            reasons=reasons,
            why=explainDrops(self._unlogged),
            drops=dict(self._unlogged),
            **self.fields,
        )
        self._unlogged.clear()
        self._lastLog = now


class IdleTimer:
    """
    Calls C{expired} once nothing has L{touch}ed it for C{timeout} seconds.

    A touch only records the time; the one pending call checks it when it
    fires and sleeps again for what is left.  So a busy flow costs no timer
    work per datagram.
    """

    def __init__(self, clock: IReactorTime, timeout: float, expired: Callable[[], None]) -> None:
        self.clock = clock
        self.timeout = timeout
        self.expired = expired
        self._last = clock.seconds()
        self._call: IDelayedCall | None = None

    def start(self) -> None:
        self._last = self.clock.seconds()
        if self._call is None:
            self._call = self.clock.callLater(self.timeout, self._fire)

    def touch(self) -> None:
        self._last = self.clock.seconds()

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        left = self._last + self.timeout - self.clock.seconds()
        if left > 0:
            self._call = self.clock.callLater(left, self._fire)
        else:
            self.expired()


@implementer(IPushProducer)
class DatagramStream(Protocol):
    """
    The protocol on a stream that carries one flow's datagrams, used by both
    halves: L{sendDatagram} frames what the local UDP socket received onto
    the stream; datagrams unframed from the stream go to C{deliver}.

    It is its stream's producer, so it knows when the stream is backed up
    and drops instead of queueing (see the module docstring).

    @ivar deliver: where datagrams from the stream go (a UDP socket's
        C{write}); C{None} until that socket exists.
    @ivar onClosed: called once with the reason when the stream is gone.
    @ivar closing: set once L{close} is called or the stream is lost; a
        closing flow accepts no more datagrams.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        idleTimeout: float,
        drops: RateLimitedCounter,
        label: str,
        deliver: Callable[[bytes], object] | None = None,
        onClosed: Callable[[Failure], object] | None = None,
    ) -> None:
        self.clock = clock
        self.drops = drops
        self.label = label
        self.deliver = deliver
        self.onClosed = onClosed
        self.stream: Stream | None = None
        self.framer = DatagramFramer()
        self.idle = IdleTimer(clock, idleTimeout, self._expired)
        self.backedUp = False
        self.closing = False
        self.closed = False
        self._abandoned = False
        self.datagramsIn = 0
        self.datagramsOut = 0
        self.bytesIn = 0
        self.bytesOut = 0

    # -- Protocol (the stream side)

    def connectionMade(self) -> None:
        stream: Stream = self.transport  # type: ignore[assignment]
        self.stream = stream
        stream.endless = True  # a flow ends only when idle: shutdown does not wait for it
        stream.registerProducer(self, True)
        self.idle.start()

    def dataReceived(self, data: bytes) -> None:
        if self._abandoned:
            # The link is evidently alive: end the stream now (see abandon).
            self._abandoned = False
            if self.stream is not None:
                self.stream.loseConnection()
            return
        if self.closing:
            return
        try:
            datagrams = self.framer.feed(data)
        except FramingError as e:
            self._deliverAll(e.datagrams)
            self.log.warn(
                "UDP flow {flow}: protocol error from the link peer ({reason}); resetting the stream",
                flow=self.label,
                reason=str(e),
                stream_id=getattr(self.stream, "id", None),
            )
            if self.stream is not None:
                self.stream.reset("protocol", str(e))
            return
        self._deliverAll(datagrams)

    def _deliverAll(self, datagrams: list[bytes]) -> None:
        for datagram in datagrams:
            if self.closed:
                return
            self.idle.touch()
            self.datagramsIn += 1
            self.bytesIn += len(datagram)
            deliver = self.deliver
            if deliver is None:
                self.drops.count("not-ready")
                continue
            try:
                deliver(datagram)
            except (OSError, MessageLengthError):
                self.drops.count("send-failed")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.closed:
            return
        self.closed = True
        self.closing = True
        self.backedUp = True
        self.idle.cancel()
        if self.framer.pending:
            self.log.debug(
                "UDP flow {flow}: stream ended inside a datagram; {pending} bytes discarded",
                flow=self.label,
                pending=self.framer.pending,
            )
        self.log.debug(
            "UDP flow {flow} closed ({reason}): {datagrams_in} datagrams in, {datagrams_out} out",
            flow=self.label,
            reason=reason.getErrorMessage(),
            datagrams_in=self.datagramsIn,
            datagrams_out=self.datagramsOut,
            bytes_in=self.bytesIn,
            bytes_out=self.bytesOut,
        )
        if self.onClosed is not None:
            self.onClosed(reason)

    # -- sending

    def sendDatagram(self, datagram: bytes) -> bool:
        """
        Send C{datagram} on the stream, or drop it (and count why) when the
        flow is closing, the datagram is over the UDP limit, or the stream
        is backed up.

        @return: whether it was sent.
        """
        if self.closing or self.stream is None:
            self.drops.count("closing")
            return False
        if len(datagram) > MAX_DATAGRAM:
            self.drops.count("too-large")
            return False
        if self.backedUp:
            self.drops.count("backlog")
            return False
        self.idle.touch()
        self.datagramsOut += 1
        self.bytesOut += len(datagram)
        self.stream.write(_LENGTH.pack(len(datagram)) + datagram)
        return True

    def close(self) -> None:
        """
        Close the flow: the stream is finished cleanly, so the other half
        closes its side too.  No more datagrams are accepted.
        """
        if self.closing:
            return
        self.closing = True
        self.idle.cancel()
        if self.stream is not None:
            self.stream.loseConnection()

    def abandon(self) -> None:
        """
        Stop the flow without sending anything now: used when its tunnel is
        unbound, which may happen while the link is being torn down and can
        take no more frames.  If the link is in fact alive, the stream is
        closed at the peer's next datagram (or the peer's idle timeout), and
        if it is not, the link's end resets it.
        """
        if self.closing:
            return
        self.closing = True
        self._abandoned = True
        self.idle.cancel()

    def _expired(self) -> None:
        self.log.debug("UDP flow {flow} idle for {timeout}s; closing it", flow=self.label, timeout=self.idle.timeout)
        self.close()

    # -- IPushProducer: the stream tells us when it is backed up

    def pauseProducing(self) -> None:
        self.backedUp = True

    def resumeProducing(self) -> None:
        if not self.closed:
            self.backedUp = False

    def stopProducing(self) -> None:
        self.backedUp = True


# -- relay half


class _PublicPort(DatagramProtocol):
    """
    A tunnel's public UDP socket on the relay: sorts datagrams into flows by
    their source address and sends each flow's replies back to it.
    """

    noisy = False
    log = Logger()

    def __init__(self, clock: IReactorTime, tunnel: IRelayTunnel, idleTimeout: float, maxFlows: int) -> None:
        self.clock = clock
        self.tunnel = tunnel
        self.idleTimeout = idleTimeout
        self.maxFlows = maxFlows
        self.flows: dict[tuple[str, int], DatagramStream] = {}
        self.closed = False
        self.drops = RateLimitedCounter(
            clock,
            "UDP tunnel on port {port}: the relay dropped {count} datagram(s) ({reasons}): {why}",
            tunnel_id=getattr(tunnel, "id", None),
            port="?",
        )

    def startProtocol(self) -> None:
        getHost = getattr(self.transport, "getHost", None)
        if getHost is not None:
            self.drops.fields["port"] = getattr(getHost(), "port", "?")

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if self.closed:
            return
        key = (str(addr[0]), int(addr[1]))
        if len(datagram) > MAX_DATAGRAM:
            self.drops.count("too-large")
            return
        flow = self.flows.get(key)
        if flow is None or flow.closing:
            flow = self._open(key, addr)
            if flow is None:
                return
        flow.sendDatagram(datagram)

    def _open(self, key: tuple[str, int], addr: Any) -> DatagramStream | None:
        live = sum(1 for f in self.flows.values() if not f.closing)
        if live >= self.maxFlows:
            self.drops.count("too-many-flows")
            return None

        def reply(datagram: bytes) -> None:
            if self.closed or self.transport is None:
                self.drops.count("unbound")
                return
            self.transport.write(datagram, addr)

        def closed(reason: Failure) -> None:
            if self.flows.get(key) is flow:
                del self.flows[key]

        flow = DatagramStream(self.clock, self.idleTimeout, self.drops, f"{key[0]}:{key[1]}", reply, closed)
        self.flows[key] = flow
        try:
            self.tunnel.openStream({"peer": key[0], "port": key[1]}, flow)
        except StreamRefused as e:
            del self.flows[key]
            self.drops.count(
                "refused" if isinstance(e, VisitorRefused) else "quota" if isinstance(e, QuotaSpent) else "stream-limit"
            )
            self.log.debug("no stream for UDP flow {flow}: {error}", flow=flow.label, error=str(e))
            return None
        except ConnectionLost as e:
            del self.flows[key]
            self.drops.count("link-down")
            self.log.debug("cannot open a stream for UDP flow {flow}: {error}", flow=flow.label, error=str(e))
            return None
        self.log.debug(
            "UDP flow from {client_ip}:{client_port} opened on tunnel {tunnel_id}",
            client_ip=key[0],
            client_port=key[1],
            tunnel_id=getattr(self.tunnel, "id", None),
        )
        return flow

    def connectionRefused(self) -> None:
        # Only connected sockets get ICMP errors; this one is not.
        pass

    def closeFlows(self) -> None:
        """
        Stop taking datagrams and abandon every flow (see
        L{DatagramStream.abandon}: nothing may be sent on the link here).
        """
        self.closed = True
        for flow in list(self.flows.values()):
            flow.abandon()
        self.drops.flush()


@implementer(IBinding)
class UDPBinding:
    """
    A UDP tunnel's public port on the relay.
    """

    def __init__(self, relay: IRelay, tunnel: IRelayTunnel, port: int, listening: Any, public: _PublicPort) -> None:
        self.relay = relay
        self.tunnel = tunnel
        self.port = port
        self.listening = listening
        self.public = public
        self.address = f"udp://{_hostForURL(relay.publicHost)}:{port}"
        self.claim = ("udp", str(port))
        self.reclaim = {"port": port}
        self.closed = False

    @property
    def flows(self) -> dict[tuple[str, int], DatagramStream]:
        return self.public.flows

    def close(self) -> Any:
        if self.closed:
            return None
        self.closed = True
        self.public.closeFlows()
        self.relay.udpPorts.free(self.port)
        self.relay.store.release("udp", str(self.port), self.tunnel.owner)
        return self.listening.stopListening()


def _hostForURL(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- agent half


class _LocalSocket(DatagramProtocol):
    """
    One flow's socket on the agent, connected to the local service: what it
    receives goes onto the flow's stream, and L{write} sends to the service.

    The socket is opened on the first write and opened afresh after the
    reactor drops it.  Twisted's epoll and poll reactors treat the error
    that ICMP "port unreachable" leaves on a connected UDP socket (C{POLLERR}
    without C{POLLIN}) as the connection being lost and close the port,
    without calling C{connectionRefused}; measured with Twisted 26.10 on
    Linux.  So a lost port we did not close is read as a refusal (its
    C{SO_ERROR} says which), counted and logged, and the flow carries on:
    once the service is up, the next datagram goes out on a new socket.
    """

    noisy = False

    def __init__(self, reactor: Any, ip: str, port: int, flow: DatagramStream, state: _AgentTunnelState) -> None:
        self.reactor = reactor
        self.ip = ip
        self.targetPort = port
        self.flow = flow
        self.state = state
        self.port: Any = None
        self.closed = False

    def write(self, datagram: bytes) -> None:
        if self.closed:
            return
        if self.port is None:
            try:
                self._open()
            except (CannotListenError, OSError, InvalidAddressError) as e:
                self.state.drops.count("no-local-socket")
                self.flow.log.debug("cannot open a UDP socket to {ip}: {error}", ip=self.ip, error=str(e))
                return
        self.port.write(datagram)

    def _open(self) -> None:
        port = _bigBuffers(self.reactor.listenUDP(0, self, interface=_bindAddress(self.ip), maxPacketSize=RECV_SIZE))
        try:
            port.connect(self.ip, self.targetPort)
        except BaseException:
            port.stopListening()
            raise
        self.port = port

    def close(self) -> None:
        """
        Close the socket for good (the flow is over).
        """
        self.closed = True
        port, self.port = self.port, None
        if port is not None:
            port.stopListening()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.flow.sendDatagram(datagram)

    def connectionRefused(self) -> None:
        # The select reactor, and a write that meets the pending error, get here.
        self.state.refusals.count("port-unreachable")

    def stopProtocol(self) -> None:
        port, self.port = self.port, None
        if self.closed or port is None:
            return
        # Not closed by us: the reactor dropped the socket over an ICMP error.
        try:
            code = port.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except (AttributeError, OSError):
            code = 0
        self.state.refusals.count(_ICMP_ERRORS.get(code, errno.errorcode.get(code, "socket-lost")))


#: How the errors ICMP leaves on a UDP socket are named in the log.
_ICMP_ERRORS = {
    errno.ECONNREFUSED: "port-unreachable",
    errno.EHOSTUNREACH: "host-unreachable",
    errno.ENETUNREACH: "network-unreachable",
}


class _AgentTunnelState:
    """
    What the agent half keeps per tunnel: its live flows and its counters.
    """

    def __init__(self, tunnel: IAgentTunnel) -> None:
        host, port = tunnel.target
        self.flows: set[DatagramStream] = set()
        self.drops = RateLimitedCounter(
            tunnel.reactor,
            "UDP tunnel {tunnel}: the agent dropped {count} datagram(s) ({reasons}): {why}",
            tunnel=tunnel.name,
        )
        self.refusals = RateLimitedCounter(
            tunnel.reactor,
            "UDP tunnel {tunnel}: local service {target} unreachable, {count} ICMP error(s) ({reasons}); "
            "is it running?",
            tunnel=tunnel.name,
            target=f"{host}:{port}",
        )


def _bindAddress(ip: str) -> str:
    """
    The address for a flow's local socket: loopback for a loopback target,
    so the socket is not reachable from outside; otherwise any address of
    the target's family.
    """
    address = ipaddress.ip_address(ip)
    if address.version == 6:
        return "::1" if address.is_loopback else "::"
    return "127.0.0.1" if address.is_loopback else "0.0.0.0"


def _isIP(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IForwarder)
class UDPForwarder:
    """
    UDP: every remote address on the public port is a flow, carried on one
    stream to the agent, which sends it to the local service from a socket
    of its own.

    @ivar maxFlows: flows per tunnel, on either half.
    """

    name = "udp"
    description = "UDP datagrams on a public port of the relay"
    settings = (
        Setting(
            "udp-idle-timeout",
            parseIdleTimeout,
            DEFAULT_IDLE_TIMEOUT,
            "Seconds a UDP flow may be silent before it is closed and its socket freed.",
        ),
    )
    log = Logger()

    def __init__(self, maxFlows: int = MAX_FLOWS) -> None:
        self.maxFlows = maxFlows
        self._agentState: weakref.WeakKeyDictionary[Any, _AgentTunnelState] = weakref.WeakKeyDictionary()

    def bindRequest(self, tunnel: IAgentTunnel) -> dict[str, Any]:
        request: dict[str, Any] = {}
        port = tunnel.options.get("remote-port")
        if port:
            request["port"] = port
        timeout = tunnel.options.get("udp-idle-timeout")
        if timeout is not None:
            request["idle-timeout"] = timeout
        return request

    # -- relay half

    @inlineCallbacks
    def bind(self, relay: IRelay, tunnel: IRelayTunnel) -> Any:
        timeout = tunnel.request.get("idle-timeout", DEFAULT_IDLE_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_IDLE_TIMEOUT:
            raise BindError(f"UDP idle timeout {timeout!r} is not a number of seconds in (0, {MAX_IDLE_TIMEOUT:g}]")

        def listen(port: int) -> Any:
            public = _PublicPort(relay.reactor, tunnel, float(timeout), self.maxFlows)
            return _bigBuffers(
                relay.reactor.listenUDP(port, public, interface=relay.publicInterface, maxPacketSize=RECV_SIZE)
            ), public

        port, (listening, public) = yield claimPort(relay, relay.udpPorts, "udp", tunnel, listen)
        return UDPBinding(relay, tunnel, port, listening, public)

    # -- agent half

    def _state(self, tunnel: IAgentTunnel) -> _AgentTunnelState:
        state = self._agentState.get(tunnel)
        if state is None:
            state = self._agentState[tunnel] = _AgentTunnelState(tunnel)
        return state

    def flows(self, tunnel: IAgentTunnel) -> set[DatagramStream]:
        """
        The agent's live flows of C{tunnel} (for tests and stats).
        """
        return set(self._state(tunnel).flows)

    def connect(self, tunnel: IAgentTunnel, stream: Stream) -> None:
        state = self._state(tunnel)
        peer = f"{stream.header.get('peer', '?')}:{stream.header.get('port', '?')}"
        if len(state.flows) >= self.maxFlows:
            state.drops.count("too-many-flows")
            stream.reset("refused", f"the agent holds {self.maxFlows} UDP flows for this tunnel already")
            return
        timeout = tunnel.options.get("udp-idle-timeout") or DEFAULT_IDLE_TIMEOUT
        local: list[_LocalSocket] = []

        def closed(reason: Failure) -> None:
            state.flows.discard(flow)
            for sock in local:
                sock.close()

        flow = DatagramStream(tunnel.reactor, float(timeout), state.drops, peer, None, closed)
        state.flows.add(flow)
        host, port = tunnel.target

        def ready(ip: str) -> None:
            sock = _LocalSocket(tunnel.reactor, ip, port, flow, state)
            local.append(sock)
            flow.deliver = sock.write
            self.log.debug(
                "UDP flow from {client_ip} opened on tunnel {tunnel} to {ip}:{port}",
                client_ip=peer,
                tunnel=tunnel.name,
                ip=ip,
                port=port,
                stream_id=stream.id,
            )

        # The stream arrives paused (IForwarder.connect); its bytes wait,
        # bounded by its window, until the flow can deliver them.
        stream.attach(flow)
        if _isIP(host):
            ready(host)
            stream.resumeProducing()
            return
        # A host name: resolve it first; Twisted's UDP sockets take only
        # addresses.  Pausing again is harmless, and makes this half work
        # with an agent that hands streams over unpaused.
        stream.pauseProducing()

        def resolved(ip: str) -> None:
            if flow.closing:
                return
            ready(ip)
            stream.resumeProducing()

        def failed(f: Failure) -> None:
            if flow.closing:
                return
            self.log.warn(
                "UDP tunnel {tunnel}: cannot resolve {host}: {error}",
                tunnel=tunnel.name,
                host=host,
                error=f.getErrorMessage(),
            )
            stream.reset("refused", f"local service {host}:{port} unreachable: cannot resolve {host}")

        tunnel.reactor.resolve(host).addCallbacks(resolved, failed)
