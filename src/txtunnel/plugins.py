# -*- test-case-name: tests.test_relay_agent,tests.test_third_party_plugin,tests.test_streaming -*-
"""
Finding forwarders: every L{IForwarder} plugin on C{sys.path}, the one
that handles a request to an C{http} tunnel (L{requestForwarder}), and the
tunnel settings a forwarder declares (L{Setting}, L{settingsOf}).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins
from twisted.python.reflect import namedAny
from zope.interface import implementer

from txtunnel.interfaces import IForwarder

__all__ = ["LazyForwarder", "Setting", "forwarderNamed", "forwarders", "requestForwarder", "settingsOf", "wireOf"]

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


@dataclass(frozen=True)
class Setting:
    """
    One C{[tunnel:NAME]} key that a forwarder declares in its optional
    C{settings} (see L{IForwarder}), so that a tunnel type can have
    settings of its own without the core knowing them by name.

    @ivar key: the key, lower-case letters, digits and C{-}
        (e.g. C{"udp-idle-timeout"}); the coerced value is
        C{tunnel.options[key]} on the agent.
    @ivar coerce: turns the text from the config file into the value;
        raises C{ValueError} with a message saying what was expected, which
        the agent shows after the file, section and key.
    @ivar default: the value a tunnel gets when the key is not given;
        C{None} puts nothing in C{tunnel.options} (the forwarder then uses
        its own default, e.g. C{tunnel.options.get(key, 15.0)}).
    @ivar doc: one line for help text and docs.
    """

    key: str
    coerce: Callable[[str], Any]
    default: Any = None
    doc: str = ""


#: What a setting's key may look like: the spelling of INI keys and options.
_KEY = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*\Z")


def settingsOf(forwarder: Any, reserved: frozenset[str] = frozenset()) -> dict[str, Setting]:
    """
    The settings a forwarder declares (its optional C{settings}), by key,
    checked: a forwarder with a malformed declaration, two settings with
    one key, or a key in C{reserved} (those of the core, shared by every
    tunnel type) is a mistake of the plugin, reported rather than guessed at.

    Reading C{settings} of a L{LazyForwarder} imports the implementation:
    the agent does it when it reads its configuration, never at plugin
    discovery.

    @raise ValueError: naming the forwarder and what is wrong.
    """
    name = getattr(forwarder, "name", "?")
    declared = getattr(forwarder, "settings", None) or ()
    found: dict[str, Setting] = {}
    for setting in declared:
        key = getattr(setting, "key", None)
        if not isinstance(key, str) or not _KEY.match(key) or not callable(getattr(setting, "coerce", None)):
            raise ValueError(
                f"forwarder {name!r} declares a setting that is not a txtunnel.plugins.Setting: {setting!r}"
            )
        if key in reserved:
            raise ValueError(f"forwarder {name!r} declares the setting {key!r}, which every tunnel has already")
        if key in found:
            raise ValueError(f"forwarder {name!r} declares the setting {key!r} twice")
        found[key] = setting
    return found


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
    def settings(self) -> Any:
        """
        The implementation's C{settings} (see L{Setting}); reading it
        imports the implementation, so only the agent's configuration
        parsing does.
        """
        return getattr(self._load(), "settings", ())

    def checkSettings(self, options: dict[str, Any], where: Callable[[str], str]) -> None:
        """
        The implementation's C{checkSettings}, if it has one.
        """
        check = getattr(self._load(), "checkSettings", None)
        if check is not None:
            check(options, where)

    @property
    def wire(self) -> str:
        """
        The implementation's C{wire} (see L{wireOf}).
        """
        return wireOf(self._load())

    def __repr__(self) -> str:
        return f"<LazyForwarder {self.name} -> {self._implementation}>"
