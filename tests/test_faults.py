"""
Fault tests with real processes on loopback: the relay killed mid-transfer
and restarted, the agent killed, the link stalled by a proxy that stops
forwarding, SIGTERM drains, a pooled agent killed under load.

Each test is bounded in time; run them with C{-m faults}.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.test_contract import STOPPED_BY_SIGTERM, Proc, freePort, startRelay, twistd

pytestmark = [pytest.mark.faults, pytest.mark.contract]

MiB = 1024 * 1024


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop(signal.SIGKILL)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("TXTUNNEL_")}
    e["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    e["HOME"] = str(tmp_path / "home")
    e["PYTHONUNBUFFERED"] = "1"
    # No admin or inspector listeners: fault processes open only the ports a test gives them.
    e["TXTUNNEL_RELAY_ADMIN"] = e["TXTUNNEL_ADMIN"] = e["TXTUNNEL_INSPECT"] = ""
    return e


def receiving(out: Path, transfer: subprocess.Popen[bytes], size: int = MiB, timeout: float = 30.0) -> None:
    """
    Wait until the download into C{out} has more than C{size} bytes (the
    body is flowing end to end), while it is still running: a condition
    to kill or stop something at, not a guess of how long setup takes.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.stat().st_size > size:
            assert transfer.poll() is None, "the transfer ended before the fault could be injected"
            return
        if transfer.poll() is not None:
            raise AssertionError(f"the transfer ended early ({transfer.returncode}): {transfer.stderr.read()!r}")  # type: ignore[union-attr]
        time.sleep(0.02)
    raise AssertionError(f"no {size} bytes received within {timeout}s")


#: A drain log line with at least one stream in flight.
DRAINING = r"draining: [1-9]\d* streams in flight"


def sha256File(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """
    A directory with C{big} (100 MiB) and C{small} files of known bytes.
    """
    root = tmp_path / "www"
    root.mkdir()
    block = hashlib.sha256(b"txtunnel-faults").digest() * (MiB // 32)
    with open(root / "big", "wb") as f:
        for i in range(100):
            f.write(block[i:] + block[:i])
    (root / "small").write_bytes(b"hello from the origin\n")
    return root


@pytest.fixture
def origin(files: Path) -> Iterator[int]:
    """
    A real web server (Python's threading http.server) serving C{files}.
    """
    port = freePort()
    p = Proc([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(files)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port
    p.stop()


def agent(procs: list[Proc], env: dict[str, str], relayPort: int, *args: str) -> Proc:
    return twistd(
        procs,
        env,
        "tunnelagent",
        "--relay",
        f"ws://127.0.0.1:{relayPort}",
        "--reconnect-initial",
        "0.2",
        "--reconnect-max",
        "1",
        *args,
    )


def ready(p: Proc, after: int = 0, timeout: float = 20.0) -> str:
    """
    The address of the next C{tunnel ready} line past line C{after}.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in p.lines[after:]:
            if "tunnel ready: " in line:
                return line.split("tunnel ready: ", 1)[1].split(" -> ")[0]
        time.sleep(0.05)
    raise AssertionError(f"no tunnel ready line; output:\n{p.output}")


def fetch(url: str, relayPort: int, out: Path, *curlArgs: str, timeout: float = 60) -> subprocess.Popen[bytes]:
    host = url.split("//", 1)[1].split("/", 1)[0]
    return subprocess.Popen(
        [
            "curl",
            "-sS",
            "--max-time",
            str(timeout),
            "-o",
            str(out),
            "-H",
            f"Host: {host}",
            *curlArgs,
            f"http://127.0.0.1:{relayPort}/" + url.split("//", 1)[1].split("/", 1)[1],
        ],
        stderr=subprocess.PIPE,
    )


def get(url: str, relayPort: int, path: str = "small", timeout: float = 10) -> tuple[int, bytes]:
    host = url.split("//", 1)[1].split("/", 1)[0]
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "-i",
            "--max-time",
            str(timeout),
            "-H",
            f"Host: {host}",
            f"http://127.0.0.1:{relayPort}/{path}",
        ],
        capture_output=True,
    )
    return done.returncode, done.stdout


@pytest.mark.slow
def test_relay_killed_mid_transfer_and_restarted(
    procs: list[Proc],
    env: dict[str, str],
    origin: int,
    files: Path,
    tmp_path: Path,
) -> None:
    """
    kill -9 the relay during a 100 MiB transfer and start it again on the
    same port and state dir: the agent comes back by itself with the same
    URL and the next 100 MiB transfer is byte-exact.
    """
    state = tmp_path / "state"
    relay, port = startRelay(procs, env, state)
    a = agent(procs, env, port, "--http", str(origin))
    url = ready(a)
    out = tmp_path / "first"
    transfer = fetch(url + "big", port, out, "--limit-rate", "20M")
    receiving(out, transfer)
    relay.popen.send_signal(signal.SIGKILL)
    relay.popen.wait(5)
    transfer.wait(10)
    assert transfer.returncode != 0  # cut, and curl knows it (no silent short file)
    seen = len(a.lines)
    twistd(procs, env, "tunnelrelay", "--http", f"tcp:{port}:interface=127.0.0.1", "--state-dir", str(state))
    assert ready(a, after=seen, timeout=20) == url
    out = tmp_path / "second"
    transfer = fetch(url + "big", port, out)
    assert transfer.wait(60) == 0, transfer.stderr.read()  # type: ignore[union-attr]
    assert sha256File(out) == sha256File(files / "big")


def test_agent_killed_visitors_get_an_error_within_two_seconds(
    procs: list[Proc],
    env: dict[str, str],
    origin: int,
    tmp_path: Path,
) -> None:
    """
    kill -9 the agent: a download in flight ends with an error within 2 s,
    and a new visitor is told at once that the agent is away (503).
    """
    relay, port = startRelay(procs, env, tmp_path / "state")
    a = agent(procs, env, port, "--http", str(origin))
    url = ready(a)
    transfer = fetch(url + "big", port, tmp_path / "out", "--limit-rate", "20M")
    receiving(tmp_path / "out", transfer)
    killed = time.monotonic()
    a.popen.send_signal(signal.SIGKILL)
    transfer.wait(10)
    print(f"\nvisitor's download failed {time.monotonic() - killed:.3f}s after the agent was killed")
    assert time.monotonic() - killed < 2.0
    assert transfer.returncode != 0
    started = time.monotonic()
    code, out = get(url, port)
    assert time.monotonic() - started < 2.0
    assert out.startswith(b"HTTP/1.1 503"), out
    assert b"Retry-After: " in out


def test_agent_killed_and_restarted_keeps_its_random_name(
    procs: list[Proc],
    env: dict[str, str],
    origin: int,
    tmp_path: Path,
) -> None:
    """
    kill -9 an agent with a random name and start it again with the same
    key file: it gets the same URL back (from the reclaim file beside the
    key), not a new one, and visitors are served through it again.
    """
    relay, port = startRelay(procs, env, tmp_path / "state")
    key = str(tmp_path / "agent.key")
    a = agent(procs, env, port, "--http", str(origin), "--key-file", key)
    url = ready(a)
    code, out = get(url, port)
    assert out.startswith(b"HTTP/1.0 200"), out
    a.popen.send_signal(signal.SIGKILL)
    a.popen.wait(5)
    relay.waitFor("agent .* disconnected", timeout=10)  # the relay holds the name from here on
    code, out = get(url, port)
    assert out.startswith(b"HTTP/1.1 503"), out
    again = agent(procs, env, port, "--http", str(origin), "--key-file", key)
    assert ready(again) == url, again.output
    code, out = get(url, port)
    assert code == 0 and out.startswith(b"HTTP/1.0 200"), out
    assert out.endswith(b"hello from the origin\n")


@pytest.mark.slow
def test_frozen_agent_probes_its_link_and_keeps_it(
    procs: list[Proc],
    env: dict[str, str],
    origin: int,
    tmp_path: Path,
) -> None:
    """
    SIGSTOP the agent for 8 s (as a laptop lid closed, or a VM paused) with
    a 30 s keepalive, then SIGCONT: the agent sees the clock jump, probes
    the link at once instead of trusting it for up to 45 s, and since the
    relay answers, the link stays up (no reconnect) and serves.
    """
    relay, port = startRelay(procs, env, tmp_path / "state", "--keepalive", "30")
    a = agent(procs, env, port, "--http", str(origin), "--keepalive", "30")
    url = ready(a)
    seen = len(a.lines)
    a.popen.send_signal(signal.SIGSTOP)
    try:
        time.sleep(8)  # the fault itself: how long the process is frozen
    finally:
        a.popen.send_signal(signal.SIGCONT)
    jumped = a.waitFor(r"clock jumped [\d.]+s", timeout=10)
    print(f"\nafter an 8 s SIGSTOP the agent logged: {jumped.group(0)}")
    a.waitFor("probing the link to the relay", timeout=10)
    a.waitFor("answered the probe; it stays up", timeout=15)
    after = a.lines[seen:]
    assert not any("-> reconnecting" in line or "probe timeout" in line for line in after), "\n".join(after)
    code, out = get(url, port)
    assert code == 0 and out.startswith(b"HTTP/1.0 200"), out


#: Keepalive interval of the stalled-link test, in seconds.
KEEPALIVE = 2


class StallingProxy:
    """
    A TCP proxy between agent and relay that can be told to stop forwarding
    (both ways) while keeping both connections open: a dead network path
    that no socket error reveals.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.stalled = threading.Event()
        self.closing = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while not self.closing.is_set():
            if self.stalled.is_set():
                time.sleep(0.05)  # read nothing, send nothing, close nothing
                continue
            try:
                readable, _, _ = select.select([a, b], [], [], 0.05)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        a.close()
                        b.close()
                        return
                    peers[s].sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closing.set()
        self.listener.close()
        for s in self.sockets:
            s.close()


def test_stalled_link_is_detected_within_two_keepalives(
    procs: list[Proc],
    env: dict[str, str],
    origin: int,
    tmp_path: Path,
) -> None:
    """
    With --keepalive 2 on both sides and a proxy that silently stops
    forwarding, the agent and the relay both drop the link within twice the
    keepalive (4 s), and the agent dials again.
    """
    relay, port = startRelay(procs, env, tmp_path / "state", "--keepalive", str(KEEPALIVE))
    proxy = StallingProxy(port)
    try:
        a = agent(procs, env, proxy.port, "--http", str(origin), "--keepalive", str(KEEPALIVE))
        ready(a)
        time.sleep(KEEPALIVE * 1.2)  # pings go through
        seenAgent, seenRelay = len(a.lines), len(relay.lines)
        proxy.stalled.set()
        stalled = time.monotonic()
        agentAt = relayAt = None
        while time.monotonic() - stalled < 3 * KEEPALIVE and (agentAt is None or relayAt is None):
            if agentAt is None and any("closing it" in line for line in a.lines[seenAgent:]):
                agentAt = time.monotonic() - stalled
            if relayAt is None and any("closing it" in line for line in relay.lines[seenRelay:]):
                relayAt = time.monotonic() - stalled
            time.sleep(0.02)
        print(f"\nstalled link dropped after: agent {agentAt}s, relay {relayAt}s (keepalive {KEEPALIVE}s)")
        assert agentAt is not None and agentAt < 2 * KEEPALIVE, (agentAt, a.output)
        assert relayAt is not None and relayAt < 2 * KEEPALIVE, (relayAt, relay.output)
        a.waitFor("agent link .*-> connecting", timeout=5)
    finally:
        proxy.close()


def test_relay_sigterm_drains(
    procs: list[Proc],
    env: dict[str, str],
    origin: int,
    files: Path,
    tmp_path: Path,
) -> None:
    """
    SIGTERM on a twistd relay while a 100 MiB download is in flight: the
    download completes byte-exact, new connections are refused, then the
    relay exits cleanly.
    """
    relay, port = startRelay(procs, env, tmp_path / "state", "--drain-timeout", "30")
    a = agent(procs, env, port, "--http", str(origin))
    url = ready(a)
    out = tmp_path / "out"
    transfer = fetch(url + "big", port, out, "--limit-rate", "20M")
    receiving(out, transfer)
    relay.popen.send_signal(signal.SIGTERM)
    relay.waitFor(DRAINING, timeout=10)
    code, _ = get(url, port)
    assert code == 7  # refused: the listener is closed
    assert transfer.wait(30) == 0, transfer.stderr.read()  # type: ignore[union-attr]
    assert sha256File(out) == sha256File(files / "big")
    assert relay.popen.wait(10) in STOPPED_BY_SIGTERM


def test_agent_sigterm_drains(
    procs: list[Proc],
    env: dict[str, str],
    origin: int,
    files: Path,
    tmp_path: Path,
) -> None:
    """
    SIGTERM on a twistd agent while a 100 MiB download is in flight: new
    visitors get 404 at once (the agent said goodbye), the download
    completes byte-exact, then the agent exits.
    """
    relay, port = startRelay(procs, env, tmp_path / "state")
    a = agent(procs, env, port, "--http", str(origin), "--drain-timeout", "30")
    url = ready(a)
    out = tmp_path / "out"
    transfer = fetch(url + "big", port, out, "--limit-rate", "20M")
    receiving(out, transfer)
    a.popen.send_signal(signal.SIGTERM)
    a.waitFor(DRAINING, timeout=10)
    code, answer = get(url, port)
    assert answer.startswith(b"HTTP/1.1 404"), answer
    assert transfer.wait(30) == 0, transfer.stderr.read()  # type: ignore[union-attr]
    assert sha256File(out) == sha256File(files / "big")
    assert a.popen.wait(10) in STOPPED_BY_SIGTERM


def _origin(procs: list[Proc], directory: Path) -> int:
    port = freePort()
    procs.append(
        Proc([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(directory)])
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port
        except OSError:
            time.sleep(0.05)
    raise AssertionError("origin did not start")


def test_pooled_agent_killed_under_load(procs: list[Proc], env: dict[str, str], tmp_path: Path) -> None:
    """
    Two agents pool one name; under a steady load of requests one is
    killed (-9).  Requests in flight on it may fail, but every request
    started after the failover point (the kill + 0.5 s) is answered by the
    other, and both served before.
    """
    import http.client

    origins = []
    for name in ("A", "B"):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "who").write_text(name)
        origins.append(_origin(procs, directory))
    relay, port = startRelay(procs, env, tmp_path / "state")
    key = "pool-key-for-the-fault-test"
    members = [
        agent(
            procs,
            dict(env, XDG_STATE_HOME=str(tmp_path / f"xdg{i}")),
            port,
            "--http",
            str(o),
            "-s",
            "web",
            "--pool",
            key,
        )
        for i, o in enumerate(origins)
    ]
    for m in members:
        ready(m)
    results: list[tuple[float, str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/who", headers={"Host": f"web.localhost:{port}", "Connection": "close"})
                r = c.getresponse()
                body = r.read().decode()
                c.close()
                results.append((started, body if r.status == 200 else f"status {r.status}"))
            except (OSError, http.client.HTTPException) as e:
                results.append((started, f"error {e!r}"))

    workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for w in workers:
        w.start()

    def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)

    # Kill only once both members are serving; collect answers past the
    # failover point until there are enough to judge (or time is up).
    until(lambda: {"A", "B"} <= {body for _, body in list(results)})
    killed = time.monotonic()
    members[0].popen.send_signal(signal.SIGKILL)
    until(lambda: sum(t >= killed + 0.5 for t, _ in list(results)) >= 40 and time.monotonic() > killed + 2.0)
    stop.set()
    for w in workers:
        w.join(10)
    before = [body for t, body in results if t < killed]
    after = [body for t, body in results if t >= killed + 0.5]
    window = [body for t, body in results if killed <= t < killed + 0.5]
    print(
        f"\npool failover: {len(before)} requests before the kill {dict(Counter(before))}, "
        f"{len(window)} in the next 0.5 s {dict(Counter(window))}, {len(after)} after {dict(Counter(after))}"
    )
    assert {"A", "B"} <= set(before), Counter(before)
    assert after and set(after) == {"B"}, Counter(after)
