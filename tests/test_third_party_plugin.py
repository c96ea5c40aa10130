"""
A third-party forwarder, exactly as docs/writing-a-forwarder.rst writes it,
dropped into a temporary C{twisted/plugins/} on C{sys.path}: found by relay
and agent, and tunnelling real traffic with no change to txtunnel — in
process, and as C{twistd} processes.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from zope.interface.verify import verifyObject

from tests.conftest import RunningAgent, freePortRange, inThread, startAgent, startRelay
from tests.test_contract import Proc, tool
from txtunnel.interfaces import IForwarder
from txtunnel.plugins import forwarders

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "writing-a-forwarder.rst"


def exampleFiles() -> dict[str, str]:
    """
    The code blocks of the tutorial that start with C{# file: PATH}.
    """
    files: dict[str, str] = {}
    lines = DOC.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip().startswith(".. code-block:: python"):
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("   ")):
                block.append(lines[i])
                i += 1
            code = textwrap.dedent("\n".join(block)).strip("\n") + "\n"
            match = re.match(r"# file: (\S+)\n", code)
            if match:
                files[match.group(1)] = code
            continue
        i += 1
    return files


def writeExample(where: Path) -> Path:
    files = exampleFiles()
    assert set(files) == {"txupper/__init__.py", "txupper/forwarder.py", "twisted/plugins/txupper_plugin.py"}
    for name, code in files.items():
        path = where / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    assert not (where / "twisted" / "__init__.py").exists()
    assert not (where / "twisted" / "plugins" / "__init__.py").exists()
    return where


def forgetExample() -> None:
    for name in list(sys.modules):
        if name == "txupper" or name.startswith("txupper.") or name == "twisted.plugins.txupper_plugin":
            del sys.modules[name]


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: Any) -> Iterator[Path]:
    """
    The example on C{sys.path} and in C{twisted.plugins}' search path, as
    Twisted's C{pluginPackagePaths} would have put it at start-up.
    """
    forgetExample()
    root = writeExample(tmp_path / "thirdparty")
    monkeypatch.syspath_prepend(str(root))
    import twisted.plugins

    monkeypatch.setattr(twisted.plugins, "__path__", [str(root / "twisted" / "plugins"), *twisted.plugins.__path__])
    yield root
    forgetExample()


def echoThrough(port: int, data: bytes) -> bytes:
    received: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:

        def reader() -> None:
            while True:
                chunk = s.recv(1 << 16)
                if not chunk:
                    return
                received.append(chunk)

        thread = threading.Thread(target=reader)
        thread.start()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        thread.join(60)
    return b"".join(received)


def test_discovered_lazily_and_provides_the_interface(plugin: Path) -> None:
    """
    The plugin is found among the built-ins; finding it imports only the
    small plugin module, not the implementation.
    """
    found = forwarders()
    assert {"http", "tcp", "upper"} <= set(found)
    assert "txupper.forwarder" not in sys.modules
    assert verifyObject(IForwarder, found["upper"])
    from txupper.forwarder import UpperForwarder  # type: ignore[import-not-found]

    assert verifyObject(IForwarder, UpperForwarder())
    assert found["upper"].description == UpperForwarder.description


@pytest_twisted.ensureDeferred
async def test_in_process_traffic(plugin: Path, tmp_path: Path, agents: list[RunningAgent], echoServer: int) -> None:
    """
    A relay and an agent (configured with agent.ini, C{type = upper}) carry
    1 MiB through the plugin's tunnel, both ways, with its transformation.
    """
    relay = await startRelay(str(tmp_path / "state"))
    try:
        assert "upper" in relay.relay.forwarders
        config = tmp_path / "agent.ini"
        config.write_text(f"[tunnel:shout]\ntype = upper\ntarget = {echoServer}\n")
        agent = await startAgent(agents, relay, "--config", str(config))
        address = agent.address("shout")
        match = re.fullmatch(r"upper://127\.0\.0\.1:(\d+)", address)
        assert match, address
        port = int(match.group(1))
        assert relay.relay.ports.inUse(port)
        assert await inThread(echoThrough, port, b"hello, tunnel\n") == b"HELLO, TUNNEL\n"
        data = os.urandom(1 << 20)
        assert await inThread(echoThrough, port, data) == data.upper()
        await agent.stop()
        for _ in range(100):
            if not relay.relay.ports.inUse(port):
                break
            await defer.ensureDeferred(_sleep(0.05))
        assert not relay.relay.ports.inUse(port), "the binding did not free its port"
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_local_service_down(plugin: Path, tmp_path: Path, agents: list[RunningAgent]) -> None:
    """
    With nothing listening at the plugin tunnel's target, a visitor's
    connection is closed at once with nothing sent, and the agent logs a
    line naming the target and the refusal (the tutorial's C{connect}).
    """
    from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
    from zope.interface import provider

    from tests.conftest import closedPort

    events: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        events.append(formatEvent(event))

    target = closedPort()
    relay = await startRelay(str(tmp_path / "state"))
    globalLogPublisher.addObserver(observe)
    try:
        config = tmp_path / "agent.ini"
        config.write_text(f"[tunnel:shout]\ntype = upper\ntarget = {target}\n")
        agent = await startAgent(agents, relay, "--config", str(config))
        port = int(agent.address("shout").rsplit(":", 1)[1])

        def visit() -> tuple[bytes, float]:
            import time

            start = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
                    s.sendall(b"anyone there?\n")
                    got = s.recv(1024)
            except (ConnectionResetError, BrokenPipeError):  # closed, or reset: either is a close
                got = b""
            return got, time.monotonic() - start

        got, after = await inThread(visit)
        assert got == b""
        assert after < 5, f"the visitor waited {after:.1f}s"
        for _ in range(100):
            if any("unreachable" in e for e in events):
                break
            await _sleep(0.05)
        [line] = [e for e in events if "unreachable" in e]
        assert f"local service 127.0.0.1:{target} unreachable" in line and "refused" in line.lower()
    finally:
        globalLogPublisher.removeObserver(observe)
        await defer.maybeDeferred(relay.service.stopService)


async def _sleep(seconds: float) -> None:
    from twisted.internet import reactor, task

    await task.deferLater(reactor, seconds, lambda: None)


@pytest.mark.contract
def test_twistd_relay_and_agent_find_the_plugin(tmp_path: Path) -> None:
    """
    C{twistd tunnelrelay} and C{twistd tunnelagent}, with only C{PYTHONPATH}
    pointing at the plugin (and this checkout), tunnel through it.
    """
    root = writeExample(tmp_path / "thirdparty")
    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen(8)
    echo.settimeout(30)
    stop = threading.Event()

    def serveEcho() -> None:
        while not stop.is_set():
            try:
                conn, _ = echo.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serveEcho, daemon=True)
    thread.start()

    env = {k: v for k, v in os.environ.items() if not k.startswith("TXTUNNEL_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(root), str(ROOT / "src")]),
        PYTHONUNBUFFERED="1",
        HOME=str(tmp_path / "home"),
        XDG_STATE_HOME=str(tmp_path / "xdg"),
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        httpPort = s.getsockname()[1]
    low, high = freePortRange(10)
    procs: list[Proc] = []
    try:
        relay = Proc(
            [tool("twistd"), "-n", "--pidfile=", "tunnelrelay", "--http", f"tcp:{httpPort}:interface=127.0.0.1",
             "--tcp-ports", f"{low}-{high}", "--state-dir", str(tmp_path / "state")],
            env=env,
        )  # fmt: skip
        procs.append(relay)
        relay.waitFor(r"tunnels: .*\bupper\b")
        config = tmp_path / "agent.ini"
        config.write_text(
            f"[agent]\nrelay = ws://127.0.0.1:{httpPort}\n\n[tunnel:shout]\ntype = upper\ntarget = {echo.getsockname()[1]}\n"
        )
        agent = Proc([tool("twistd"), "-n", "--pidfile=", "tunnelagent", "--config", str(config)], env=env)
        procs.append(agent)
        match = agent.waitFor(r"tunnel ready: upper://127\.0\.0\.1:(\d+)")
        port = int(match.group(1))
        assert low <= port <= high
        assert echoThrough(port, b"through twistd\n") == b"THROUGH TWISTD\n"
        data = os.urandom(256 * 1024)
        assert echoThrough(port, data) == data.upper()
    finally:
        for p in reversed(procs):
            p.stop()
        stop.set()
        echo.close()
