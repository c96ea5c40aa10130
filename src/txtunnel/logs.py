# -*- test-case-name: tests.test_access_log -*-
"""
Log output: short text lines for people, or one JSON object per line for
log pipelines (C{--log-format json}).

Both read the same C{twisted.logger} events; the JSON form keeps every
structured field of the event (C{tunnel}, C{client_ip}, C{status}, ...)
next to C{time}, C{level}, C{namespace} and the formatted C{message}.

For C{twistd}, which sets up logging itself, the same formats are log
observer factories: C{twistd --logger txtunnel.logs.jsonLogObserver -n
tunnelrelay}.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from typing import Any, TextIO

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)

__all__ = [
    "FORMATS",
    "eventAsJSON",
    "eventAsText",
    "jsonLogObserver",
    "observer",
    "startLogging",
    "textLogObserver",
]

FORMATS = ("text", "json")


def eventAsText(event: dict[str, Any]) -> str | None:
    """
    C{HH:MM:SS [warning: |error: ]message}, and a traceback if there is one.
    """
    text = formatEvent(event)
    if "log_failure" in event:
        text += "\n" + event["log_failure"].getTraceback()
    level = event.get("log_level")
    prefix = ""
    if level in (LogLevel.warn,):
        prefix = "warning: "
    elif level in (LogLevel.error, LogLevel.critical):
        prefix = "error: "
    stamp = time.strftime("%H:%M:%S", time.localtime(event.get("log_time", time.time())))
    return f"{stamp} {prefix}{text}\n"


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
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in ("format", "message", "isError", "system", "time"):
            continue
        record[key] = _plain(value)
    if "log_failure" in event:
        record["traceback"] = event["log_failure"].getTraceback()
    return json.dumps(record, sort_keys=False) + "\n"


def observer(out: TextIO, format: str = "text", level: LogLevel = LogLevel.info) -> ILogObserver:
    """
    An observer writing events of C{level} and above to C{out} in C{format}.
    """
    if format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {format!r}")
    formatter = eventAsJSON if format == "json" else eventAsText
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    return FilteringLogObserver(FileLogObserver(out, formatter), [predicate])


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
