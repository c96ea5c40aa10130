# -*- test-case-name: tests.test_console -*-
"""
The live status screen of C{txtunnel http|tcp|udp|tls} in a terminal.

When standard output is a terminal (and C{--no-console} is not given) the
command shows, with C{rich}, the relay, the link's state, the public
addresses, connection counts and the last requests with their status and
latency, redrawn as they happen; log lines print above it.  Otherwise it
writes plain log lines only.

L{renderStatus} is a pure function of a L{snapshot}, so it can be tested
with a C{rich} console writing to a C{StringIO}.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text
from twisted.internet.task import LoopingCall

from txtunnel.traffic import Capture

__all__ = ["ConsoleLog", "StatusScreen", "renderStatus", "snapshot"]

#: Requests shown.
RECENT = 12


def linkState(agent: Any) -> str:
    """
    A word for the link: C{online}, C{connecting}, C{negotiating},
    C{reconnecting}, C{draining}, C{closed} or C{stopped: reason}.
    """
    if agent.failure is not None:
        return f"stopped: {agent.failure}"
    state = getattr(getattr(agent, "state", None), "value", None)
    if isinstance(state, str):
        # The agent's link state machine (L{txtunnel.agent.states}).
        return "online" if state == "connected" else state
    session = agent.session
    if session is None:
        return "reconnecting" if agent.metrics.everConnected else "connecting"
    if session.state == "hello":
        return "handshake"
    return "online"


def snapshot(agent: Any, recent: deque[Capture], requests: int, inspector: str | None) -> dict[str, Any]:
    """
    What the screen shows, as plain data.
    """
    session = agent.session
    return {
        "relay": agent.relayURL,
        "state": linkState(agent),
        "tunnels": [(t.address or "(not bound)", f"{t.target[0]}:{t.target[1]}", t.type) for t in agent.tunnels],
        "streams": len(session.link.streams) if session is not None else 0,
        "requests": requests,
        "inspector": inspector,
        "recent": [
            (c.wallStarted, c.method, c.target, c.status if c.done or c.status else None, c.duration)
            for c in reversed(recent)
        ],
    }


def _statusStyle(status: int | None) -> str:
    if status is None:
        return "dim"
    if 200 <= status < 300:
        return "green"
    if 300 <= status < 400:
        return "cyan"
    if 400 <= status < 500:
        return "yellow"
    return "red"


def renderStatus(view: dict[str, Any]) -> RenderableType:
    """
    The status screen for C{view} (see L{snapshot}).
    """
    state = view["state"]
    stateStyle = "green" if state == "online" else "red" if state.startswith("stopped") else "yellow"
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold", no_wrap=True)
    head.add_column()
    head.add_row("txtunnel", Text(state, style=stateStyle))
    head.add_row("Relay", view["relay"])
    for address, target, kind in view["tunnels"]:
        head.add_row(f"Tunnel ({kind})", f"{address} -> {target}")
    if view.get("inspector"):
        head.add_row("Inspector", view["inspector"])
    head.add_row("Connections", f"{view['streams']} open, {view['requests']} requests")
    recent = Table(title="Recent requests", title_justify="left", expand=False, show_edge=False, pad_edge=False)
    recent.add_column("Time", style="dim", no_wrap=True)
    recent.add_column("Method", no_wrap=True)
    recent.add_column("Path", overflow="ellipsis", no_wrap=True, max_width=60)
    recent.add_column("Status", justify="right", no_wrap=True)
    recent.add_column("Latency", justify="right", no_wrap=True)
    for started, method, target, status, duration in view["recent"]:
        recent.add_row(
            time.strftime("%H:%M:%S", time.localtime(started)),
            method,
            Text(target),
            Text(str(status) if status is not None else "...", style=_statusStyle(status)),
            "..." if duration is None else f"{duration * 1000:.0f} ms",
        )
    if not view["recent"]:
        return Group(head, Text(""), Text("No requests yet.", style="dim"))
    return Group(head, Text(""), recent)


class ConsoleLog:
    """
    A file-like sink for log lines that prints them above the live screen.
    """

    def __init__(self, console: Console) -> None:
        self.console = console

    def write(self, text: str) -> None:
        self.console.print(Text(text.rstrip("\n")), soft_wrap=True)

    def flush(self) -> None:
        pass


class StatusScreen:
    """
    Keeps the screen up to date: on each request event and every second.
    """

    def __init__(self, agent: Any, console: Console, clock: Any, inspector: Any = None) -> None:
        self.agent = agent
        self.console = console
        self.clock = clock
        #: A callable giving the inspector's URL once it listens, or None.
        self.inspector = inspector
        self.recent: deque[Capture] = deque(maxlen=RECENT)
        self.requests = 0
        self.live = Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
        self.timer = LoopingCall(self.refresh)
        self.timer.clock = clock

    def start(self) -> None:
        self.agent.traffic.listeners.append(self._event)
        self.live.start()
        self.timer.start(1.0)

    def stop(self) -> None:
        if self._event in self.agent.traffic.listeners:
            self.agent.traffic.listeners.remove(self._event)
        if self.timer.running:
            self.timer.stop()
        self.refresh()
        self.live.stop()

    def _event(self, event: str, capture: Capture) -> None:
        if event == "start":
            self.requests += 1
            if capture not in self.recent:
                self.recent.append(capture)
        self.refresh()

    def refresh(self) -> None:
        url = self.inspector() if self.inspector is not None else None
        self.live.update(renderStatus(snapshot(self.agent, self.recent, self.requests, url)), refresh=True)
