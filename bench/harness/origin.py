"""
The origin services every path leads to: nginx serving a 100-byte file and
big files, the upload sink, an iperf3 server and the idle-stream holder.
"""

from __future__ import annotations

import os
import sys

from .procs import Proc, Procs, free_port, wait_port

__all__ = ["Origin", "make_file", "start_holder", "start_iperf3", "start_nginx", "start_sink"]

HERE = os.path.dirname(os.path.abspath(__file__))


def make_file(path: str, size: int) -> str:
    """
    A file of C{size} zero bytes, sparse so that making it costs nothing.
    No path under test compresses (nginx gzip off, ssh Compression no,
    txtunnel has none), so zeros measure the same as random bytes.
    """
    with open(path, "wb") as f:
        f.truncate(size)
    return path


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    types {{ application/octet-stream bin; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        server_name _;
        root {www};
    }}
}}
"""


class Origin:
    """
    Addresses of the origin services.
    """

    nginx_port = 0
    sink_port = 0
    iperf_port = 0
    small = "/small.bin"
    big = "/big.bin"
    huge = "/huge.bin"


def start_nginx(procs: Procs, nginx: str, tmp: str, data: str, big: int, huge: int) -> tuple[Proc, int]:
    """
    nginx on a free loopback port, with a private prefix in C{tmp}: one
    worker (the machine has 2 cores and the tunnel needs the other).  The
    files it serves are in C{data}, on tmpfs when there is one: a sparse
    file on a disk is read at disk speed the first time, which would slow
    whichever path happens to go first.
    """
    prefix = os.path.join(tmp, "nginx")
    www = os.path.join(data, "www")
    os.makedirs(www, exist_ok=True)
    # nginx started as root serves from workers running as nobody/www-data.
    for d in (tmp, data, www):
        os.chmod(d, 0o755)
    for sub in ("logs", "body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(prefix, sub), exist_ok=True)
    os.chmod(prefix, 0o755)
    with open(os.path.join(www, "small.bin"), "wb") as f:
        f.write(bytes(range(100)))
    os.chmod(os.path.join(www, "small.bin"), 0o644)
    make_file(os.path.join(www, "big.bin"), big)
    make_file(os.path.join(www, "huge.bin"), huge)
    port = free_port()
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(prefix=prefix, www=www, port=port))
    proc = procs.start("nginx", [nginx, "-p", prefix, "-c", conf, "-e", os.path.join(prefix, "logs", "error.log")])
    if not wait_port(port, 15):
        raise RuntimeError(f"nginx did not listen on {port}:\n{proc.tail()}")
    return proc, port


def start_sink(procs: Procs) -> tuple[Proc, int]:
    port = free_port()
    proc = procs.start("sink", [sys.executable, os.path.join(HERE, "sink.py"), "127.0.0.1", str(port)])
    procs.wait_for(proc, r"listening", 15)
    return proc, port


def start_iperf3(procs: Procs, iperf3: str) -> tuple[Proc, int]:
    port = free_port()
    proc = procs.start("iperf3-server", [iperf3, "-s", "--forceflush", "-B", "127.0.0.1", "-p", str(port)])
    # Not wait_port: iperf3 takes a probe connection for a client and logs an error.
    procs.wait_for(proc, r"Server listening", 15)
    return proc, port


def start_holder(procs: Procs, name: str) -> tuple[Proc, int, str]:
    """
    The idle-stream target: accepts and holds connections, echoes bytes,
    and keeps its count of open connections in a file.
    """
    port = free_port()
    status = os.path.join(procs.logdir, f"{name}.count")
    proc = procs.start(
        name, [sys.executable, os.path.join(HERE, "holder.py"), "127.0.0.1", str(port), status], nofile=True
    )
    procs.wait_for(proc, r"listening", 15)
    return proc, port, status
