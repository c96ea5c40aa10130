"""
The relay and agent as services: tokens, plugins, listening, link errors.
"""

from __future__ import annotations

import socket
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, capturedLogs
from zope.interface.verify import verifyObject

from tests.conftest import Relay, RunningAgent, curl, startAgent, startRelay
from txtunnel.frames import FrameType, encodeFrame, encodeJSON
from txtunnel.interfaces import IForwarder
from txtunnel.plugins import forwarders
from txtunnel.relay.service import listenWithFallback


@pytest.fixture
def tokenRelay(tmp_path: Path) -> Any:
    r = pytest_twisted.blockon(defer.ensureDeferred(startRelay(str(tmp_path / "state"), "--token", "sesame-open-1")))
    yield r
    pytest_twisted.blockon(defer.maybeDeferred(r.service.stopService))


@pytest.mark.parametrize(
    "extra, words",
    [([], "this relay requires a token"), (["--token", "wrong-token-1"], "invalid or missing token")],
)
@pytest_twisted.ensureDeferred
async def test_token_required(
    tokenRelay: Relay, agents: list[RunningAgent], origin: int, extra: list[str], words: str
) -> None:
    """
    A relay with tokens refuses agents without the right one, with a reason
    the agent reports, and the agent gives up instead of retrying forever.
    """
    agent = await startAgent(agents, tokenRelay, "--http", str(origin), *extra, expectReady=False)
    with pytest.raises(RuntimeError, match=words):
        await agent.agent.ready
    assert not agent.service.client.running


@pytest_twisted.ensureDeferred
async def test_token_accepted(tokenRelay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    The right token opens tunnels.
    """
    await startAgent(agents, tokenRelay, "--http", str(origin), "--token", "sesame-open-1", "--subdomain", "ok")
    code, out, _ = await curl("-H", f"Host: ok.localhost:{tokenRelay.port}", f"http://127.0.0.1:{tokenRelay.port}/")
    assert code == 0 and b"hello from origin" in out


def test_builtin_forwarders_are_plugins() -> None:
    """
    Every built-in protocol (http, tcp, udp, tls, grpc, websocket, sse) is
    found with getPlugins and provides IForwarder.
    """
    found = forwarders()
    builtIn = {"http", "tcp", "udp", "tls", "grpc", "websocket", "sse"}
    assert builtIn <= set(found)
    for name in builtIn:
        assert verifyObject(IForwarder, found[name])
        assert verifyObject(IForwarder, found[name]._load())


def test_third_party_plugin_is_discovered(tmp_path: Path, monkeypatch: Any) -> None:
    """
    A module dropped into a twisted/plugins directory on sys.path adds a
    forwarder without any change to txtunnel.
    """
    plugins = tmp_path / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "thirdparty_echo.py").write_text(
        textwrap.dedent(
            """
            from txtunnel.plugins import LazyForwarder
            echo = LazyForwarder("echo3p", "txtunnel.forwarders.tcp.TCPForwarder", "third-party test plugin")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import twisted.plugins

    monkeypatch.setattr(twisted.plugins, "__path__", [str(plugins), *twisted.plugins.__path__])
    found = forwarders()
    assert "echo3p" in found
    assert verifyObject(IForwarder, found["echo3p"])
    sys.modules.pop("twisted.plugins.thirdparty_echo", None)


@pytest_twisted.ensureDeferred
async def test_default_port_taken_moves_on() -> None:
    """
    When a default port is taken the next free one is used and the log says so.
    """
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        with capturedLogs() as events:
            port = await listenWithFallback(
                reactor, f"tcp:{taken}:interface=127.0.0.1", Factory.forProtocol(Protocol), True, "HTTP"
            )
        try:
            assert port.getHost().port > taken
            assert any(e["log_level"] is LogLevel.warn and "was taken; listening on" in e["log_format"] for e in events)
        finally:
            await port.stopListening()
        with pytest.raises(Exception, match="Address already in use"):
            await listenWithFallback(
                reactor, f"tcp:{taken}:interface=127.0.0.1", Factory.forProtocol(Protocol), False, "HTTP"
            )
    finally:
        blocker.close()


class _Raw(WebSocketClientProtocol):  # type: ignore[misc]
    """
    A hand-driven link client that sends what the test tells it to.
    """

    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.closed.called:
            self.factory.closed.callback((code, reason))


async def rawLink(relay: Relay) -> _Raw:
    factory = WebSocketClientFactory(f"ws://localhost:{relay.port}/_txtunnel")
    factory.protocol = _Raw
    factory.opened = defer.Deferred()
    factory.closed = defer.Deferred()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", relay.port).connect(factory)
    return await factory.opened  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "payload, code",
    [
        (b"\xff" * 20, 4002),
        (encodeFrame(FrameType.DATA, 7, b"x"), 4002),
        (encodeJSON(FrameType.CONTROL, 0, {"op": "bind", "id": 1, "type": "http"}), 4003),
        (encodeJSON(FrameType.CONTROL, 0, {"op": "hello", "versions": [99]}), 4003),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_link_input_closes_only_that_link(
    relay: Relay, agents: list[RunningAgent], origin: int, payload: bytes, code: int
) -> None:
    """
    Garbage frames, frames for unknown streams, binds before hello and
    unknown versions close that link with a close code and reason, and a
    tunnel on another link keeps working.
    """
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "steady")
    raw = await rawLink(relay)
    raw.sendMessage(payload, isBinary=True)
    gotCode, reason = await raw.factory.closed
    assert gotCode == code
    assert reason
    status, out, _ = await curl("-H", f"Host: steady.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/")
    assert status == 0 and b"hello from origin" in out


@pytest_twisted.ensureDeferred
async def test_text_message_on_link_is_refused(relay: Relay) -> None:
    """
    Frames travel in binary messages; a text message is a protocol error.
    """
    raw = await rawLink(relay)
    raw.sendMessage(b"hello", isBinary=False)
    gotCode, reason = await raw.factory.closed
    assert gotCode == 4002
    assert "text message" in reason
