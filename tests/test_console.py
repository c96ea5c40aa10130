"""
The live status screen: its rendering (a rich Console writing to a
StringIO), when it is used, and the screen following a real agent's
requests.
"""

from __future__ import annotations

import io
from typing import Any

import pytest_twisted
from rich.console import Console

from tests.conftest import Relay, RunningAgent, curl, startAgent
from txtunnel import cli
from txtunnel.console import ConsoleLog, StatusScreen, renderStatus


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
