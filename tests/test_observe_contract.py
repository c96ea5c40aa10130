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
