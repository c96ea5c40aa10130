# -*- test-case-name: tests.test_policy -*-
"""
The relay's own visitor gates: IP rules, rate limits, bandwidth quotas,
basic auth and header rules, each enforcing a relay-wide setting and the
tunnel's own (from the C{policy} field of its bind request).

They are ordered cheapest and most protective first: an address that is
denied costs one lookup, a flood is refused before any password hash is
computed, and only a visitor who passed everything else has headers
rewritten.
"""

from __future__ import annotations

import calendar
import math
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtunnel.basicauth import CredentialCache, checkCredentials, credentialsList, parseAuthorization
from txtunnel.errors import BindError, QuotaSpent
from txtunnel.gates import VisitorRequest
from txtunnel.headerrules import headerAdds, headerNames
from txtunnel.http1 import Answer
from txtunnel.interfaces import IVisitorGate
from txtunnel.iprules import IPRules, networkList, visitorKey
from txtunnel.ratelimit import BucketTable, Rate, parseRate

__all__ = [
    "BasicAuthGate",
    "HeaderGate",
    "IPGate",
    "PolicyGate",
    "QuotaGate",
    "RateGate",
    "StreamMeter",
    "TunnelPolicy",
    "parseSize",
    "policyGates",
    "quotaGate",
    "tunnelPolicy",
]

log = Logger()

#: Keys the C{policy} field of a bind request may hold.
POLICY_KEYS = frozenset(
    {"basic-auth", "ip-allow", "ip-deny", "add-header", "remove-header", "rate-per-ip", "rate", "quota"}
)

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parseSize(text: str | int) -> int:
    """
    C{"10MiB"}, C{"1GB"}, C{"500000"} to bytes; C{""}, C{"0"}, C{"off"} to
    C{0} (no quota).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError("a size must not be negative")
        return text
    raw = str(text).strip().lower().replace(" ", "")
    if raw in ("", "0", "off", "none"):
        return 0
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{text!r} is not a size like 10MiB, 500MB or 2GiB")
    return int(value * _SIZE_UNITS[unit])


@attrs.frozen
class TunnelPolicy:
    """
    A tunnel's own visitor settings, parsed and checked from its bind request.
    """

    ip: IPRules = IPRules()
    credentials: tuple[str, ...] = ()
    addHeaders: tuple[tuple[bytes, bytes], ...] = ()
    dropHeaders: frozenset[bytes] = frozenset()
    ratePerIP: Rate | None = None
    rate: Rate | None = None
    quota: int = 0


def parsePolicy(bindRequest: dict[str, Any]) -> TunnelPolicy:
    """
    The C{policy} field of C{bindRequest}, checked.

    @raise BindError: naming the bad setting.
    """
    raw = bindRequest.get("policy")
    if raw is None:
        return TunnelPolicy()
    if not isinstance(raw, dict):
        raise BindError("policy must be an object")
    unknown = sorted(set(raw) - POLICY_KEYS)
    if unknown:
        raise BindError(f"unknown policy setting {unknown[0]!r}; this relay knows {', '.join(sorted(POLICY_KEYS))}")
    if raw and bindRequest.get("type") not in (None, "http"):
        raise BindError("visitor policy (basic auth, IP rules, headers, rates, quotas) applies to http tunnels only")
    try:
        adds = headerAdds(_strings(raw, "add-header"))
        return TunnelPolicy(
            ip=IPRules.fromLists(networkList(_strings(raw, "ip-allow")), networkList(_strings(raw, "ip-deny"))),
            credentials=tuple(credentialsList(raw.get("basic-auth", []))),
            addHeaders=tuple((n.encode(), v.encode()) for n, v in (a.split(": ", 1) for a in adds)),
            dropHeaders=frozenset(n.lower().encode() for n in headerNames(_strings(raw, "remove-header"))),
            ratePerIP=parseRate(_text(raw, "rate-per-ip")),
            rate=parseRate(_text(raw, "rate")),
            quota=parseSize(raw.get("quota", 0)),
        )
    except ValueError as e:
        raise BindError(f"bad tunnel policy: {e}") from None


def _strings(raw: dict[str, Any], key: str) -> list[str]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of strings")
    return value


def _text(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


_parsed: weakref.WeakKeyDictionary[Any, TunnelPolicy] = weakref.WeakKeyDictionary()


def tunnelPolicy(request: VisitorRequest) -> TunnelPolicy:
    """
    The parsed policy of the request's tunnel, parsed once per tunnel.  A
    policy that no longer parses (it was checked at bind) refuses: fail
    closed.
    """
    tunnel = request.tunnel
    try:
        return _parsed[tunnel]
    except (KeyError, TypeError):
        pass
    policy = parsePolicy(request.bindRequest)
    try:
        _parsed[tunnel] = policy
    except TypeError:
        pass
    return policy


class _Validating:
    def validate(self, bindRequest: dict[str, Any]) -> None:
        parsePolicy(bindRequest)


@implementer(IVisitorGate)
class IPGate(_Validating):
    """
    The relay's IP rules, then the tunnel's: deny wins, 403.
    """

    #: The C{limit} label its refusals are counted under (metrics).
    limit = "ip-rules"

    def __init__(self, rules: IPRules) -> None:
        self.rules = rules

    def check(self, request: VisitorRequest) -> Answer | None:
        if not self.rules.permits(request.clientIP):
            return Answer(403, "your address may not use this relay")
        if not tunnelPolicy(request).ip.permits(request.clientIP):
            return Answer(403, "your address may not use this tunnel")
        return None


def _tooMany(wait: float, what: str) -> Answer:
    seconds = max(1, math.ceil(wait))
    return Answer(429, f"too many requests {what}; retry in {seconds}s", headers=[("Retry-After", str(seconds))])


@implementer(IVisitorGate)
class RateGate(_Validating):
    """
    Token buckets per visitor IP, per tunnel and for the whole relay, and
    the tunnel's own per-IP and total rates: 429 with C{Retry-After}.
    Every bucket with room is spent only when all have room, so a refused
    request costs nothing.
    """

    limit = "rate"

    def __init__(
        self,
        clock: Callable[[], float],
        perIP: Rate | None = None,
        perTunnel: Rate | None = None,
        total: Rate | None = None,
        size: int = 100_000,
    ) -> None:
        self.clock = clock
        self.size = size
        self.perIP = BucketTable(perIP, clock, size) if perIP else None
        self.perTunnel = BucketTable(perTunnel, clock, size) if perTunnel else None
        self.total = BucketTable(total, clock, 1) if total else None
        #: Tables for tunnels' own rates, by (rate, kind).
        self._own: dict[tuple[Rate, str], BucketTable] = {}

    def _table(self, rate: Rate, kind: str) -> BucketTable:
        table = self._own.get((rate, kind))
        if table is None:
            if len(self._own) > 1000:
                self._own.clear()
            table = self._own[(rate, kind)] = BucketTable(rate, self.clock, self.size)
        return table

    def check(self, request: VisitorRequest) -> Answer | None:
        policy = tunnelPolicy(request)
        checks: list[tuple[BucketTable, str, str]] = []
        visitor = visitorKey(request.clientIP)
        if self.perIP is not None:
            checks.append((self.perIP, visitor, "from your address"))
        if policy.ratePerIP is not None:
            checks.append((self._table(policy.ratePerIP, "ip"), f"{request.name}\0{visitor}", "from your address"))
        if self.perTunnel is not None:
            checks.append((self.perTunnel, request.name, "to this tunnel"))
        if policy.rate is not None:
            checks.append((self._table(policy.rate, "tunnel"), request.name, "to this tunnel"))
        if self.total is not None:
            checks.append((self.total, "", "to this relay"))
        for table, key, what in checks:
            wait = table.wait(key)
            if wait > 0:
                return _tooMany(wait, what)
        for table, key, _ in checks:
            table.take(key)
        return None


def monthOf(when: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(when))


def monthEnd(when: float) -> float:
    """
    The first second of the next calendar month (UTC).
    """
    t = time.gmtime(when)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def _previousMonth(period: str) -> str:
    year, month = (int(p) for p in period.split("-"))
    year, month = (year - 1, 12) if month == 1 else (year, month - 1)
    return f"{year:04d}-{month:02d}"


def formatSize(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


@implementer(IVisitorGate)
class QuotaGate(_Validating):
    """
    Monthly bandwidth quotas per visitor IP and per tunnel, counted in both
    directions (request and response bytes, heads included) and kept in
    the relay's store, so a restart forgets nothing: a spent quota answers
    429 with a page saying when it resets.

    Counts are added up in memory and written every C{flushInterval}
    seconds in one transaction (and when the relay stops); what is held in
    memory is only the keys seen since the last write and a bounded cache
    of totals.
    """

    limit = "quota"

    def __init__(
        self,
        relay: Any,
        perIP: int = 0,
        perTunnel: int = 0,
        flushInterval: float = 5.0,
        cacheSize: int = 100_000,
    ) -> None:
        self.relay = relay
        self.perIP = perIP
        self.perTunnel = perTunnel
        self.flushInterval = flushInterval
        self.cacheSize = cacheSize
        self._stored: dict[tuple[str, str, str], int] = {}
        self._pending: dict[tuple[str, str, str], int] = {}
        self._loop: LoopingCall | None = None
        self._period = ""
        self._stopped = False

    def _now(self) -> float:
        return float(self.relay.wallClock())

    async def _used(self, period: str, kind: str, key: str) -> int:
        k = (period, kind, key)
        stored = self._stored.get(k)
        if stored is None:
            stored = int(await self.relay.store.usage(period, kind, key))
            if len(self._stored) >= self.cacheSize:
                self._stored.clear()
            self._stored[k] = stored
        return stored + self._pending.get(k, 0)

    def check(self, request: VisitorRequest) -> Deferred[Answer | None] | None:
        policy = tunnelPolicy(request)
        tunnelLimit = min((q for q in (self.perTunnel, policy.quota) if q), default=0)
        if not self.perIP and not tunnelLimit:
            return None
        return ensureDeferred(self._check(request, tunnelLimit))

    async def _check(self, request: VisitorRequest, tunnelLimit: int) -> Answer | None:
        now = self._now()
        period = monthOf(now)
        keys: list[tuple[str, str]] = []
        for kind, key, limit, what in (
            ("ip", visitorKey(request.clientIP), self.perIP, "your address's"),
            ("tunnel", request.name, tunnelLimit, "this tunnel's"),
        ):
            if not limit:
                continue
            keys.append((kind, key))
            if await self._used(period, kind, key) >= limit:
                resets = monthEnd(now)
                day = time.strftime("%Y-%m-%d", time.gmtime(resets))
                return Answer(
                    429,
                    f"{what} monthly bandwidth quota of {formatSize(limit)} is spent; it resets on {day} (UTC)",
                    headers=[("Retry-After", str(max(1, math.ceil(resets - now))))],
                )
        request.meters.append(lambda n: self.count(keys, n))
        return None

    def _usedNow(self, period: str, kind: str, key: str) -> int | None:
        """
        What L{_used} says, without waiting: from the cache, or from a
        store that answers at once (SQLite does); C{None} while an
        asynchronous store is still being asked (the answer is cached for
        the next look).
        """
        k = (period, kind, key)
        stored = self._stored.get(k)
        if stored is None:
            got: list[Any] = []
            ensureDeferred(self._used(period, kind, key)).addBoth(got.append)
            if not got:
                return None
            if isinstance(got[0], Failure):
                log.failure("reading quota counts failed", got[0])
                return None
            return int(got[0])
        return stored + self._pending.get(k, 0)

    def spent(self, kind: str, tunnel: str, peer: str) -> str | None:
        """
        Why a new C{kind} (C{tcp}, C{udp}, C{tls}) visitor from C{peer} to
        C{tunnel} gets no stream, naming the address or tunnel and the
        quota; C{None} when neither quota is spent.
        """
        now = self._now()
        period = monthOf(now)
        for quotaKind, key, limit, what in self._streamKeys(kind, tunnel, peer):
            used = self._usedNow(period, quotaKind, key)
            if used is not None and used >= limit:
                day = time.strftime("%Y-%m-%d", time.gmtime(monthEnd(now)))
                return (
                    f"the monthly bandwidth quota of {formatSize(limit)} of {what} is spent; it resets on {day} (UTC)"
                )
        return None

    def _streamKeys(self, kind: str, tunnel: str, peer: str) -> list[tuple[str, str, int, str]]:
        keys = []
        if self.perIP:
            keys.append(("ip", visitorKey(peer), self.perIP, f"address {peer}"))
        if self.perTunnel:
            # Named by kind: TCP port 8000 and UDP port 8000 are two tunnels.
            keys.append(("tunnel", f"{kind}:{tunnel}", self.perTunnel, f"{kind} tunnel {tunnel}"))
        return keys

    def streamMeter(self, kind: str, tunnel: str, peer: str) -> StreamMeter | None:
        """
        Quotas for a TCP, UDP or TLS visitor's stream, which has no HTTP
        request to refuse: L{QuotaSpent} now if one is spent, else a meter
        for the stream's bytes (both ways) that calls its C{cut} with the
        reason once one runs out -- a connection that would otherwise
        carry a month's traffic is closed then, not when it ends.  C{None}
        when the relay has no quota.
        """
        reason = self.spent(kind, tunnel, peer)
        if reason is not None:
            raise QuotaSpent(reason)
        keys = self._streamKeys(kind, tunnel, peer)
        return StreamMeter(self, kind, tunnel, peer, keys) if keys else None

    def count(self, keys: list[tuple[str, str]], n: int) -> None:
        """
        Add C{n} bytes to each of C{keys} (C{(kind, key)}) this month.
        """
        period = monthOf(self._now())
        pending = self._pending
        for kind, key in keys:
            k = (period, kind, key)
            pending[k] = pending.get(k, 0) + n
        if self._loop is None and self.flushInterval > 0 and not self._stopped:
            self._loop = LoopingCall(self.flush)
            self._loop.clock = self.relay.reactor
            self._loop.start(self.flushInterval, now=False).addErrback(
                lambda f: log.failure("writing quota counts failed", f)
            )

    def flush(self) -> Deferred[None] | None:
        """
        Write the counts gathered since the last flush.
        """
        store = self.relay.store
        if not self._pending or store is None:
            return None
        pending, self._pending = self._pending, {}
        for k, n in pending.items():
            if k in self._stored:
                self._stored[k] += n
        period = monthOf(self._now())
        if period != self._period:
            self._period = period
            store.pruneUsage(_previousMonth(period))
            self._stored = {k: v for k, v in self._stored.items() if k[0] == period}
        result: Deferred[None] = store.addUsage(pending)
        return result

    def stop(self) -> None:
        """
        Write what is counted; the relay is stopping and will close its store.
        """
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.flush()


class StreamMeter:
    """
    Counts one TCP, UDP or TLS stream's bytes toward its quotas and cuts it
    (once, from the reactor, not from inside the write that crossed the
    line) when one is spent.
    """

    def __init__(
        self,
        gate: QuotaGate,
        kind: str,
        tunnel: str,
        peer: str,
        keys: list[tuple[str, str, int, str]],
    ) -> None:
        self.gate = gate
        self.kind = kind
        self.tunnel = tunnel
        self.peer = peer
        self.keys = [(k, key) for k, key, _, _ in keys]
        #: Called with the reason when a quota runs out (set by the opener).
        self.cut: Callable[[str], object] = lambda reason: None
        self.cutting = False

    def __call__(self, n: int) -> None:
        gate = self.gate
        gate.count(self.keys, n)
        if self.cutting:
            return
        reason = gate.spent(self.kind, self.tunnel, self.peer)
        if reason is not None:
            self.cutting = True
            gate.relay.reactor.callLater(0, self.cut, reason)


def quotaGate(gates: Sequence[Any]) -> QuotaGate | None:
    """
    The L{QuotaGate} among the relay's gates (inside its L{PolicyGate}),
    for the streams of TCP, UDP and TLS tunnels to be metered by.
    """
    for gate in gates:
        if isinstance(gate, QuotaGate):
            return gate
        found = quotaGate(getattr(gate, "gates", ()))
        if found is not None:
            return found
    return None


#: Password checks one visitor address may cost the relay: twenty a
#: minute, each at most one PBKDF2 (an accepted password is remembered and
#: not checked again), so a flood of bad C{Authorization} headers is
#: answered 429 cheaply.
AUTH_ATTEMPTS = Rate(20, 60)


@implementer(IVisitorGate)
class BasicAuthGate(_Validating):
    """
    The tunnel's basic auth: 401 with C{WWW-Authenticate} until the visitor
    sends one of its credentials; the C{Authorization} header the relay
    checked never reaches the local service.

    A header not seen accepted before costs one PBKDF2, run in the
    reactor's thread pool when there is one (the hash releases the GIL),
    so other tunnels are served meanwhile; and each visitor address may
    cause only L{AUTH_ATTEMPTS} of them.
    """

    def __init__(
        self,
        realm: str = "txtunnel",
        clock: Callable[[], float] = time.monotonic,
        reactor: Any = None,
        attempts: Rate = AUTH_ATTEMPTS,
    ) -> None:
        self.realm = realm
        self.cache = CredentialCache()
        self.reactor = reactor
        self.attempts = BucketTable(attempts, clock, 100_000)

    def _unauthorized(self) -> Answer:
        return Answer(
            401,
            "this tunnel needs a user name and password",
            headers=[("WWW-Authenticate", f'Basic realm="{self.realm}", charset="UTF-8"')],
        )

    def check(self, request: VisitorRequest) -> Answer | Deferred[Answer | None] | None:
        credentials = list(tunnelPolicy(request).credentials)
        if not credentials:
            return None
        userPass = parseAuthorization(request.head.header(b"authorization"))
        if userPass is None:
            return self._unauthorized()
        key = self.cache.key(userPass, credentials)
        if key in self.cache:
            request.dropHeaders.add(b"authorization")
            return None
        wait = self.attempts.take(visitorKey(request.clientIP))
        if wait > 0:
            return _tooMany(wait, "with a password from your address")

        def checked(ok: bool) -> Answer | None:
            if not ok:
                return self._unauthorized()
            self.cache.add(key)
            request.dropHeaders.add(b"authorization")
            return None

        pool = getattr(self.reactor, "getThreadPool", None)
        if pool is None:
            return checked(checkCredentials(userPass, credentials))
        d: Deferred[bool] = deferToThreadPool(self.reactor, pool(), checkCredentials, userPass, credentials)
        return d.addCallback(checked)


@implementer(IVisitorGate)
class HeaderGate(_Validating):
    """
    Headers added to and removed from what the local service receives: the
    relay's, then the tunnel's.
    """

    def __init__(self, add: Sequence[str] = (), remove: Sequence[str] = ()) -> None:
        self.add = [(n.encode(), v.encode()) for n, v in (a.split(": ", 1) for a in headerAdds(add))]
        self.remove = frozenset(n.lower().encode() for n in headerNames(remove))

    def check(self, request: VisitorRequest) -> None:
        policy = tunnelPolicy(request)
        request.dropHeaders.update(self.remove | policy.dropHeaders)
        # A tunnel's header replaces the relay's of the same name.
        own = {name.lower() for name, _ in policy.addHeaders}
        request.addHeaders.extend(h for h in self.add if h[0].lower() not in own)
        request.addHeaders.extend(policy.addHeaders)
        return None


@implementer(IVisitorGate)
class PolicyGate(_Validating):
    """
    The relay's policy gates as one, in order, with a fast path: a request
    to a tunnel without a policy on a relay without relay-wide settings
    costs one dictionary lookup.
    """

    def __init__(self, gates: list[Any], active: bool, refused: Callable[[str], object] | None = None) -> None:
        self.gates = gates
        #: Whether any relay-wide setting is on.
        self.active = active
        #: Called with a gate's C{limit} name when that gate refuses a
        #: request (the relay counts it in its metrics).
        self.refused = refused

    def check(self, request: VisitorRequest) -> Answer | Deferred[Answer | None] | None:
        if not self.active and not request.bindRequest.get("policy"):
            return None
        return self._from(0, request)

    def _from(self, start: int, request: VisitorRequest) -> Any:
        gates = self.gates
        for i in range(start, len(gates)):
            result = gates[i].check(request)
            if isinstance(result, Deferred):
                return result.addCallback(self._then, i + 1, request)
            if result is not None:
                self._count(gates[i])
                return result
        return None

    def _then(self, answer: Answer | None, start: int, request: VisitorRequest) -> Any:
        if answer is not None:
            self._count(self.gates[start - 1])
            return answer
        return self._from(start, request)

    def _count(self, gate: Any) -> None:
        limit = getattr(gate, "limit", None)
        if limit is not None and self.refused is not None:
            self.refused(limit)

    def stop(self) -> None:
        for gate in self.gates:
            stop = getattr(gate, "stop", None)
            if stop is not None:
                stop()


def policyGates(relay: Any) -> list[IVisitorGate]:
    """
    The relay's policy gate from its settings: IP rules, rates, quotas,
    basic auth and header rules, in that order.  It is always there so
    that per-tunnel settings work on any relay.
    """
    settings = relay.settings

    def clock() -> float:
        return float(relay.reactor.seconds())

    keys = (
        "ip-allow",
        "ip-deny",
        "rate-per-ip",
        "rate-per-tunnel",
        "rate-total",
        "quota-per-ip",
        "quota-per-tunnel",
        "add-header",
        "remove-header",
    )
    active = any(settings.get(key) for key in keys)
    gates: list[Any] = [
        IPGate(relay.visitorRules),
        RateGate(clock, settings.get("rate-per-ip"), settings.get("rate-per-tunnel"), settings.get("rate-total")),
        QuotaGate(relay, settings.get("quota-per-ip", 0), settings.get("quota-per-tunnel", 0)),
        BasicAuthGate(clock=clock, reactor=relay.reactor),
        HeaderGate(settings.get("add-header", []), settings.get("remove-header", [])),
    ]
    metrics = getattr(relay, "metrics", None)
    return [PolicyGate(gates, active, metrics.limitRejected if metrics is not None else None)]
