"""
Observability from the command line, as users run it: twistd relay and
agent with their admin sites and the agent's inspector (served from the
installed package), JSON logs through twistd --logger.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_contract import Proc, curl, env, freePort, procs, startAgent, startRelay, webRoot

__all__ = ["env", "procs", "webRoot"]

pytestmark = pytest.mark.contract


def test_twistd_admin_inspector_and_json_logs(
    tmp_path: Path, procs: list[Proc], env: dict[str, str], webRoot: int
) -> None:
    relayAdmin, agentAdmin, inspect = freePort(), freePort(), freePort()
    relay, port = startRelay(
        procs,
        env,
        tmp_path / "state",
        "--admin",
        f"tcp:{relayAdmin}:interface=127.0.0.1",
        "--admin-token",
        "contract-admin-token",
    )
    relay.waitFor(re.escape(f"admin endpoint on http://127.0.0.1:{relayAdmin}/"))
    agentEnv = dict(env, TXTUNNEL_INSPECT=f"tcp:{inspect}:interface=127.0.0.1")
    agent = startAgent(
        procs,
        agentEnv,
        port,
        "--http",
        str(webRoot),
        "--subdomain",
        "seen",
        "--admin",
        f"tcp:{agentAdmin}:interface=127.0.0.1",
    )
    agent.waitFor(re.escape(f"traffic inspector on http://127.0.0.1:{inspect}/"))
    agent.waitFor("tunnel ready")
    result = curl("-H", f"Host: seen.localhost:{port}", f"http://127.0.0.1:{port}/index.html")
    assert result.stdout == b"hello through twistd\n", result.stderr

    metrics = curl(f"http://127.0.0.1:{relayAdmin}/metrics").stdout.decode()
    assert 'txtunnel_relay_requests_total{method="GET",status_class="2xx",tunnel="seen"} 1.0' in metrics
    assert "txtunnel_agent_connected 1.0" in curl(f"http://127.0.0.1:{agentAdmin}/metrics").stdout.decode()
    stats = curl("-H", "Authorization: Bearer contract-admin-token", f"http://127.0.0.1:{relayAdmin}/stats")
    assert "seen.localhost" in stats.stdout.decode()
    page = curl(f"http://127.0.0.1:{inspect}/")
    assert b"<title>txtunnel inspector</title>" in page.stdout
    listing = json.loads(curl(f"http://127.0.0.1:{inspect}/api/requests").stdout)
    assert [r["target"] for r in listing["requests"]] == ["/index.html"]
    relay.waitFor(r"GET seen\.localhost:\d+/index\.html 200")
    for p in (agent, relay):
        p.stop()
    assert "Traceback" not in relay.output + agent.output


def test_twistd_json_logger(tmp_path: Path, procs: list[Proc], env: dict[str, str], webRoot: int) -> None:
    from tests.test_contract import twistd

    port = freePort()
    relay = twistd(
        procs,
        env,
        "--logger",
        "txtunnel.logs.jsonLogObserver",
        "tunnelrelay",
        "--http",
        f"tcp:{port}:interface=127.0.0.1",
        "--state-dir",
        str(tmp_path / "state"),
    )
    relay.waitFor("relay listening")
    curl("-H", f"Host: nobody.localhost:{port}", f"http://127.0.0.1:{port}/x")
    relay.waitFor('"namespace": "txtunnel.access"')
    relay.stop()
    records = [json.loads(line) for line in relay.lines if line.startswith("{")]
    access = [r for r in records if r["namespace"] == "txtunnel.access"]
    assert access and access[0]["status"] == 404 and access[0]["path"] == "/x" and access[0]["tunnel"] == "-"
    assert any("relay listening" in r["message"] for r in records)


def _waitServing(port: int, timeout: float = 20.0) -> None:
    """
    Wait until something accepts connections on C{port} (a quiet relay
    logs no "listening" line to wait for).
    """
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def test_cli_relay_json_quiet_and_verbose(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> None:
    """
    txtunnel relay --log-format json -q writes only JSON lines, on stdout
    and stderr alike, and only warnings (no info lines: neither "relay
    listening" nor a visitor's access line); -v before the command adds
    debug lines (the relay's reason for an error answer).
    """
    import signal

    from tests.test_contract import tool

    port = freePort()
    common = ["--http", f"tcp:{port}:interface=127.0.0.1", "--state-dir", str(tmp_path / "state")]
    quiet = Proc([tool("txtunnel"), "relay", "--log-format", "json", "-q", *common], env)
    procs.append(quiet)
    _waitServing(port)
    curl("-H", f"Host: nobody.localhost:{port}", f"http://127.0.0.1:{port}/x")
    assert quiet.stop(signal.SIGINT) == 0
    records = [json.loads(line) for line in quiet.lines]
    assert records, "a relay without --token warns"
    assert {r["level"] for r in records} <= {"warn", "error", "critical"}, quiet.output
    assert any("no --token given" in r["message"] for r in records)

    verbose = Proc([tool("txtunnel"), "-v", "--log-format", "json", "relay", *common], env)
    procs.append(verbose)
    verbose.waitFor("relay listening")
    result = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/{'x' * 9000}")
    assert result.stdout == b"414", result.stderr
    verbose.waitFor(r"answering 127\.0\.0\.1 with 414")
    assert verbose.stop(signal.SIGINT) == 0
    records = [json.loads(line) for line in verbose.lines]
    levels = {r["level"] for r in records}
    assert {"debug", "info", "warn"} <= levels, verbose.output
    debug = [r for r in records if r["level"] == "debug" and "with 414" in r["message"]]
    assert debug and debug[0]["status"] == 414 and debug[0]["client"] == "127.0.0.1"
