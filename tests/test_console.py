"""
The live status screen: its rendering (a rich Console writing to a
StringIO), when it is used, the screen following a real agent's
requests, and (contract) C{txtunnel http} run on a real pseudo-terminal
and into a pipe.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from rich.console import Console

from tests.conftest import Relay, RunningAgent, curl, startAgent
from tests.test_contract import Proc, env, freePort, procs, tool, webRoot
from tests.test_contract import curl as curlSync
from txtunnel import cli
from txtunnel.console import ConsoleLog, StatusScreen, renderStatus

__all__ = ["env", "procs", "webRoot"]  # fixtures


def rendered(view: dict[str, Any], width: int = 120) -> str:
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=False, color_system=None).print(renderStatus(view))
    return out.getvalue()


VIEW: dict[str, Any] = {
    "relay": "ws://relay.example:8080",
    "state": "online",
    "tunnels": [("http://demo.relay.example:8080/", "127.0.0.1:8000", "http")],
    "streams": 3,
    "requests": 42,
    "inspector": "http://127.0.0.1:4040/",
    "recent": [
        (0.0, "GET", "/api/items?page=2", 200, 0.0123),
        (0.0, "POST", "/hook", 502, 1.5),
        (0.0, "GET", "/slow", None, None),
    ],
}


def test_render_status() -> None:
    text = rendered(VIEW)
    for words in (
        "online",
        "ws://relay.example:8080",
        "http://demo.relay.example:8080/ -> 127.0.0.1:8000",
        "http://127.0.0.1:4040/",
        "3 open, 42 requests",
        "/api/items?page=2",
        "12 ms",
        "1500 ms",
        "502",
    ):
        assert words in text, words
    lines = [line for line in text.splitlines() if "/slow" in line]
    assert len(lines) == 1 and "..." in lines[0]


def test_render_empty_and_stopped() -> None:
    text = rendered(dict(VIEW, state="stopped: relay refused this agent", recent=[], inspector=None))
    assert "stopped: relay refused this agent" in text and "No requests yet." in text
    assert "Inspector" not in text


def test_long_paths_are_cut_not_wrapped() -> None:
    text = rendered(dict(VIEW, recent=[(0.0, "GET", "/" + "x" * 300, 200, 0.001)]), width=100)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "x" * 300 not in text


def test_console_only_on_a_terminal() -> None:
    class TTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    options = cli.Options()
    options.parseOptions(["http", "8000"])
    assert cli.wantsConsole("http", options.subOptions, "text", TTY())
    assert not cli.wantsConsole("http", options.subOptions, "text", io.StringIO())
    assert not cli.wantsConsole("http", options.subOptions, "json", TTY())
    assert not cli.wantsConsole("relay", {}, "text", TTY())
    options = cli.Options()
    options.parseOptions(["http", "8000", "--no-console"])
    assert not cli.wantsConsole("http", options.subOptions, "text", TTY())


@pytest_twisted.ensureDeferred
async def test_screen_follows_requests(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    A real agent's requests show on the screen; log lines print above it.
    """
    from twisted.internet import reactor

    agent = await startAgent(agents, relay, "--http", str(origin), "--subdomain", "screen")
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, color_system=None)
    screen = StatusScreen(agent.agent, console, reactor, lambda: "http://127.0.0.1:4040/")
    screen.start()
    try:
        ConsoleLog(console).write("12:00:00 a log line\n")
        code, body, err = await curl(
            "-H", f"Host: screen.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/hello"
        )
        assert code == 0, err
    finally:
        screen.stop()
    text = out.getvalue()
    assert "a log line" in text
    assert "/hello" in text and "200" in text and "online" in text
    assert screen.requests == 1
    assert screen._event not in agent.agent.traffic.listeners


#: An escape sequence: CSI (colours, cursor moves) or another ESC-led one.
ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")


class PtyProc:
    """
    A subprocess whose standard input, output and error are the slave side
    of a real pseudo-terminal (C{pty.openpty}, 120x40), read by a thread.
    """

    def __init__(self, args: list[str], environ: dict[str, str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.master = master
        self.popen = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=environ, start_new_session=True, close_fds=True
        )
        os.close(slave)
        self.raw = b""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO once the child has closed the terminal
                return
            if not chunk:
                return
            self.raw += chunk

    @property
    def text(self) -> str:
        """
        What was written, escape sequences removed.
        """
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def waitFor(self, *words: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(w in self.text for w in words):
                return
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"never saw {words!r} on the terminal; it showed:\n{self.text}")

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._thread.join(5)
        os.close(self.master)
        return self.popen.returncode


def cliRelay(procs: list[Proc], env: dict[str, str], tmp_path: Path) -> int:
    port = freePort()
    relay = Proc(
        [tool("txtunnel"), "relay", "--http", f"tcp:{port}:interface=127.0.0.1", "--state-dir", str(tmp_path / "s")],
        env,
    )
    procs.append(relay)
    relay.waitFor("relay listening on")
    return port


@pytest.mark.contract
def test_status_screen_on_a_real_terminal(tmp_path: Path, procs: list[Proc], env: dict[str, str], webRoot: int) -> None:
    """
    txtunnel http on a pseudo-terminal draws the status screen (rich,
    escape sequences): state, the public URL, and a row for a request made
    through the tunnel, with its status; Ctrl-C ends it cleanly.
    """
    port = cliRelay(procs, env, tmp_path)
    termEnv = dict(env, TERM="xterm-256color", COLUMNS="120", LINES="40")
    termEnv.pop("NO_COLOR", None)
    agent = PtyProc(
        [tool("txtunnel"), "http", str(webRoot), "--relay", f"ws://127.0.0.1:{port}", "-s", "screen"], termEnv
    )
    try:
        url = f"http://screen.localhost:{port}/"
        agent.waitFor("online", f"Tunnel (http)  {url}")
        result = curlSync("-H", f"Host: screen.localhost:{port}", f"http://127.0.0.1:{port}/index.html")
        assert result.stdout == b"hello through twistd\n", result.stderr
        agent.waitFor("/index.html")
        rows = [line for line in agent.text.splitlines() if "/index.html" in line]
        assert any(re.search(r"\bGET\b.*\b200\b", row) for row in rows), rows
        assert b"\x1b[" in agent.raw  # drawn, not logged
        lines = agent.text.splitlines()
        # The screen's own rows (the log line "tunnel ready: URL" prints above it).
        assert any(line.startswith("Relay") and f"ws://127.0.0.1:{port}" in line for line in lines)
        assert any(line.startswith("Tunnel (http)") and url in line for line in lines)
    finally:
        code = agent.stop()
    assert code == 0, agent.text
    assert "Traceback" not in agent.text


@pytest.mark.contract
def test_plain_lines_when_piped(tmp_path: Path, procs: list[Proc], env: dict[str, str], webRoot: int) -> None:
    """
    With its output going to a pipe, txtunnel http writes plain log lines
    (the tunnel's URL, an access line per request) and no escape codes.
    """
    port = cliRelay(procs, env, tmp_path)
    agent = Proc(
        [tool("txtunnel"), "http", str(webRoot), "--relay", f"ws://127.0.0.1:{port}", "-s", "piped"],
        dict(env, TERM="xterm-256color"),
    )
    procs.append(agent)
    agent.waitFor(re.escape(f"tunnel ready: http://piped.localhost:{port}/"))
    result = curlSync("-H", f"Host: piped.localhost:{port}", f"http://127.0.0.1:{port}/index.html")
    assert result.stdout == b"hello through twistd\n", result.stderr
    agent.waitFor(r"GET .*/index\.html 200")
    assert agent.stop(signal.SIGINT) == 0
    assert "\x1b" not in agent.output
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in agent.lines if line), agent.output
