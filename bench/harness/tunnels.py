"""
txtunnel relays and agents as subprocesses, the way a user runs them:
``twistd -n --pidfile= tunnelrelay ...`` and ``twistd -n --pidfile= tunnelagent ...``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

from .procs import Proc, Procs, free_port

__all__ = ["Agent", "Relay", "TunnelSpec", "pythonpath", "start_agent", "start_relay", "twistd_argv"]

#: twistd with the interpreter running the harness: works in a virtualenv
#: (tox) and outside one, whether or not a ``twistd`` script is on PATH.
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

READY = re.compile(r"tunnel ready: (\S+) -> (\S+)")


def twistd_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", TWISTD, "-n", "--pidfile=", *args]


def pythonpath(src: str | None) -> dict[str, str]:
    """
    The environment for txtunnel subprocesses.  With C{src} (the
    checkout's C{src/}), it and the checkout root (for
    C{twisted/plugins/}) come first on C{PYTHONPATH}, so the working tree is
    measured even when an older txtunnel is installed.
    """
    env = dict(os.environ)
    env.pop("TXTUNNEL_CONFIG", None)
    for key in [k for k in env if k.startswith("TXTUNNEL_")]:
        env.pop(key)
    if src:
        root = os.path.dirname(os.path.abspath(src))
        parts = [os.path.abspath(src), root]
        if env.get("PYTHONPATH"):
            parts.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def which_txtunnel(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", "import txtunnel; print(txtunnel.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"txtunnel is not importable: {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


@dataclass
class Relay:
    proc: Proc
    port: int
    tcp_ports: tuple[int, int]
    domain: str = "localhost"
    #: The HTTPS (and wss:// link) port, and the development CA that signs
    #: its certificates, when the relay was started with C{https=True}.
    https_port: int | None = None
    ca: str | None = None

    def host(self, name: str) -> str:
        return f"{name}.{self.domain}:{self.port}"


@dataclass
class TunnelSpec:
    name: str
    type: str
    target: int
    remote_port: int | None = None


@dataclass
class Agent:
    proc: Proc
    ready: dict[str, str] = field(default_factory=dict)  # public address -> target


def start_relay(
    procs: Procs,
    name: str,
    tmp: str,
    env: dict[str, str],
    tcp_ports: tuple[int, int],
    timeout: float = 60,
    https: bool = False,
) -> Relay:
    """
    A relay on free loopback ports; with C{https}, also an HTTPS listener
    (its development CA in the state dir) that agents can link to over
    C{wss://}.
    """
    port = free_port()
    state = os.path.join(tmp, f"{name}-state")
    os.makedirs(state, exist_ok=True)
    extra: list[str] = []
    https_port = None
    if https:
        https_port = free_port()
        extra = ["--https", f"tcp:{https_port}:interface=127.0.0.1:backlog=4096"]
    argv = twistd_argv(
        "tunnelrelay",
        "--http",
        f"tcp:{port}:interface=127.0.0.1:backlog=4096",
        "--tcp-ports",
        f"{tcp_ports[0]}-{tcp_ports[1]}",
        "--udp-ports",
        f"{tcp_ports[0]}-{tcp_ports[1]}",
        "--state-dir",
        state,
        # Benchmarks open many tunnels and connections from one address:
        # the relay's abuse limits (docs/security.rst) would cap them.
        "--max-tunnels-per-ip",
        "0",
        "--bind-rate",
        "off",
        "--max-streams",
        "0",
        *extra,
    )
    proc = procs.start(name, argv, env=env, nofile=True)
    procs.wait_for(proc, r"relay listening on", timeout)
    ca = os.path.join(state, "tls", "dev-ca-localhost.pem") if https else None
    return Relay(proc, port, tcp_ports, https_port=https_port, ca=ca)


def agent_ini(path: str, relay: Relay, tunnels: list[TunnelSpec], wss: bool = False) -> str:
    if wss:
        lines = ["[agent]", f"relay = wss://localhost:{relay.https_port}", f"ca = {relay.ca}", ""]
    else:
        lines = ["[agent]", f"relay = ws://127.0.0.1:{relay.port}", ""]
    for t in tunnels:
        lines += [f"[tunnel:{t.name}]", f"type = {t.type}", f"target = 127.0.0.1:{t.target}"]
        if t.type == "http":
            lines.append(f"subdomain = {t.name}")
        if t.remote_port is not None:
            lines.append(f"remote-port = {t.remote_port}")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def start_agent(
    procs: Procs,
    name: str,
    tmp: str,
    env: dict[str, str],
    relay: Relay,
    tunnels: list[TunnelSpec],
    wait: bool = True,
    timeout: float = 60,
    wss: bool = False,
) -> Agent:
    ini = agent_ini(os.path.join(tmp, f"{name}.ini"), relay, tunnels, wss)
    proc = procs.start(name, twistd_argv("tunnelagent", "--config", ini), env=env, nofile=True)
    agent = Agent(proc)
    if wait:
        wait_ready(procs, agent, len(tunnels), timeout)
    return agent


def wait_ready(procs: Procs, agent: Agent, count: int, timeout: float) -> None:
    found = procs.wait_for(agent.proc, READY.pattern, timeout, count=count)
    agent.ready = {m.group(1): m.group(2) for m in found}
