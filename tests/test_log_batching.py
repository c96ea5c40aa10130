"""
Log lines and access events held for the end of the reactor's turn
(L{txtunnel.logs.TurnWriter}, L{txtunnel.access.AccessBatch}), and the
observer C{twistd -n tunnelrelay} logs through (L{txtunnel.logs.twistdLogObserver}).
"""

from __future__ import annotations

import io
import sys
from typing import Any

import pytest
from twisted.application.service import Application
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher, formatEventAsClassicLogText, formatTime
from twisted.python.failure import Failure

from txtunnel import access
from txtunnel.logs import LINE_KEY, TurnWriter, TwistdLogging, classicLogObserver, twistdLogObserver


class Reactor(Clock):
    """
    A clock that says it is running, with shutdown triggers.
    """

    running = True

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list[tuple[str, str, Any]] = []

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
        self.triggers.append((phase, event, f))

    def shutdown(self) -> None:
        for phase, event, f in self.triggers:
            if (phase, event) == ("before", "shutdown"):
                f()


def info(text: str, level: LogLevel = LogLevel.info) -> dict[str, Any]:
    return {"log_format": text, "log_level": level, "log_namespace": "t", "log_time": 1000.5}


def test_lines_wait_for_the_end_of_the_turn() -> None:
    out = io.StringIO()
    reactor = Reactor()
    writer = TurnWriter(out, lambda e: e["log_format"] + "\n", reactor)
    writer(info("one"))
    writer(info("two"))
    assert out.getvalue() == ""
    reactor.advance(0)
    assert out.getvalue() == "one\ntwo\n"
    assert not reactor.getDelayedCalls()


def test_warnings_and_errors_written_at_once_in_order() -> None:
    out = io.StringIO()
    reactor = Reactor()
    writer = TurnWriter(out, lambda e: e["log_format"] + "\n", reactor)
    writer(info("held"))
    writer(info("bad", LogLevel.error))
    assert out.getvalue() == "held\nbad\n"
    assert not reactor.getDelayedCalls()


def test_limit_and_not_running_and_shutdown() -> None:
    """
    At most L{TurnWriter.LIMIT} lines wait; with no running reactor, and
    from its shutdown on, nothing waits.
    """
    out = io.StringIO()
    reactor = Reactor()
    writer = TurnWriter(out, lambda e: e["log_format"] + "\n", reactor)
    for i in range(TurnWriter.LIMIT):
        writer(info(str(i)))
    assert out.getvalue().count("\n") == TurnWriter.LIMIT
    writer(info("last of the turn"))
    reactor.shutdown()
    assert out.getvalue().endswith("last of the turn\n")
    writer(info("while stopping"))
    assert out.getvalue().endswith("while stopping\n")
    stopped = Reactor()
    stopped.running = False
    quiet = io.StringIO()
    TurnWriter(quiet, lambda e: e["log_format"] + "\n", stopped)(info("now"))
    assert quiet.getvalue() == "now\n"


def test_broken_stream_does_not_raise() -> None:
    out = io.StringIO()
    out.close()
    writer = TurnWriter(out, lambda e: "x\n", Reactor())
    writer(info("x", LogLevel.error))  # no exception


def test_classic_lines_are_twistds() -> None:
    """
    The same text as twistd's own observer, time zone and tracebacks
    included; the time is formatted once a second.
    """
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        failure = Failure()
    events = [
        {
            "log_format": "hello {who}",
            "who": "you",
            "log_level": LogLevel.info,
            "log_namespace": "a.b",
            "log_time": 5.25,
        },
        {"log_format": "later", "log_level": LogLevel.info, "log_namespace": "a", "log_time": 5.75, "log_system": "s"},
        {
            "log_format": "boom",
            "log_level": LogLevel.error,
            "log_namespace": "a",
            "log_time": 86400.0,
            "log_failure": failure,
        },
        {"log_format": "no time", "log_level": LogLevel.info, "log_namespace": "a", "log_time": None},
        # An access event: its line is taken as it is.
        {
            "log_format": "GET /{{x}} 200",
            LINE_KEY: "GET /{x} 200",
            "log_level": LogLevel.info,
            "log_namespace": access.ACCESS_NAMESPACE,
            "log_time": 86400.5,
        },
    ]
    out = io.StringIO()
    observer = classicLogObserver(out)
    for event in events:
        observer(event)
    observer.flush()  # type: ignore[attr-defined]
    expected = "".join(formatEventAsClassicLogText(e, formatTime=lambda t: formatTime(t)) or "" for e in events)
    assert out.getvalue() == expected
    assert out.getvalue().endswith(" [txtunnel.access#info] GET /{x} 200\n")


@pytest.mark.parametrize(
    "options, ours",
    [
        ({"nodaemon": True, "logfile": None}, True),
        ({"nodaemon": True, "logfile": "-"}, True),
        ({"nodaemon": True, "logfile": "relay.log"}, False),
        ({"nodaemon": True, "logger": "txtunnel.logs.jsonLogObserver"}, False),
        ({"nodaemon": True, "syslog": True}, False),
        ({"nodaemon": False, "logfile": None}, False),
        (None, False),
    ],
)
def test_when_twistd_logs_through_txtunnel(options: Any, ours: bool) -> None:
    """
    Only standard output with no chosen logger is taken over; log files
    (rotation, SIGUSR1) and syslog stay twistd's.
    """
    assert (twistdLogObserver(options) is not None) is ours


def test_service_sets_the_applications_observer() -> None:
    from twisted.application.service import MultiService

    class Service(TwistdLogging, MultiService):
        pass

    application = Application("t")
    service = Service()
    service.logObserver = twistdLogObserver({"nodaemon": True})
    service.setServiceParent(application)
    assert application.getComponent(ILogObserver) is service.logObserver
    assert service.parent is not None
    plain = Application("u")
    Service().setServiceParent(plain)
    assert plain.getComponent(ILogObserver) is None
    assert sys.stdout is not None


def test_access_events_keep_their_time_and_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Held access events reach observers at the end of the turn, one event
    each, stamped with the time their request ended.
    """
    seen: list[dict[str, Any]] = []
    publisher = LogPublisher(seen.append)
    monkeypatch.setattr(access, "_log", Logger(namespace=access.ACCESS_NAMESPACE, observer=publisher))
    reactor = Reactor()
    batch = access.AccessBatch(reactor)
    monkeypatch.setattr(access, "batch", batch)
    times = iter([10.0, 11.0])
    monkeypatch.setattr(access.time, "time", lambda: next(times))
    exchange = access.Exchange("web", "10.0.0.1", b"GET", b"/a?token=x", b"web.example", 9.0)
    access.logAccess(exchange, 200, 9.5)
    access.logConnection("5000", "10.0.0.2", "tcp", 1, 2, 0.5)
    assert seen == []
    reactor.advance(0)
    assert [(e["log_time"], e.get("path", e.get("protocol"))) for e in seen] == [(10.0, "/a"), (11.0, "tcp")]
    assert all(e["log_level"] is LogLevel.info and e["log_namespace"] == access.ACCESS_NAMESPACE for e in seen)
    assert seen[0]["log_format"].startswith("10.0.0.1 GET web.example/a 200")
    reactor.shutdown()
    monkeypatch.setattr(access.time, "time", lambda: 12.0)
    access.logConnection("5000", "10.0.0.3", "tcp", 1, 2, 0.5)
    assert seen[-1]["client_ip"] == "10.0.0.3"  # shutting down: at once
