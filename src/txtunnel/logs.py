# -*- test-case-name: tests.test_access_log -*-
"""
Log output: short text lines for people, or one JSON object per line for
log pipelines (C{--log-format json}).

Both read the same C{twisted.logger} events; the JSON form keeps every
structured field of the event (C{tunnel}, C{client_ip}, C{status}, ...)
next to C{time}, C{level}, C{namespace} and the formatted C{message}.

For C{twistd}, which sets up logging itself, the same formats are log
observer factories: C{twistd --logger txtunnel.logs.jsonLogObserver -n
tunnelrelay}.  Without C{--logger}, C{--logfile} or C{--syslog}, C{twistd
-n tunnelrelay} and C{twistd -n tunnelagent} log to standard output in
twistd's own format, through L{classicLogObserver} (L{twistdLogObserver}).

Every observer here writes through L{TurnWriter}: the lines of one reactor
turn go out in one write at its end, as a busy tunnel logs a line per
request.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogBeginner,
    timeFormatRFC3339,
)
from zope.interface import implementer

__all__ = [
    "FORMATS",
    "LINE_KEY",
    "EndOfTurn",
    "TurnWriter",
    "TwistdLogging",
    "classicLogObserver",
    "eventAsJSON",
    "eventAsText",
    "jsonLogObserver",
    "observer",
    "startLogging",
    "textLogObserver",
    "twistdLogObserver",
]

FORMATS = ("text", "json")


#: An event's message already formatted, set by its emitter (the access
#: log, L{txtunnel.access}): the observers here use it as it is.
LINE_KEY = "log_txtunnel_line"


def _message(event: dict[str, Any]) -> str:
    line = event.get(LINE_KEY)
    return line if isinstance(line, str) else formatEvent(event)


def eventAsText(event: dict[str, Any]) -> str | None:
    """
    C{HH:MM:SS [warning: |error: ]message}, and a traceback if there is one.
    """
    text = _message(event)
    if "log_failure" in event:
        text += "\n" + event["log_failure"].getTraceback()
    level = event.get("log_level")
    prefix = ""
    if level in (LogLevel.warn,):
        prefix = "warning: "
    elif level in (LogLevel.error, LogLevel.critical):
        prefix = "error: "
    stamp = _clock(event.get("log_time"))
    return f"{stamp} {prefix}{text}\n"


class _SecondCache:
    """
    A time format that only changes once a second, computed once a second:
    C{formatTime} and C{strftime} (time zone included) cost more than the
    rest of a log line.
    """

    def __init__(self, format: Callable[[float], str], unknown: str | None = None) -> None:
        self._format = format
        self._unknown = unknown
        self._second: int | None = None
        self._text = ""

    def __call__(self, when: float | None) -> str:
        if when is None:
            if self._unknown is not None:
                return self._unknown
            when = time.time()
        second = int(when)
        if second != self._second:
            self._text = self._format(second)
            self._second = second
        return self._text


_clock = _SecondCache(lambda t: time.strftime("%H:%M:%S", time.localtime(t)))


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def eventAsJSON(event: dict[str, Any]) -> str | None:
    """
    One JSON object and a newline: C{time} (ISO 8601, UTC), C{level},
    C{namespace}, C{message}, then the event's own fields.
    """
    stamp = datetime.datetime.fromtimestamp(event.get("log_time", time.time()), datetime.timezone.utc)
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
        "namespace": event.get("log_namespace", "?"),
        "message": _message(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in ("format", "message", "isError", "system", "time"):
            continue
        record[key] = _plain(value)
    if "log_failure" in event:
        record["traceback"] = event["log_failure"].getTraceback()
    return json.dumps(record, sort_keys=False) + "\n"


class EndOfTurn:
    """
    Items held until the end of the reactor's turn (a C{callLater(0)}),
    then released together -- at most L{LIMIT} of them wait, and nothing
    waits while the reactor is not running or once its shutdown began.
    Subclasses say what releasing is (L{release}).
    """

    #: Items held at most before they are released.
    LIMIT = 256

    def __init__(self, reactor: Any = None) -> None:
        self._reactor = reactor
        self._held: list[Any] = []
        self._call: Any = None
        self._hooked = False
        self._closing = False

    def hold(self, item: Any, now: bool = False) -> None:
        """
        Hold C{item} for the end of the turn, or release everything held
        with it at once when C{now}.
        """
        self._held.append(item)
        if now or self._closing or len(self._held) >= self.LIMIT:
            self.flush()
            return
        if self._call is None:
            reactor = self._reactor
            if reactor is None:
                from twisted.internet import reactor  # type: ignore[no-redef]
            if not getattr(reactor, "running", False):
                self.flush()  # nothing would run a delayed call: no holding
                return
            if not self._hooked:
                self._hooked = True
                reactor.addSystemEventTrigger("before", "shutdown", self._close)
            self._call = reactor.callLater(0, self.flush)

    def _close(self) -> None:
        # From the reactor's shutdown on (a relay draining), nothing waits.
        self._closing = True
        self.flush()

    def flush(self) -> None:
        """
        Release what is held now, oldest first.
        """
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        held, self._held = self._held, []
        if held:
            self.release(held)

    def release(self, items: list[Any]) -> None:
        raise NotImplementedError


@implementer(ILogObserver)
class TurnWriter(EndOfTurn):
    """
    Write formatted events to a file, the lines of one reactor turn in one
    write at the end of the turn (L{EndOfTurn}).

    Twisted's C{FileLogObserver} writes and flushes each event: a system
    call per line, and through an HTTP tunnel a line per request on each
    side.  A warning or an error is written at once (with the lines held
    before it), so nothing that explains a crash waits.
    """

    def __init__(self, out: TextIO, format: Callable[[dict[str, Any]], str | None], reactor: Any = None) -> None:
        super().__init__(reactor)
        self._out = out
        self._formatEvent = format

    def __call__(self, event: dict[str, Any]) -> None:
        text = self._formatEvent(event)
        if text:
            self.hold(text, now=event.get("log_level") in _AT_ONCE)

    def release(self, items: list[Any]) -> None:
        try:
            self._out.write("".join(items))
            self._out.flush()
        except (OSError, ValueError):
            pass  # a closed or broken log stream must not stop the service


_AT_ONCE = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})


def observer(out: TextIO, format: str = "text", level: LogLevel = LogLevel.info, reactor: Any = None) -> ILogObserver:
    """
    An observer writing events of C{level} and above to C{out} in C{format}
    (through L{TurnWriter}, on C{reactor}: the global one by default).
    """
    if format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {format!r}")
    formatter = eventAsJSON if format == "json" else eventAsText
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    return FilteringLogObserver(TurnWriter(out, formatter, reactor), [predicate])


def classicLogObserver(out: TextIO, timeFormat: str | None = timeFormatRFC3339) -> ILogObserver:
    """
    twistd's own log lines (C{twisted.logger.textFileLogObserver}: time,
    C{[system]}, message), written through L{TurnWriter} with the time
    formatted once a second.
    """
    stamp = _SecondCache(lambda t: formatTime(t, timeFormat), unknown="-")

    def format(event: dict[str, Any]) -> str | None:
        line = event.get(LINE_KEY)
        if isinstance(line, str) and line and "log_failure" not in event and "log_system" not in event:
            # An access line: what formatEventAsClassicLogText would write, for less.
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
            return f"{stamp(event.get('log_time'))} [{system}] {line.replace(chr(10), chr(10) + chr(9))}\n"
        return formatEventAsClassicLogText(event, formatTime=stamp)

    return TurnWriter(out, format)


def twistdLogObserver(twistdOptions: Any) -> ILogObserver | None:
    """
    The log observer for C{twistd -n tunnelrelay} or C{tunnelagent} given
    twistd's own options (the parent of the plugin's), or C{None} to leave
    logging to twistd: L{classicLogObserver} on standard output when twistd
    would write its lines there (C{-n} with no C{--logfile}, or
    C{--logfile -}) and no C{--logger} or C{--syslog} was given.  Log files
    (rotation, C{SIGUSR1}) and syslog stay twistd's.
    """
    if twistdOptions is None or not hasattr(twistdOptions, "get"):
        return None
    if twistdOptions.get("logger") or twistdOptions.get("syslog") or not twistdOptions.get("nodaemon"):
        return None
    if twistdOptions.get("logfile") not in (None, "", "-"):
        return None
    return classicLogObserver(sys.stdout)


def startLogging(out: TextIO, level: LogLevel, format: str = "text") -> None:
    globalLogBeginner.beginLoggingTo([observer(out, format, level)], redirectStandardIO=False)


def jsonLogObserver() -> ILogObserver:
    """
    For C{twistd --logger}: JSON lines on standard output.
    """
    return observer(sys.stdout, "json")


def textLogObserver() -> ILogObserver:
    """
    For C{twistd --logger}: txtunnel's short text lines on standard output.
    """
    return observer(sys.stdout, "text")


class TwistdLogging:
    """
    For the service a twistd plugin makes: when it joins twistd's
    application, its L{logObserver}, if any, becomes the application's
    C{ILogObserver} component, which twistd logs to in place of its default
    one (as it does for a C{.tac} file that sets it).
    """

    #: From L{twistdLogObserver}, set by the plugin's C{makeService}.
    logObserver: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> Any:
        from twisted.python.components import Componentized

        observer = self.logObserver
        if observer is not None and isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, observer)
        return super().setServiceParent(parent)  # type: ignore[misc]
