"""
The command-line contract, exercised as a user would: C{twistd} and
C{txtunnel} as subprocesses, curl as the visitor, and the built wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.contract

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

#: twistd shuts down cleanly on SIGTERM, then exits by re-raising the signal.
STOPPED_BY_SIGTERM = (0, -signal.SIGTERM)


def tool(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else (shutil.which(name) or name)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """
    A subprocess whose combined output is collected by a thread, so a test
    can wait for a line without blocking on a full pipe.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def waitFor(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = regex.search(line)
                if match:
                    return match
            if self.popen.poll() is not None:
                time.sleep(0.2)
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} from {self.args[:3]}; output:\n{self.output}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._thread.join(5)
        return self.popen.returncode


def twistd(procs: list[Proc], env: dict[str, str], *args: str) -> Proc:
    """
    Start C{twistd -n ARGS} in the foreground and keep it for cleanup.
    """
    p = Proc([tool("twistd"), "-n", "--pidfile=", *args], env)
    procs.append(p)
    return p


def startRelay(procs: list[Proc], env: dict[str, str], stateDir: Path, *args: str) -> tuple[Proc, int]:
    """
    A twistd relay on a free loopback port, ready for agents.
    """
    port = freePort()
    relay = twistd(
        procs, env, "tunnelrelay", "--http", f"tcp:{port}:interface=127.0.0.1", "--state-dir", str(stateDir), *args
    )
    relay.waitFor(f"relay listening on 127.0.0.1:{port}")
    return relay, port


def startAgent(procs: list[Proc], env: dict[str, str], port: int, *args: str) -> Proc:
    """
    A twistd agent linked to the relay on C{port}.
    """
    return twistd(procs, env, "tunnelagent", "--relay", f"ws://127.0.0.1:{port}", *args)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("TXTUNNEL_")}
    e["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    e["HOME"] = str(tmp_path / "home")
    e["PYTHONUNBUFFERED"] = "1"
    # No admin or inspector listeners on their fixed default ports.
    e["TXTUNNEL_RELAY_ADMIN"] = e["TXTUNNEL_ADMIN"] = e["TXTUNNEL_INSPECT"] = ""
    return e


@pytest.fixture
def webRoot(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> int:
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("hello through twistd\n")
    port = freePort()
    p = Proc([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)], env)
    procs.append(p)
    p.waitFor("Serving HTTP")
    return port


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True, timeout=30)


def test_twistd_relay_and_agent(tmp_path: Path, procs: list[Proc], env: dict[str, str], webRoot: int) -> None:
    """
    twistd tunnelrelay and twistd tunnelagent, run as a user runs them,
    serve a page at NAME.localhost and a TCP tunnel, and stop on SIGTERM.
    """
    low = freePort()
    relay, port = startRelay(procs, env, tmp_path / "state", "--tcp-ports", f"{low}-{low + 30}")
    assert "no --token given" in relay.output
    agent = startAgent(procs, env, port, "--http", str(webRoot), "--subdomain", "demo")
    agent.waitFor(re.escape(f"tunnel ready: http://demo.localhost:{port}/ -> 127.0.0.1:{webRoot}"))
    result = curl("-H", f"Host: demo.localhost:{port}", f"http://127.0.0.1:{port}/")
    assert result.stdout == b"hello through twistd\n", result.stderr
    result = curl("--resolve", f"demo.localhost:{port}:127.0.0.1", f"http://demo.localhost:{port}/index.html")
    assert result.stdout == b"hello through twistd\n", result.stderr
    result = curl("-i", "-H", f"Host: missing.localhost:{port}", f"http://127.0.0.1:{port}/")
    assert result.stdout.startswith(b"HTTP/1.1 404") and b"no tunnel named 'missing'" in result.stdout
    # Access lines in twistd's own format (txtunnel.logs.twistdLogObserver), one per request.
    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[txtunnel\.access#info\] 127\.0\.0\.1 GET "
    relay.waitFor(stamp + rf"demo\.localhost:{port}/index\.html 200 .*\[demo\]$")
    agent.waitFor(stamp + r"/index\.html 200 .*\[demo\]$")
    relay.waitFor(stamp + rf"missing\.localhost:{port}/ 404 ")
    assert len(re.findall(stamp, relay.output, re.M)) == 3

    tcpAgent = startAgent(procs, env, port, "--tcp", str(webRoot))
    match = tcpAgent.waitFor(r"tunnel ready: tcp://127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:" + str(webRoot))
    result = curl(f"http://127.0.0.1:{match.group(1)}/index.html")
    assert result.stdout == b"hello through twistd\n", result.stderr

    for p in (agent, tcpAgent, relay):
        assert p.stop() in STOPPED_BY_SIGTERM
        assert "Server Shut Down." in p.output
    assert "Traceback" not in relay.output + agent.output + tcpAgent.output


def test_twistd_relay_defaults(procs: list[Proc], env: dict[str, str]) -> None:
    """
    With no options twistd tunnelrelay is a development relay on 127.0.0.1
    port 8080 or, if that is taken, the next free port, said in the log.
    """
    relay = twistd(procs, env, "tunnelrelay")
    match = relay.waitFor(r"relay listening on 127\.0\.0\.1:(\d+) for localhost")
    port = int(match.group(1))
    assert 8080 <= port < 8100
    if port != 8080:
        assert "default port 8080 was taken" in relay.output
    assert "TCP ports 20000-20099 and UDP ports 20000-20099 on 127.0.0.1" in relay.output
    assert "no --token given" in relay.output
    result = curl("-i", f"http://127.0.0.1:{port}/")
    assert result.stdout.startswith(b"HTTP/1.1 404")
    assert relay.stop() in STOPPED_BY_SIGTERM


def test_txtunnel_cli(tmp_path: Path, procs: list[Proc], env: dict[str, str], webRoot: int) -> None:
    """
    txtunnel http runs an agent in the foreground; Ctrl-C (SIGINT) stops it
    cleanly; usage errors exit 2 naming the problem; a refused token exits 1.
    """
    port = freePort()
    relay = Proc(
        [
            tool("txtunnel"),
            "relay",
            "--http",
            f"tcp:{port}:interface=127.0.0.1",
            "--state-dir",
            str(tmp_path / "s"),
            "--token",
            "right-token",
        ],
        env,
    )
    procs.append(relay)
    relay.waitFor("relay listening on")
    agent = Proc(
        [tool("txtunnel"), "http", str(webRoot), "--relay", f"ws://127.0.0.1:{port}", "-s", "cli", "-t", "right-token"],
        env,
    )
    procs.append(agent)
    agent.waitFor(re.escape(f"tunnel ready: http://cli.localhost:{port}/ -> 127.0.0.1:{webRoot}"))
    assert curl("-H", f"Host: cli.localhost:{port}", f"http://127.0.0.1:{port}/").stdout == b"hello through twistd\n"
    assert agent.stop(signal.SIGINT) == 0

    bad = subprocess.run([tool("txtunnel"), "http"], capture_output=True, env=env, timeout=30)
    assert bad.returncode == 2
    assert b"txtunnel: Wrong number of arguments" in bad.stderr
    bad = subprocess.run(
        [tool("txtunnel"), "tcp", "22", "--remote-port", "x"], capture_output=True, env=env, timeout=30
    )
    assert bad.returncode == 2
    assert b"--remote-port: 'x' is not a port number" in bad.stderr

    refused = subprocess.run(
        [tool("txtunnel"), "http", str(webRoot), "--relay", f"ws://127.0.0.1:{port}", "-t", "wrong-token"],
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert refused.returncode == 1
    assert b"invalid or missing token" in refused.stderr
    assert relay.stop(signal.SIGINT) == 0


def test_txtunnel_demo(procs: list[Proc], env: dict[str, str]) -> None:
    """
    txtunnel demo brings up a relay, a page and an agent, and prints a URL
    that works.
    """
    demo = Proc([tool("txtunnel"), "demo"], env)
    procs.append(demo)
    match = demo.waitFor(r"try it: curl (http://demo\.localhost:(\d+)/)")
    url, port = match.group(1), match.group(2)
    result = curl("--resolve", f"demo.localhost:{port}:127.0.0.1", url)
    assert result.stdout.startswith(b"Hello from behind txtunnel!"), result.stderr
    assert demo.stop(signal.SIGINT) == 0


@pytest.mark.slow
def test_wheel_and_fresh_venv(tmp_path: Path) -> None:
    """
    The wheel ships the twistd plugins in twisted/plugins without an
    __init__.py or a dropin.cache; after a plain pip install into a new
    virtualenv, twistd --help lists tunnelrelay and tunnelagent and the
    txtunnel script runs.
    """
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = dist.glob("txtunnel-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "twisted/plugins/txtunnel_relay.py",
        "twisted/plugins/txtunnel_agent.py",
        "twisted/plugins/txtunnel_forwarders.py",
    } <= names
    assert "twisted/plugins/__init__.py" not in names
    assert not any(n.endswith("dropin.cache") for n in names)
    assert "txtunnel/py.typed" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], capture_output=True, timeout=600
    )
    assert pip.returncode == 0, pip.stderr.decode()
    helpText = subprocess.run([str(venv / "bin" / "twistd"), "--help"], capture_output=True, timeout=60).stdout
    assert b"tunnelrelay" in helpText and b"tunnelagent" in helpText
    relayHelp = subprocess.run([str(venv / "bin" / "twistd"), "tunnelrelay", "--help"], capture_output=True, timeout=60)
    assert b"--tcp-ports" in relayHelp.stdout
    version = subprocess.run([str(venv / "bin" / "txtunnel"), "--version"], capture_output=True, timeout=60)
    assert version.stdout.startswith(b"txtunnel ")
    # A second run uses the cache Twisted wrote on the first, and still lists them.
    again = subprocess.run([str(venv / "bin" / "twistd"), "--help"], capture_output=True, timeout=60).stdout
    assert b"tunnelrelay" in again


def peakRSS(pid: int) -> int:
    """
    The peak resident set size of a process, in bytes (VmHWM).
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_one_gib_up_and_down_with_bounded_memory(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> None:
    """
    A 1 GiB download and a 1 GiB chunked upload pass through an HTTP tunnel
    byte-exact, and neither the relay's nor the agent's peak RSS grows with
    the body: nothing buffers a whole body.
    """
    origin = Proc([sys.executable, str(ROOT / "tests" / "servers" / "bulk.py"), "0"], env)
    procs.append(origin)
    originPort = int(origin.waitFor(r"listening (\d+)").group(1))
    relay, port = startRelay(procs, env, tmp_path / "s")
    agent = startAgent(procs, env, port, "--http", str(originPort), "-s", "bulk")
    agent.waitFor("tunnel ready")
    gib = 1 << 30
    host = ["-H", f"Host: bulk.localhost:{port}"]

    start = time.monotonic()
    down = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "300",
            *host,
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{speed_download}",
            f"http://127.0.0.1:{port}/big?n={gib}",
        ],
        capture_output=True,
        timeout=320,
    )
    downTime = time.monotonic() - start
    size, _ = down.stdout.split()
    assert int(size) == gib, down.stderr

    start = time.monotonic()
    feeder = subprocess.Popen(["head", "-c", str(gib), "/dev/zero"], stdout=subprocess.PIPE)
    up = subprocess.run(
        ["curl", "-sS", "--max-time", "300", *host, "-T", "-", f"http://127.0.0.1:{port}/sink"],
        stdin=feeder.stdout,
        capture_output=True,
        timeout=320,
    )
    feeder.wait(10)
    upTime = time.monotonic() - start
    import hashlib

    zeros = hashlib.sha256()
    block = bytes(1 << 20)
    for _ in range(1024):
        zeros.update(block)
    assert up.stdout.decode().split() == [str(gib), zeros.hexdigest()], up.stderr

    relayPeak, agentPeak = peakRSS(relay.popen.pid), peakRSS(agent.popen.pid)
    print(
        f"\n1 GiB down {downTime:.1f}s ({gib / downTime / 1e6:.0f} MB/s), up {upTime:.1f}s ({gib / upTime / 1e6:.0f} MB/s); "
        f"peak RSS relay {relayPeak / 2**20:.0f} MiB, agent {agentPeak / 2**20:.0f} MiB"
    )
    assert relayPeak < 150 * 2**20
    assert agentPeak < 150 * 2**20


def test_twistd_udp_tunnel(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> None:
    """
    A UDP tunnel through twistd relay and agent processes echoes datagrams
    of 1 and 65,507 bytes, boundaries kept.
    """
    echo = Proc(
        [
            sys.executable,
            "-c",
            "import socket,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('127.0.0.1',0))\n"
            "print('listening',s.getsockname()[1],flush=True)\n"
            "while True:\n d,a=s.recvfrom(65535); s.sendto(d,a)\n",
        ],
        env,
    )
    procs.append(echo)
    echoPort = int(echo.waitFor(r"listening (\d+)").group(1))
    low = freePort()
    relay, port = startRelay(procs, env, tmp_path / "s", "--udp-ports", f"{low}-{low + 20}")
    agent = startAgent(procs, env, port, "--udp", str(echoPort))
    public = int(agent.waitFor(r"tunnel ready: udp://127\.0\.0\.1:(\d+) -> 127\.0\.0\.1:" + str(echoPort)).group(1))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        for size in (1, 1400, 65507):
            payload = bytes([size % 251]) * size
            s.sendto(payload, ("127.0.0.1", public))
            data, _ = s.recvfrom(70000)
            assert data == payload
    for p in (agent, relay):
        assert p.stop() in STOPPED_BY_SIGTERM
    assert "Traceback" not in relay.output + agent.output


def test_twistdExitsNonZeroWhenItGivesUp(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> None:
    """
    Under twistd, a relay that cannot listen on the address it was told and
    an agent whose token is refused stop with exit status 1, not 0, so a
    supervisor (systemd, Docker) sees the failure.
    """
    relay, port = startRelay(procs, env, tmp_path / "s", "--token", "right-token")
    taken = twistd(
        procs, env, "tunnelrelay", "--http", f"tcp:{port}:interface=127.0.0.1", "--state-dir", str(tmp_path / "t")
    )
    assert taken.popen.wait(30) == 1
    assert "relay failed to start" in taken.output
    agent = startAgent(procs, env, port, "--token", "wrong-token", "--http", "8000")
    assert agent.popen.wait(30) == 1
    assert "invalid or missing token" in agent.output
    assert relay.stop() in STOPPED_BY_SIGTERM
