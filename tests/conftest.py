"""
Fixtures for in-process end-to-end tests: a real relay and real agents on
loopback sockets, run by the global reactor under pytest-twisted, and local
origin servers for them to tunnel to.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import twisted.plugins
from twisted.internet import defer, reactor, task, threads, utils
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from txtunnel.agent import tap as agentTap
from txtunnel.agent.service import Agent, AgentService
from txtunnel.relay import tap as relayTap
from txtunnel.relay.service import RelayService

# Plugins come from this checkout's twisted/plugins first, so a test run sees
# the forwarders of the tree under test even when an older copy is installed.
_REPO_PLUGINS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "twisted", "plugins")
if _REPO_PLUGINS not in twisted.plugins.__path__:
    twisted.plugins.__path__.insert(0, _REPO_PLUGINS)


def freePortRange(count: int) -> tuple[int, int]:
    """
    A range of C{count} ports that were free a moment ago (the relay skips
    any that are taken by the time it binds).
    """
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count < 65000:
            return base, base + count - 1
    raise RuntimeError("no free port range")


async def wait(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class Relay:
    """
    A running in-process relay.
    """

    def __init__(self, service: RelayService) -> None:
        self.service = service
        self.relay = service.relay

    @property
    def port(self) -> int:
        assert self.relay.httpPort is not None
        return self.relay.httpPort

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


async def startRelay(tmp: str, *args: str) -> Relay:
    low, high = freePortRange(20)
    options = relayTap.Options(environ={})
    noAdmin = ["--admin", ""]  # no admin site on its fixed default port unless a test asks
    options.parseOptions(
        [
            "--http",
            "tcp:0:interface=127.0.0.1",
            "--tcp-ports",
            f"{low}-{high}",
            "--state-dir",
            tmp,
            "--drain-timeout",
            "1",
            *noAdmin,
            *args,
        ]
    )
    service: Any = relayTap.makeService(options, reactor)
    service.startService()
    await service.ready
    return Relay(service)


@pytest.fixture
def relay(tmp_path: Any) -> Iterator[Relay]:
    r = pytest_twisted.blockon(defer.ensureDeferred(startRelay(str(tmp_path / "state"))))
    yield r
    pytest_twisted.blockon(defer.maybeDeferred(r.service.stopService))


class RunningAgent:
    def __init__(self, agent: Agent, service: AgentService) -> None:
        self.agent = agent
        self.service = service

    def address(self, name: str | None = None) -> str:
        for t in self.agent.tunnels:
            if name is None or t.name == name:
                assert t.address is not None
                return t.address
        raise KeyError(name)

    async def stop(self) -> None:
        if self.service.running:
            await defer.maybeDeferred(self.service.stopService)


@pytest.fixture
def agents() -> Iterator[list[RunningAgent]]:
    started: list[RunningAgent] = []
    yield started
    for a in started:
        pytest_twisted.blockon(defer.ensureDeferred(a.stop()))


async def startAgent(
    agents: list[RunningAgent], relay: Relay, *args: str, expectReady: bool = True, adjust: Any = None
) -> RunningAgent:
    """
    An in-process agent linked to C{relay} with the command-line C{args};
    C{adjust}, if given, is called with the built L{Agent} before it starts
    (a test's hostile or old-fashioned agent).
    """
    options = agentTap.Options(environ={})
    # No admin site or inspector unless a test asks (they default to fixed ports).
    options.parseOptions(["--relay", relay.url, "--drain-timeout", "1", "--admin", "", "--inspect", "", *args])
    agent = agentTap.buildAgent(options, reactor)
    if adjust is not None:
        adjust(agent)
    service = AgentService(agent, **agentTap.serviceSettings(options), **agentTap.observeSettings(options))
    service.startService()
    running = RunningAgent(agent, service)
    agents.append(running)
    if expectReady:
        await agent.ready
    return running


# -- origin servers


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        lines = [b"hello from origin", b"path=" + request.uri]
        for name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"host"):
            lines.append(name + b"=" + (request.getHeader(name) or b""))
        return b"\n".join(lines) + b"\n"

    def render_POST(self, request: Any) -> bytes:
        data = request.content.read()
        request.setHeader(b"x-body-sha256", hashlib.sha256(data).hexdigest().encode())
        return data


class Big(Resource):
    """
    C{/big?n=BYTES}: streams deterministic bytes with a producer.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        n = int(request.args.get(b"n", [b"1048576"])[0])
        request.setHeader(b"content-length", str(n).encode())
        block = pattern(65536)

        class Producer:
            sent = 0

            def resumeProducing(self) -> None:
                if self.sent >= n:
                    return
                chunk = block[: min(len(block), n - self.sent)]
                self.sent += len(chunk)
                request.write(chunk)
                if self.sent >= n:
                    request.unregisterProducer()
                    request.finish()

            def stopProducing(self) -> None:
                self.sent = n

        request.registerProducer(Producer(), False)
        return NOT_DONE_YET


class Never(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        return NOT_DONE_YET


def pattern(size: int) -> bytes:
    seed = hashlib.sha256(b"txtunnel").digest()
    return (seed * (size // len(seed) + 1))[:size]


def originSite() -> Site:
    root = Resource()
    root.putChild(b"", Hello())
    root.putChild(b"hello", Hello())
    root.putChild(b"echo", Hello())
    root.putChild(b"big", Big())
    root.putChild(b"never", Never())
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    return site


@pytest.fixture
def origin() -> Iterator[int]:
    port = pytest_twisted.blockon(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(originSite()))
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """
    Echo with backpressure (reading pauses while the echo cannot be written)
    and half-close (on EOF, finish writing, then close).
    """

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.transport, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


@pytest.fixture
def echoServer() -> Iterator[int]:
    factory = Factory.forProtocol(Echo)
    factory.noisy = False
    port = pytest_twisted.blockon(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory))
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    """
    Run curl without blocking the reactor; return (exit code, stdout, stderr).
    """
    out, err, code = await utils.getProcessOutputAndValue("curl", ["-sS", "--max-time", "60", *args], env=os.environ)
    return code, out, err


async def inThread(fn: Any, *args: Any) -> Any:
    """
    Run blocking client code in a thread while the reactor serves the relay.
    """
    return await threads.deferToThread(fn, *args)


def closedPort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _isolateEnvironment(monkeypatch: Any, tmp_path: Any) -> None:
    for key in list(os.environ):
        if key.startswith("TXTUNNEL_"):
            monkeypatch.delenv(key)
    # Agent keys and relay state go to the test's own directory, not ~.
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


def needBrowser(what: str) -> None:
    """
    Skip without Chromium or Playwright -- but fail under CI (C{CI} set),
    where a missing browser must not pass as a skipped test.
    """
    import shutil

    missing = []
    if not (shutil.which("chromium") or os.path.exists("/usr/bin/chromium")):
        missing.append("chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright")
    if missing:
        why = f"{what} needs {' and '.join(missing)} (apt-get install chromium; pip install playwright)"
        if os.environ.get("CI"):
            pytest.fail(why + " (CI is set, so this is not skipped)")
        pytest.skip(why)


def readHead(sock: socket.socket) -> bytes | None:
    """
    Read from C{sock} up to the end of an HTTP head (the bytes read, which
    may run past it), or C{None} if the peer closes first: for the small
    hand-written servers and clients of the tests.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    return data


@pytest.fixture
def relays() -> Iterator[list[Relay]]:
    """
    Relays a test starts itself (with options of its own), stopped after it.
    """
    started: list[Relay] = []
    yield started
    for r in started:
        pytest_twisted.blockon(defer.maybeDeferred(r.service.stopService))
