"""
The ``ssh -R`` reference: a private sshd on loopback with throwaway keys,
and ssh clients that forward remote ports to the origin.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import time

from .procs import Proc, Procs, free_port, wait_port

__all__ = ["SSHD", "start_sshd", "start_ssh_forward"]

SSHD_CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_ed25519
PidFile none
AuthorizedKeysFile {dir}/authorized_keys
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
AllowTcpForwarding yes
GatewayPorts no
PermitTTY yes
X11Forwarding no
PrintMotd no
UseDNS no
Compression no
MaxStartups 100
MaxSessions 100
LogLevel INFO
"""


class SSHD:
    def __init__(self, proc: Proc, port: int, dir: str, user: str, ssh: str) -> None:
        self.proc = proc
        self.port = port
        self.dir = dir
        self.user = user
        self.ssh = ssh


def _keygen(keygen: str, path: str) -> None:
    subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "txtunnel-bench", "-f", path],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
    )


def start_sshd(procs: Procs, tmp: str, sshd: str, ssh: str, keygen: str) -> SSHD:
    """
    sshd -D -e -f CONFIG on a free loopback port, as the current user, with
    a host key and an authorized user key made for this run only.
    """
    d = os.path.join(tmp, "ssh")
    os.makedirs(d, mode=0o700, exist_ok=True)
    _keygen(keygen, os.path.join(d, "host_ed25519"))
    _keygen(keygen, os.path.join(d, "id_ed25519"))
    with open(os.path.join(d, "id_ed25519.pub")) as f, open(os.path.join(d, "authorized_keys"), "w") as out:
        out.write(f.read())
    os.chmod(os.path.join(d, "authorized_keys"), 0o600)
    if os.geteuid() == 0:
        # sshd's privilege separation wants this directory to exist.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    port = free_port()
    user = getpass.getuser()
    conf = os.path.join(d, "sshd_config")
    with open(conf, "w") as f:
        f.write(SSHD_CONFIG.format(port=port, dir=d, user=user))
    # sshd refuses to re-exec itself unless started by absolute path.
    proc = procs.start("sshd", [os.path.abspath(sshd), "-D", "-e", "-f", conf])
    procs.wait_for(proc, r"Server listening on 127\.0\.0\.1 port", 15)
    return SSHD(proc, port, d, user, ssh)


def start_ssh_forward(
    procs: Procs,
    sshd: SSHD,
    name: str,
    forwards: dict[int, int],
    nodelay: bool = False,
    probe: list[int] | None = None,
    timeout: float = 20,
) -> Proc:
    """
    An ssh client that makes sshd listen on each remote port and carries
    its connections back to the local target port (C{forwards}: remote ->
    target).

    Plain: ``ssh -N -T`` (no session at all), as people run ``ssh -R``.
    C{nodelay}: ``ssh -tt ... sleep``: a session with a pty, which OpenSSH
    treats as interactive; then both ends set TCP_NODELAY on the ssh
    connection (and IPQoS lowdelay).  ``-N -tt`` would not do it: with no
    session there is no pty, and the connection stays in bulk mode.
    """
    argv = [
        sshd.ssh,
        "-F",
        "/dev/null",
        "-i",
        os.path.join(sshd.dir, "id_ed25519"),
        "-p",
        str(sshd.port),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "Compression=no",
    ]
    for remote, target in forwards.items():
        argv += ["-R", f"127.0.0.1:{remote}:127.0.0.1:{target}"]
    if nodelay:
        argv += ["-tt", f"{sshd.user}@127.0.0.1", "sleep 86400"]
    else:
        argv += ["-N", "-T", f"{sshd.user}@127.0.0.1"]
    proc = procs.start(name, argv)
    # Probe only the ports whose target does not mind an empty connection
    # (iperf3 does); the forwards are all requested at once, in order.
    for remote in forwards if probe is None else probe:
        if not wait_port(remote, timeout):
            raise RuntimeError(f"{name}: remote port {remote} never opened:\n{proc.tail()}")
    time.sleep(0.3)
    return proc


def ssh_ports(count: int) -> list[int]:
    return [free_port() for _ in range(count)]
