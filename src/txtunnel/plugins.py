# -*- test-case-name: tests.test_relay_agent,tests.test_third_party_plugin,tests.test_streaming -*-
"""
Finding forwarders: every L{IForwarder} plugin on C{sys.path}, and the one
that handles a request to an C{http} tunnel (L{requestForwarder}).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins
from twisted.python.reflect import namedAny
from zope.interface import implementer

from txtunnel.interfaces import IForwarder

__all__ = ["LazyForwarder", "forwarderNamed", "forwarders", "requestForwarder", "wireOf"]

log = Logger()


def forwarders() -> dict[str, IForwarder]:
    """
    All forwarder plugins by name.  When two plugins claim one name, the
    first found wins and the clash is logged.
    """
    import twisted.plugins

    found: dict[str, IForwarder] = {}
    for plugin in getPlugins(IForwarder, twisted.plugins):
        name = plugin.name
        if name in found:
            if repr(found[name]) != repr(plugin):
                log.warn("two forwarder plugins are named {name!r}; using {kept!r}", name=name, kept=found[name])
            continue
        found[name] = plugin
    return found


#: The agent's forwarders by name, found once, for L{forwarderNamed}.
_named: dict[str, IForwarder] = {}
_namedAt: float | None = None
#: Seconds between two searches for a name not found.
_RESCAN = 1.0


def forwarderNamed(name: str) -> IForwarder | None:
    """
    The forwarder plugin called C{name}, for the agent's HTTP forwarder to
    hand a stream to the one the relay chose.  Plugins are searched once;
    a name not found searches again at most once a second, so a plugin
    added to C{sys.path} while running is found without every stream
    paying for a search.
    """
    global _namedAt
    found = _named.get(name)
    if found is None:
        now = time.monotonic()
        if _namedAt is None or now - _namedAt >= _RESCAN:
            _namedAt = now
            _named.clear()
            _named.update(forwarders())
            found = _named.get(name)
    return found


def wireOf(forwarder: Any) -> str:
    """
    How a forwarder takes the requests it claims from the relay's HTTP/2
    edge: C{"h2"} (HTTP/2 messages, L{txtunnel.h2messages}) or
    C{"http/1.1"} (bytes of HTTP/1.1, the default).
    """
    wire = getattr(forwarder, "wire", None)
    return "h2" if wire == "h2" else "http/1.1"


def requestForwarder(known: Mapping[str, Any], tunnelType: str, head: Any) -> Any:
    """
    The forwarder that handles one visitor request (a
    L{txtunnel.http1.RequestHead}) to a tunnel of type C{tunnelType}.

    A tunnel asked for by name (C{type = websocket}, C{grpc}, a third
    party's) keeps its own forwarder.  For an C{http} tunnel every other
    forwarder that has the optional C{handlesRequest(head)} is asked, in
    name order, and the first that says C{True} takes the request; when
    none does, the C{http} forwarder keeps it.  A forwarder that raises is
    logged and counted as saying no, so a broken plugin cannot take a
    tunnel's traffic down.

    @return: the forwarder, or C{None} if C{tunnelType} is unknown.
    """
    own = known.get(tunnelType)
    if tunnelType != "http":
        return own
    for name in sorted(known):
        if name == tunnelType:
            continue
        forwarder = known[name]
        claims = getattr(forwarder, "handlesRequest", None)
        if claims is None:
            continue
        try:
            if claims(head):
                return forwarder
        except Exception:
            log.failure("forwarder {name!r} failed deciding on a request", name=name)
    return own


def _claimsNothing(head: Any) -> bool:
    return False


@implementer(IPlugin, IForwarder)
class LazyForwarder:
    """
    A forwarder plugin that imports its implementation only when first used,
    so that plugin discovery (every C{twistd --help}) stays cheap.  Third-party
    plugins may use it too::

        myproto = LazyForwarder("myproto", "mypkg.forwarder.MyForwarder", "what it does")

    @ivar name: the forwarder's name.
    @ivar description: one line for help text.
    """

    def __init__(self, name: str, implementation: str, description: str) -> None:
        self.name = name
        self.description = description
        self._implementation = implementation
        self._real: IForwarder | None = None
        self._claims: Callable[[Any], object] | None = None

    def _load(self) -> IForwarder:
        if self._real is None:
            real = namedAny(self._implementation)()
            self._real = IForwarder(real)
        return self._real

    def bindRequest(self, tunnel: Any) -> dict[str, Any]:
        return self._load().bindRequest(tunnel)  # type: ignore[no-any-return]

    def bind(self, relay: Any, tunnel: Any) -> Any:
        return self._load().bind(relay, tunnel)

    def connect(self, tunnel: Any, stream: Any) -> None:
        self._load().connect(tunnel, stream)

    def handlesRequest(self, head: Any) -> bool:
        """
        The implementation's C{handlesRequest}, or C{False} when it has
        none (it claims no requests of C{http} tunnels).
        """
        claims = self._claims
        if claims is None:
            # Asked for every request of every http tunnel: look it up once.
            found = getattr(self._load(), "handlesRequest", None)
            claims = self._claims = found if found is not None else _claimsNothing
        return bool(claims(head))

    @property
    def wire(self) -> str:
        """
        The implementation's C{wire} (see L{wireOf}).
        """
        return wireOf(self._load())

    def __repr__(self) -> str:
        return f"<LazyForwarder {self.name} -> {self._implementation}>"
