"""
Visitor policy and abuse limits as a user runs them: a twistd relay and
twistd agents as subprocesses, curl (and a raw socket or TLS client) as the
visitor.  Each control is shown denying what it should and allowing what
it should; one relay is shared by several checks to keep the file quick.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_contract import Proc, curl, env, freePort, procs, startAgent, startRelay, twistd  # noqa: F401

pytestmark = [pytest.mark.contract, pytest.mark.slow]

#: A local service: /headers echoes the request's headers, /slow answers
#: after a few seconds, /blob is 2,000 bytes.
SERVICE = r"""
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/slow":
            time.sleep(4)
        body = {"/headers": str(self.headers).encode(), "/blob": b"b" * 2000}.get(self.path, b"ok\n")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("Serving", flush=True)
server.serve_forever()
"""


def service(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> int:  # noqa: F811
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    port = freePort()
    p = Proc([sys.executable, str(script), str(port)], env)
    procs.append(p)
    p.waitFor("Serving")
    return port


def visit(port: int, name: str, path: str = "/", source: str = "127.0.0.1", *args: str) -> tuple[int, bytes]:
    """
    curl from C{source} (any 127/8 address is this host) to tunnel C{name}:
    the status and the whole answer.
    """
    result = curl(
        "-si", "--interface", source, "-H", f"Host: {name}.localhost:{port}", *args, f"http://127.0.0.1:{port}{path}"
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split(b" ", 2)[1]), result.stdout


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_twistd_visitor_and_agent_controls(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> None:  # noqa: F811
    """
    One twistd relay, several agents: per-tunnel and relay-wide IP rules,
    header add/remove, per-tunnel total and per-IP rates, a reserved name
    taken with a second token, max streams per agent, the default of ten
    tunnels per agent address, the idle timeout and TLS 1.1 refused on
    --https -- each refusing the bad case and passing the good one.
    """
    web = service(tmp_path, procs, env)
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token-0001 http:alice\nbob-token-0002\n")
    https = freePort()
    relay, port = startRelay(
        procs,
        env,
        tmp_path / "state",
        "--tokens-file",
        str(tokens),
        "--ip-deny",
        "127.0.0.3",
        "--remove-header",
        "X-Relay-Drop",
        "--bind-rate",
        "off",
        "--max-streams",
        "2",
        "--idle-timeout",
        "2",
        "--https",
        f"tcp:{https}:interface=127.0.0.1",
    )
    bob = ("--token", "bob-token-0002")

    def agent(name: str, *args: str) -> Proc:
        p = startAgent(procs, env, port, *bob, "--http", str(web), "--subdomain", name, *args)
        p.waitFor(f"tunnel ready: http://{name}.localhost")
        return p

    agent("ipt", "--ip-deny", "127.0.0.2")
    hdr = agent("hdr", "--add-header", "X-Added: yes", "--remove-header", "X-Secret")
    agent("rated", "--rate", "2/h")
    agent("perip", "--rate-per-ip", "1/h")

    # IP rules: the tunnel's own deny list, then the relay's.
    assert visit(port, "ipt", source="127.0.0.2")[0] == 403
    assert visit(port, "ipt")[0] == 200
    status, answer = visit(port, "hdr", source="127.0.0.3")
    assert status == 403 and b"may not use this relay" in answer, answer
    assert visit(port, "hdr", source="127.0.0.4")[0] == 200

    # Header rules: the tunnel's and the relay's removals, the tunnel's addition.
    extra = ("-H", "X-Secret: s", "-H", "X-Relay-Drop: d", "-H", "X-Keep: k")
    status, answer = visit(port, "hdr", "/headers", "127.0.0.1", *extra)
    body = answer.split(b"\r\n\r\n", 1)[1].lower()
    assert status == 200 and b"x-added: yes" in body and b"x-keep: k" in body, body
    assert b"x-secret" not in body and b"x-relay-drop" not in body, body

    # Rates: the tunnel's total, then per visitor address.
    assert [visit(port, "rated", source=f"127.0.0.{5 + i}")[0] for i in range(2)] == [200, 200]
    status, answer = visit(port, "rated", source="127.0.0.8")
    assert status == 429 and b"Retry-After:" in answer, answer
    assert visit(port, "perip", source="127.0.0.9")[0] == 200
    assert visit(port, "perip", source="127.0.0.9")[0] == 429
    assert visit(port, "perip", source="127.0.0.10")[0] == 200

    # A reserved name: refused to another token, bound with its own.
    thief = startAgent(procs, env, port, *bob, "--http", str(web), "--subdomain", "alice")
    thief.waitFor("the http name alice is reserved for another token")
    thief.popen.wait(20)
    owner = startAgent(procs, env, port, "--token", "alice-token-0001", "--http", str(web), "--subdomain", "alice")
    owner.waitFor("tunnel ready: http://alice.localhost")
    assert visit(port, "alice")[0] == 200

    # Max streams per agent link (2): with two visitors held, a third at
    # once gets 503 (which of them is a race, so all three are looked at).
    slow = [
        subprocess.Popen(
            ["curl", "-si", "-H", f"Host: hdr.localhost:{port}", f"http://127.0.0.1:{port}/slow"],
            stdout=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        answers = []
        while all(p.poll() is None for p in slow):  # while both are held (4 s)
            answers.append(visit(port, "hdr")[1])
            if answers[-1].startswith(b"HTTP/1.1 503"):
                break
    finally:
        answers += [p.communicate(timeout=30)[0] for p in slow]
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert refused and b"Retry-After: 1" in refused[0], answers
    assert any(a.startswith(b"HTTP/1.1 200") for a in answers), answers
    assert visit(port, "hdr")[0] == 200

    # Ten tunnels per agent address by default: five are up, so of six more one is refused.
    config = tmp_path / "many.ini"
    config.write_text("".join(f"[tunnel:m{i}]\ntype = http\ntarget = {web}\nsubdomain = many{i}\n" for i in range(6)))
    many = startAgent(procs, env, port, *bob, "--config", str(config))
    many.waitFor("at most 10 tunnels per agent address; this address holds 10")
    assert sum(f"tunnel ready: http://many{i}." in many.output for i in range(6)) == 5, many.output

    # Idle timeout (2 s): a kept-alive connection that goes quiet is closed.
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: ipt.localhost:{port}\r\n\r\n".encode())
        data = s.recv(65536)
        assert data.startswith(b"HTTP/1.1 200"), data
        started = time.monotonic()
        while s.recv(65536):
            pass
        assert time.monotonic() - started < 15

    # TLS 1.1 is refused on --https; TLS 1.2 is served.
    def handshake(version: ssl.TLSVersion) -> str:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", https), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="ipt.localhost") as tls:
                return str(tls.version())

    with pytest.raises(ssl.SSLError):
        handshake(ssl.TLSVersion.TLSv1_1)
    assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"

    relay.stop()
    assert "Traceback" not in relay.output, relay.output
    logs = relay.output + hdr.output + owner.output + many.output
    assert "alice-token-0001" not in logs and "bob-token-0002" not in logs


def test_twistd_quotas_survive_restart(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> None:  # noqa: F811
    """
    A per-visitor-address quota (relay) and a per-tunnel quota (agent):
    requests within them pass, the next gets 429 with the reset date, and
    after a SIGTERM and a restart on the same state directory the spent
    quotas are still spent while another address and tunnel still pass.
    """
    web = service(tmp_path, procs, env)
    state = tmp_path / "state"
    relay, port = startRelay(procs, env, state, "--quota-per-ip", "5000")
    startAgent(procs, env, port, "--http", str(web), "--subdomain", "small", "--quota", "3000").waitFor(
        "tunnel ready: http://small.localhost"
    )
    startAgent(procs, env, port, "--http", str(web), "--subdomain", "big").waitFor("tunnel ready: http://big.localhost")
    # The tunnel's 3,000 bytes: two blobs (heads count too), then spent.
    assert [visit(port, "small", "/blob", f"127.0.0.{2 + i}")[0] for i in range(2)] == [200, 200]
    status, answer = visit(port, "small", "/blob", "127.0.0.4")
    assert status == 429 and b"this tunnel's monthly bandwidth quota" in answer, answer
    # The address's 5,000 bytes: three blobs start within it, then it is spent.
    codes = [visit(port, "big", "/blob", "127.0.0.5")[0] for _ in range(3)]
    assert codes == [200, 200, 200], codes
    status, answer = visit(port, "big", "/blob", "127.0.0.5")
    assert status == 429 and b"your address's monthly bandwidth quota" in answer, answer

    relay.stop()
    relay = twistd(
        procs,
        env,
        "tunnelrelay",
        "--http",
        f"tcp:{port}:interface=127.0.0.1",
        "--state-dir",
        str(state),
        "--quota-per-ip",
        "5000",
    )
    relay.waitFor(f"relay listening on 127.0.0.1:{port}")
    for name in ("big", "small"):  # the agents reconnect to the same port
        deadline = time.monotonic() + 30
        while visit(port, name, "/", "127.0.0.6")[0] in (404, 502, 503):
            assert time.monotonic() < deadline, relay.output
            time.sleep(0.3)
    status, answer = visit(port, "big", "/blob", "127.0.0.5")
    assert status == 429 and b"your address's" in answer, answer
    status, answer = visit(port, "small", "/blob", "127.0.0.8")
    assert status == 429 and b"this tunnel's" in answer, answer
    relay.stop()
    assert "Traceback" not in relay.output, relay.output


def test_twistd_quota_covers_tcp_tunnels(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> None:  # noqa: F811
    """
    The per-address quota counts a visitor's TCP tunnel bytes and HTTP
    tunnel bytes together, so a free tier cannot be stepped around with a
    TCP tunnel: curl through a TCP tunnel passes within it, and once the
    address has spent it (partly over HTTP) its next TCP connection is
    closed with a log line naming the address and the quota; another
    address still passes.
    """
    web = service(tmp_path, procs, env)
    low = freePort()
    relay, port = startRelay(procs, env, tmp_path / "state", "--quota-per-ip", "5000", "--tcp-ports", f"{low}-{low}")
    tcp = startAgent(procs, env, port, "--tcp", str(web))
    tcpPort = int(tcp.waitFor(r"tunnel ready: tcp://127\.0\.0\.1:(\d+)").group(1))
    startAgent(procs, env, port, "--http", str(web), "--subdomain", "web").waitFor("tunnel ready: http://web.localhost")

    def overTCP(source: str) -> subprocess.CompletedProcess[bytes]:
        return curl("-si", "--interface", source, f"http://127.0.0.1:{tcpPort}/blob")

    for _ in range(2):  # about 2,200 bytes each, both ways
        result = overTCP("127.0.0.2")
        assert result.returncode == 0 and result.stdout.endswith(b"b" * 2000), result
    assert visit(port, "web", "/blob", "127.0.0.2")[0] == 200  # began within the quota; now spent
    refused = overTCP("127.0.0.2")
    assert refused.returncode != 0 and not refused.stdout, refused
    result = overTCP("127.0.0.3")
    assert result.returncode == 0 and result.stdout.endswith(b"b" * 2000), result
    relay.waitFor(
        f"TCP visitor 127.0.0.2 refused on port {tcpPort}: the monthly bandwidth quota of 4.9 KiB of address"
        r" 127\.0\.0\.2 is spent; it resets on"
    )
    relay.stop()
    assert "Traceback" not in relay.output, relay.output


def test_twistd_sni_certificates_and_visitor_client_ca(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> None:  # noqa: F811
    """
    --https with two certificates: curl (and Python's ssl, to read which
    certificate was served) gets the wildcard one for a tunnel under the
    domain and its own for a name that has one, each verifying against the
    CA.  A tunnel bound with --client-ca answers curl only with a client
    certificate from that CA (403 without one, or with another CA's), and
    the open tunnel beside it asks for none.
    """
    from tests.pki import CA

    domain = "example.test"
    relayCA = CA(tmp_path, "relay")
    wild, _ = relayCA.server("wild", f"*.{domain}")
    own, _ = relayCA.server("own", f"special.{domain}")
    visitorCA, otherCA = CA(tmp_path, "visitors"), CA(tmp_path, "other")
    visitor, visitorKey = visitorCA.client("visitor", "alice")
    stranger, strangerKey = otherCA.client("stranger", "mallory")
    web = service(tmp_path, procs, env)
    https = freePort()
    relay, port = startRelay(
        procs, env, tmp_path / "state", "--domain", domain, "--https", f"tcp:{https}:interface=127.0.0.1",
        "--https-cert", str(wild), "--https-cert", str(own),
    )  # fmt: skip
    for name, extra in (("locked", ("--client-ca", str(visitorCA.path))), ("special", ())):
        startAgent(procs, env, port, "--http", str(web), "--subdomain", name, *extra).waitFor(
            f"tunnel ready: http://{name}.{domain}"
        )

    def served(name: str) -> str:
        ctx = ssl.create_default_context(cafile=str(relayCA.path))
        with socket.create_connection(("127.0.0.1", https), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=f"{name}.{domain}") as tls:
                cert = tls.getpeercert()
        assert cert is not None
        return str(dict(pair[0] for pair in cert["subject"])["commonName"])

    assert served("locked") == f"*.{domain}"
    assert served("special") == f"special.{domain}"

    def get(name: str, *args: str) -> tuple[int, bytes]:
        result = curl(
            "--cacert", str(relayCA.path), "--resolve", f"{name}.{domain}:{https}:127.0.0.1",
            "-o", "-", "-w", "\n%{http_code}", *args, f"https://{name}.{domain}:{https}/",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        body, _, status = result.stdout.rpartition(b"\n")
        return int(status), body

    assert get("locked", "--cert", str(visitor), "--key", str(visitorKey)) == (200, b"ok\n")
    status, body = get("locked")
    assert status == 403 and b"none was presented" in body, body
    status, body = get("locked", "--cert", str(stranger), "--key", str(strangerKey))
    assert status == 403 and b"not from this tunnel's CA" in body, body
    assert get("special") == (200, b"ok\n")
    relay.stop()
    assert "Traceback" not in relay.output, relay.output


def hasIPv6Loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not hasIPv6Loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_twistd_ipv6_visitors(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> None:  # noqa: F811
    """
    A relay listening on [::1] only: an agent links over ws://[::1], and
    curl visiting over IPv6 meets a tunnel's IPv6 deny and allow lists
    (CIDR) and a per-address rate, each refusing and passing as it should;
    a relay-wide IPv6 deny list of another network lets ::1 through.
    """
    web = service(tmp_path, procs, env)
    port = freePort()
    relay = twistd(
        procs, env, "tunnelrelay", "--http", rf"tcp6:{port}:interface=\:\:1", "--state-dir", str(tmp_path / "state"),
        "--ip-deny", "2001:db8::/32", "--bind-rate", "off",
    )  # fmt: skip
    relay.waitFor(f"relay listening on .*{port}")
    for name, extra in (
        ("denied", ("--ip-deny", "::1/128")),
        ("allowed", ("--ip-allow", "::/127")),
        ("others", ("--ip-allow", "fd00::/8")),
        ("rated", ("--rate-per-ip", "1/h")),
    ):
        agent = twistd(
            procs, env, "tunnelagent", "--relay", f"ws://[::1]:{port}", "--http", str(web), "--subdomain", name, *extra
        )
        agent.waitFor(f"tunnel ready: http://{name}.localhost")

    def visit6(name: str) -> tuple[int, bytes]:
        result = curl("-si", "-H", f"Host: {name}.localhost:{port}", f"http://[::1]:{port}/")
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split(b" ", 2)[1]), result.stdout

    status, answer = visit6("denied")
    assert status == 403 and b"may not use this tunnel" in answer, answer
    assert visit6("allowed")[0] == 200
    assert visit6("others")[0] == 403
    assert visit6("rated")[0] == 200
    status, answer = visit6("rated")
    assert status == 429 and b"Retry-After:" in answer, answer
    relay.stop()
    assert "Traceback" not in relay.output, relay.output


def test_twistd_bind_rate_default(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> None:  # noqa: F811
    """
    A relay started with no limit options holds new tunnels from one
    address to the default rate (5/m:3: eight at once): an agent asking
    for nine is given eight, and told why the ninth was refused.
    """
    web = service(tmp_path, procs, env)
    relay, port = startRelay(procs, env, tmp_path / "state")
    ini = tmp_path / "agent.ini"
    ini.write_text(
        f"[agent]\nrelay = ws://127.0.0.1:{port}\n\n"
        + "".join(f"[tunnel:t{i}]\ntype = http\ntarget = {web}\nsubdomain = rate{i}\n\n" for i in range(9))
    )
    agent = startAgent(procs, env, port, "--config", str(ini))
    agent.waitFor("too many new tunnels from this address; try again in")
    for _ in range(100):
        if sum("tunnel ready: http://rate" in line for line in list(agent.lines)) >= 8:
            break
        time.sleep(0.05)
    ready = [line for line in list(agent.lines) if "tunnel ready: http://rate" in line]
    assert len(ready) == 8, ready
    served = [visit(port, f"rate{i}")[0] for i in range(9)]
    assert sorted(served) == [200] * 8 + [404], served
