"""
Subprocesses of a benchmark run: started with their output in a log file,
each in its own session (so a Ctrl-C in the terminal reaches only the
harness, which then stops them in order), and all stopped by PID at the end,
whatever happens.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Proc", "Procs", "RSSSampler", "free_port", "free_range", "raise_nofile", "wait_port"]


def raise_nofile() -> int:
    """
    Raise this process's open-file limit to its hard limit; return it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            return soft
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


_taken: set[int] = set()


def _bindable(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port() -> int:
    """
    A free TCP port on 127.0.0.1 below the kernel's ephemeral range (so no
    outgoing connection takes it before our server binds it), never 8080,
    and never one handed out before in this run.
    """
    for _ in range(2000):
        port = random.randint(10000, 32000)
        if port == 8080 or port in _taken:
            continue
        if _bindable(port):
            _taken.add(port)
            return port
    raise RuntimeError("no free TCP port found on 127.0.0.1")


def free_range(count: int) -> tuple[int, int]:
    """
    C{count} consecutive free ports on 127.0.0.1 (first, last).
    """
    for _ in range(200):
        first = random.randint(10000, 32000 - count)
        ports = range(first, first + count)
        if 8080 in ports or _taken.intersection(ports):
            continue
        if all(_bindable(p) for p in ports):
            _taken.update(ports)
            return first, first + count - 1
    raise RuntimeError(f"no {count} consecutive free TCP ports found on 127.0.0.1")


def wait_port(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    """
    Wait until something accepts connections on C{host:port}.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: str
    argv: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 16384))
                data = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(data.splitlines()[-lines:])


class Procs:
    """
    Every process the harness started, to be stopped by PID.
    """

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.procs: list[Proc] = []
        self._lock = threading.Lock()
        atexit.register(self.stop_all)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        nofile: bool = False,
    ) -> Proc:
        log = os.path.join(self.logdir, f"{name}.log")
        preexec: Callable[[], object] | None = raise_nofile if nofile else None
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=preexec,
            )
        proc = Proc(name, popen, log, list(argv))
        with self._lock:
            self.procs.append(proc)
        return proc

    def wait_for(self, proc: Proc, pattern: str, timeout: float, count: int = 1) -> list[re.Match[str]]:
        """
        Wait until C{pattern} has matched C{count} times in C{proc}'s log.

        @raise RuntimeError: on timeout or if the process exits first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = list(regex.finditer(proc.text()))
            if len(found) >= count:
                return found
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}) before {pattern!r}:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name}: no {pattern!r} x{count} within {timeout:.0f}s:\n{proc.tail()}")
            time.sleep(0.1)

    def stop(self, proc: Proc, timeout: float = 5.0) -> None:
        """
        SIGTERM the process group we created for C{proc} (its leader's PID),
        then SIGKILL it if it lingers.
        """
        if proc.popen.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                except PermissionError:
                    proc.popen.send_signal(sig)
                try:
                    proc.popen.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # The leader is gone; anything left in its group (children) goes too.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        with self._lock:
            if proc in self.procs:
                self.procs.remove(proc)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(reversed(self.procs))
        for proc in procs:
            try:
                self.stop(proc, timeout=3.0)
            except Exception:  # cleanup must go on
                pass


def rss_kb(pid: int, key: str = "VmRSS") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class RSSSampler:
    """
    Sample VmRSS of named PIDs every C{interval} seconds in a thread, and
    answer the peak of each over any time window.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.pids: dict[str, int] = {}
        self.samples: list[tuple[float, str, int]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self.pids[name] = pid

    def unwatch(self, name: str) -> None:
        with self._lock:
            self.pids.pop(name, None)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                pids = dict(self.pids)
            for name, pid in pids.items():
                kb = rss_kb(pid)
                if kb is not None:
                    with self._lock:
                        self.samples.append((now, name, kb))
            self._stop.wait(self.interval)

    def peak_mb(self, name: str, start: float = 0.0, end: float = float("inf")) -> float | None:
        with self._lock:
            values = [kb for t, n, kb in self.samples if n == name and start <= t <= end]
        return round(max(values) / 1024, 1) if values else None

    def now_mb(self, name: str) -> float | None:
        pid = self.pids.get(name)
        kb = rss_kb(pid) if pid else None
        return round(kb / 1024, 1) if kb is not None else None
