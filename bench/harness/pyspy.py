"""
Where the relay and the agent spend their time: py-spy samples both while
wrk loads the HTTP tunnel, and the hottest functions are listed by own time
(the frame on top of the stack) and by inclusive time (anywhere on it;
txtunnel's and autobahn's frames only).  py-spy samples only threads that are
running, so time blocked in epoll_wait shows as fewer samples, not as a frame;
what remains under ``doPoll`` is the epoll call's own CPU cost.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
from typing import Any

__all__ = ["find_pyspy", "record", "summarize"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def find_pyspy() -> str | None:
    return shutil.which("py-spy")


def record(pyspy: str, pid: int, seconds: float, out: str) -> subprocess.Popen[bytes]:
    """
    Start sampling C{pid} for C{seconds} into C{out} (collapsed stacks).
    """
    return subprocess.Popen(
        [
            pyspy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            out,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "/src/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


#: Frames whose own time is a system call, named for what they wait on.
_SYSCALLS = {
    "untilConcludes (twisted/python/util.py)": "socket send: untilConcludes (twisted/python/util.py)",
    "EPollReactor.doPoll (twisted/internet/epollreactor.py)": "epoll_wait: EPollReactor.doPoll (twisted/internet/epollreactor.py)",
}

#: Inclusive time is listed for the code under study only: the reactor's
#: own frames enclose everything and say nothing.
_OURS = ("txtunnel/", "autobahn/", "httptools", "h11/")


def summarize(path: str, top: int = 15) -> dict[str, Any]:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [_short(x) for x in stack.split(";") if x.strip()]
            frames = [x for x in frames if not x.startswith("process ") and not x.startswith("thread ")]
            if not frames:
                continue
            total += n
            own[_SYSCALLS.get(frames[-1], frames[-1])] += n
            for name in set(frames):
                if any(marker in name for marker in _OURS):
                    inclusive[name] += n
    return {
        "samples": total,
        "own": [(name, round(100 * n / total, 1)) for name, n in own.most_common(top)] if total else [],
        "inclusive": [(name, round(100 * n / total, 1)) for name, n in inclusive.most_common(top)] if total else [],
    }
