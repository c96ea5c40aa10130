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
import time
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


def agentOptions(*args: str) -> Any:
    from txtunnel.agent.tap import Options

    options = Options(environ={})
    options.parseOptions(list(args))
    return options


def configError(config: Path) -> str:
    from twisted.python import usage

    with pytest.raises(usage.UsageError) as e:
        agentOptions("--config", str(config))
    return str(e.value)


def test_plugin_setting_parses(plugin: Path, tmp_path: Path) -> None:
    """
    The plugin's own key, C{greeting}, is taken in an C{upper} section and
    coerced by the plugin's function into C{tunnel.options}; a section
    without it gets nothing (the declared default is C{None}).
    """
    config = tmp_path / "agent.ini"
    config.write_text(
        "[tunnel:shout]\ntype = upper\ntarget = 7000\ngreeting =   hi there  \n\n"
        "[tunnel:quiet]\ntype = upper\ntarget = 7001\nremote-port = 20001\n"
    )
    byName = {t["name"]: t for t in agentOptions("--config", str(config)).tunnels}
    assert byName["shout"]["options"] == {"response-timeout": 120.0, "greeting": "hi there"}
    assert byName["quiet"]["options"] == {"response-timeout": 120.0, "remote-port": 20001}


def test_plugin_setting_errors(plugin: Path, tmp_path: Path) -> None:
    """
    A bad value of the plugin's key gives the plugin's message after the
    file, section and key; the key on a tunnel of another type is refused
    naming the type that has it; a key nobody declares lists what an
    C{upper} tunnel takes, its own key included and the http-only ones not.
    """
    config = tmp_path / "agent.ini"
    config.write_text(f"[tunnel:shout]\ntype = upper\ntarget = 7000\ngreeting = {'x' * 81}\n")
    message = configError(config)
    assert message.startswith(f"{config} [tunnel:shout] greeting: 'xxx")
    assert "is not a line of at most 80 printable ASCII characters" in message
    config.write_text("[tunnel:db]\ntype = tcp\ntarget = 5432\ngreeting = hello\n")
    assert configError(config) == f"{config} [tunnel:db] greeting: only tunnels of type = upper have one"
    config.write_text("[tunnel:shout]\ntype = upper\ntarget = 7000\ncolour = red\n")
    message = configError(config)
    assert message.startswith(f"{config} [tunnel:shout] colour: unknown key; expected one of type, target, ")
    assert message.endswith(", greeting")
    assert "basic-auth" not in message and "udp-idle-timeout" not in message


@pytest_twisted.ensureDeferred
async def test_plugin_setting_reaches_connect(
    plugin: Path, tmp_path: Path, agents: list[RunningAgent], echoServer: int
) -> None:
    """
    The greeting set in agent.ini reaches the plugin's C{connect} through
    C{tunnel.options}: every visitor reads it before the upper-cased echo.
    """
    relay = await startRelay(str(tmp_path / "state"))
    try:
        config = tmp_path / "agent.ini"
        config.write_text(f"[tunnel:shout]\ntype = upper\ntarget = {echoServer}\ngreeting = WELCOME\n")
        agent = await startAgent(agents, relay, "--config", str(config))
        port = int(agent.address("shout").rsplit(":", 1)[1])
        assert await inThread(echoThrough, port, b"hello\n") == b"WELCOME\nHELLO\n"
        assert await inThread(echoThrough, port, b"again\n") == b"WELCOME\nAGAIN\n"
        await agent.stop()
    finally:
        await defer.maybeDeferred(relay.service.stopService)


def test_broken_setting_declarations(tmp_path: Path) -> None:
    """
    A plugin whose declaration is wrong (a key every tunnel has already, a
    key twice, something that is not a setting) is refused naming the
    forwarder, at config time, instead of silently shadowing the core.
    """
    from txtunnel.agent.tap import TUNNEL_KEYS
    from txtunnel.plugins import Setting, settingsOf

    class Declares:
        name = "odd"

        def __init__(self, *settings: Any) -> None:
            self.settings = settings

    reserved = frozenset(TUNNEL_KEYS)
    with pytest.raises(ValueError, match="'odd' declares the setting 'subdomain', which every tunnel has already"):
        settingsOf(Declares(Setting("subdomain", str)), reserved)
    with pytest.raises(ValueError, match="'odd' declares the setting 'x' twice"):
        settingsOf(Declares(Setting("x", str), Setting("x", int)), reserved)
    with pytest.raises(ValueError, match="'odd' declares a setting that is not a txtunnel.plugins.Setting"):
        settingsOf(Declares(("x", str)), reserved)
    with pytest.raises(ValueError, match="not a txtunnel.plugins.Setting"):
        settingsOf(Declares(Setting("Bad Key", str)), reserved)
    assert settingsOf(Declares(), reserved) == {}


def test_help_imports_no_implementation(plugin: Path) -> None:
    """
    Discovery and the agent's C{--help} import no forwarder implementation,
    the plugin's or a built-in's: settings are read only when a
    configuration is.
    """
    import subprocess

    code = (
        "import sys\n"
        "from txtunnel.plugins import forwarders\n"
        "from txtunnel.agent.tap import Options\n"
        "assert 'upper' in forwarders()\n"
        "try:\n"
        "    Options(environ={}).parseOptions(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('txupper.', 'txtunnel.forwarders.'))), file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TXTUNNEL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(plugin), str(ROOT / "src")])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "[]"


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
            f"\n[tunnel:greeted]\ntype = upper\ntarget = {echo.getsockname()[1]}\ngreeting = VIA TWISTD\n"
        )
        agent = Proc([tool("twistd"), "-n", "--pidfile=", "tunnelagent", "--config", str(config)], env=env)
        procs.append(agent)
        agent.waitFor(r"tunnel ready: upper://127\.0\.0\.1:(\d+)")
        ready = re.compile(r"tunnel ready: upper://127\.0\.0\.1:(\d+)")
        for _ in range(400):
            ports = [int(m.group(1)) for line in list(agent.lines) if (m := ready.search(line))]
            if len(ports) == 2:
                break
            time.sleep(0.05)
        assert len(ports) == 2, agent.output
        assert all(low <= p <= high for p in ports)
        # One tunnel has the plugin's own setting (greeting), the other not.
        replies = {p: echoThrough(p, b"which?\n") for p in ports}
        assert sorted(replies.values()) == [b"VIA TWISTD\nWHICH?\n", b"WHICH?\n"]
        [port] = [p for p in ports if replies[p] == b"WHICH?\n"]
        assert echoThrough(port, b"through twistd\n") == b"THROUGH TWISTD\n"
        data = os.urandom(256 * 1024)
        assert echoThrough(port, data) == data.upper()
    finally:
        for p in reversed(procs):
            p.stop()
        stop.set()
        echo.close()
