# -*- test-case-name: tests.test_plugins -*-
"""
Finding forwarders: every L{IForwarder} plugin on C{sys.path}.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins
from twisted.python.reflect import namedAny
from zope.interface import implementer

from txtunnel.interfaces import IForwarder

__all__ = ["LazyForwarder", "forwarders"]

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

    def __repr__(self) -> str:
        return f"<LazyForwarder {self.name} -> {self._implementation}>"
