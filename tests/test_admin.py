"""
The admin endpoint of the relay and the agent: /metrics (checked against
docs/metrics.rst), /health and the token-protected /stats, with a real
relay, agent, origin and curl on loopback.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock

from tests.conftest import Relay, RunningAgent, closedPort, curl, startAgent, startRelay, wait
from txtunnel.admin import hashAdminToken
from txtunnel.metrics import methodLabel, statusClass

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.rst"
ADMIN = "tcp:0:interface=127.0.0.1"
TOKEN = "admin-token-for-tests"


def documented() -> dict[str, tuple[str, set[str]]]:
    """
    C{name: (type, labels)} for each metric in docs/metrics.rst, written as
    a line C{``NAME``} followed by C{   TYPE; labels: ``a``, ``b``. ...}.
    """
    lines = DOCS.read_text().splitlines()
    found: dict[str, tuple[str, set[str]]] = {}
    for i, line in enumerate(lines):
        match = re.fullmatch(r"``(txtunnel_\w+)``", line.strip())
        if match and line == line.lstrip():
            info = lines[i + 1].strip()
            kind = info.split(";")[0].split(".")[0].strip()
            labels = set(re.findall(r"``(\w+)``", info.split(".", 1)[0])) if "labels:" in info else set()
            found[match.group(1)] = (kind, labels)
    return found


def exported(text: str) -> dict[str, tuple[str, set[str]]]:
    """
    C{name: (type, labels)} for each family in a scrape, named as scraped
    (counters with C{_total}).
    """
    found: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels) - {"le"}
        found[name] = (family.type, labels)
    return found


async def fetch(url: str, *args: str) -> tuple[int, bytes]:
    code, out, err = await curl("-o", "-", "-w", "\n%{http_code}", *args, url)
    assert code == 0, err
    body, _, status = out.rpartition(b"\n")
    return int(status), body


async def adminSetup(tmp_path: Any, agents: list[RunningAgent], origin: int) -> tuple[Relay, RunningAgent]:
    relay = await startRelay(str(tmp_path / "state"), "--admin", ADMIN, "--admin-token", TOKEN)
    agent = await startAgent(
        agents, relay, "--http", str(origin), "--subdomain", "app", "--admin", ADMIN, "--admin-token", TOKEN
    )
    await agent.service.sitesReady
    return relay, agent


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sampleValue(text: str, name: str, **labels: str) -> float:
    """
    The value of the sample C{name} (as scraped, e.g. C{..._total}) with
    exactly C{labels}, 0 when there is none.
    """
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def scrape(port: int | None) -> str:
    status, body = await fetch(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return body.decode()


async def scrapeUntil(port: int | None, condition: Any, timeout: float = 20.0) -> str:
    """
    Scrape until C{condition(text)} holds (values that follow a socket
    closing elsewhere settle a moment later), or fail with the last scrape.
    """
    text = ""
    for _ in range(int(timeout / 0.1)):
        text = await scrape(port)
        if condition(text):
            return text
        await wait(0.1)
    raise AssertionError(f"metrics never reached the expected values:\n{text}")


GOOD = "agent-token-for-tests"


@pytest_twisted.ensureDeferred
async def test_metrics_match_docs(tmp_path: Any, agents: list[RunningAgent], origin: int) -> None:
    """
    After traffic that fills every family -- a 200, a POST, a 404 from the
    relay, a 502 from a dead local port, an agent refused for a bad token,
    and a scrape while a request is held open -- both /metrics pages list
    exactly the names, types and labels docs/metrics.rst lists, for every
    family (none is left without samples, so no label set goes unchecked),
    and the counts add up.
    """
    relay = await startRelay(
        str(tmp_path / "state"), "--admin", ADMIN, "--admin-token", TOKEN, "--token", GOOD, "--grace", "0"
    )
    config = tmp_path / "agent.ini"
    config.write_text(
        f"[tunnel:app]\ntype = http\ntarget = {origin}\nsubdomain = app\n\n"
        f"[tunnel:dead]\ntype = http\ntarget = {closedPort()}\nsubdomain = dead\n"
    )
    agent = await startAgent(
        agents, relay, "--config", str(config), "--token", GOOD, "--admin", ADMIN, "--no-access-log"
    )
    await agent.service.sitesReady
    held = None
    try:
        base = f"http://127.0.0.1:{relay.port}"
        code, out, err = await curl("-H", f"Host: app.localhost:{relay.port}", f"{base}/hello")
        assert code == 0 and b"hello from origin" in out, err
        code, out, err = await curl("-H", f"Host: app.localhost:{relay.port}", "-d", "x" * 1000, f"{base}/echo")
        assert code == 0 and out == b"x" * 1000, err
        code, out, err = await curl("-H", f"Host: nope.localhost:{relay.port}", f"{base}/")
        assert code == 0
        status, _ = await fetch(f"{base}/", "-H", f"Host: dead.localhost:{relay.port}")
        assert status == 502
        refused = await startAgent(
            agents, relay, "--http", str(origin), "--token", "wrong-token-1234", expectReady=False
        )
        with pytest.raises(RuntimeError):
            await refused.agent.ready
        # A request the origin never answers keeps one stream open on both sides.
        held = socket.create_connection(("127.0.0.1", relay.port))
        held.sendall(f"GET /never HTTP/1.1\r\nHost: app.localhost:{relay.port}\r\n\r\n".encode())

        def streamOpen(text: str) -> bool:
            return any(
                sampleValue(text, f"txtunnel_{side}_streams_open", protocol="http") == 1 for side in ("relay", "agent")
            )

        relayText = await scrapeUntil(relay.relay.adminPort, streamOpen)
        agentText = await scrapeUntil(agent.service.adminPort, streamOpen)
        scraped = {**exported(relayText), **exported(agentText)}
        docs = documented()
        assert sorted(scraped) == sorted(docs)
        for name, (kind, labels) in scraped.items():
            assert docs[name] == (kind, labels), name
        for name, family in {**families(relayText), **families(agentText)}.items():
            assert family.samples, f"{name} has no samples: its labels went unchecked"

        ok = {"method": "GET", "status_class": "2xx", "tunnel": "app"}
        assert sampleValue(relayText, "txtunnel_relay_requests_total", **ok) == 1
        posted = {"method": "POST", "status_class": "2xx", "tunnel": "app"}
        assert sampleValue(relayText, "txtunnel_relay_requests_total", **posted) == 1
        missing = {"method": "GET", "status_class": "4xx", "tunnel": "-"}
        assert sampleValue(relayText, "txtunnel_relay_requests_total", **missing) == 1
        assert (
            sampleValue(relayText, "txtunnel_relay_requests_total", method="GET", status_class="5xx", tunnel="dead")
            == 1
        )
        assert sampleValue(relayText, "txtunnel_relay_tunnels", protocol="http") == 2
        assert sampleValue(relayText, "txtunnel_relay_link_refusals_total", code="auth") == 1
        assert sampleValue(relayText, "txtunnel_relay_bytes_total", protocol="http", direction="in") > 1000
        assert sampleValue(relayText, "txtunnel_relay_bytes_total", protocol="http", direction="out") > 1000
        # Through the agent (no inspector, no access log: counted because the admin site is on).
        assert sampleValue(agentText, "txtunnel_agent_requests_total", **ok) == 1
        assert sampleValue(agentText, "txtunnel_agent_requests_total", **posted) == 1
        assert sampleValue(agentText, "txtunnel_agent_local_errors_total", tunnel="dead") == 1
        assert sampleValue(agentText, "txtunnel_agent_connected") == 1
        states = {s.labels["state"]: s.value for s in families(agentText)["txtunnel_agent_link_state"].samples}
        assert states["connected"] == 1 and sum(states.values()) == 1
    finally:
        if held is not None:
            held.close()
        await relay.service.stopService()


@pytest_twisted.ensureDeferred
async def test_health_and_stats(tmp_path: Any, agents: list[RunningAgent], origin: int) -> None:
    """
    /health answers liveness and readiness; /stats wants the admin token
    (401 without or with a wrong one) and then lists the tunnel.
    """
    relay, agent = await adminSetup(tmp_path, agents, origin)
    try:
        for port in (relay.relay.adminPort, agent.service.adminPort):
            base = f"http://127.0.0.1:{port}"
            status, body = await fetch(base + "/health")
            assert status == 200 and json.loads(body) == {
                "live": True,
                "ready": True,
                "reason": json.loads(body)["reason"],
            }
            assert (await fetch(base + "/health/live"))[0] == 200
            assert (await fetch(base + "/health/ready"))[0] == 200
            assert (await fetch(base + "/health/other"))[0] == 404
            assert (await fetch(base + "/stats"))[0] == 401
            assert (await fetch(base + "/stats", "-H", "Authorization: Bearer wrong-token-123"))[0] == 401
            assert (await fetch(base + "/stats", "-H", f"Authorization: Basic {TOKEN}"))[0] == 401
            status, body = await fetch(base + "/stats", "-H", f"Authorization: Bearer {TOKEN}")
            assert status == 200
            assert "app.localhost" in body.decode()
    finally:
        await relay.service.stopService()
    # The agent is not ready once its link is gone, but still live.
    for _ in range(50):
        status, body = await fetch(f"http://127.0.0.1:{agent.service.adminPort}/health/ready")
        if status == 503:
            break
        await wait(0.05)
    assert status == 503 and json.loads(body)["ready"] is False
    assert (await fetch(f"http://127.0.0.1:{agent.service.adminPort}/health/live"))[0] == 200


@pytest_twisted.ensureDeferred
async def test_stats_off_without_token(tmp_path: Any) -> None:
    """
    With no admin token /stats is refused (fail closed), and --admin ""
    turns the endpoint off.
    """
    relay = await startRelay(str(tmp_path / "state"), "--admin", ADMIN)
    try:
        status, body = await fetch(f"http://127.0.0.1:{relay.relay.adminPort}/stats")
        assert status == 403 and b"--admin-token" in body
    finally:
        await relay.service.stopService()
    relay = await startRelay(str(tmp_path / "state2"))
    try:
        assert relay.relay.adminPort is None
    finally:
        await relay.service.stopService()


def test_token_kept_hashed_and_short_refused() -> None:
    from txtunnel.admin import AdminSite
    from txtunnel.relay import tap as relayTap
    from txtunnel.relay.service import Relay as RelayCore

    options = relayTap.Options(environ={})
    options.parseOptions(["--admin-token", TOKEN])
    relay = RelayCore(MemoryReactorClock(), dict(options), {})
    site = AdminSite(relay, TOKEN)
    stats = site.resource.children[b"stats"]
    assert stats.tokenHash == hashAdminToken(TOKEN)
    assert TOKEN.encode() not in stats.tokenHash
    with pytest.raises(Exception, match="at least 8"):
        relayTap.Options(environ={}).parseOptions(["--admin-token", "short"])
    with pytest.raises(Exception, match="endpoint"):
        relayTap.Options(environ={}).parseOptions(["--admin", "nonsense:1:2"])


def test_labels_are_bounded() -> None:
    """
    Visitors cannot invent label values: unknown methods are OTHER.
    """
    assert methodLabel(b"GET") == "GET"
    assert methodLabel(b"BREW") == "OTHER"
    assert methodLabel("x" * 100) == "OTHER"
    assert statusClass(204) == "2xx"
    assert statusClass(0) == "error"
    assert statusClass(999) == "error"


def test_tunnel_labels_are_bounded() -> None:
    from txtunnel.metrics import MAX_TUNNEL_LABELS, AgentMetrics

    class Idle:
        reactor = MemoryReactorClock()
        session = None
        tunnels: list[Any] = []

    metrics = AgentMetrics(Idle())
    for i in range(MAX_TUNNEL_LABELS + 50):
        metrics.requestDone(f"name-{i}", b"GET", 200, 0.01)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    tunnels = {s.labels["tunnel"] for s in families["txtunnel_agent_requests"].samples}
    assert len(tunnels) == MAX_TUNNEL_LABELS + 1 and "OTHER" in tunnels


@pytest_twisted.ensureDeferred
async def test_relay_not_ready_while_draining(tmp_path: Any, agents: list[RunningAgent], origin: int) -> None:
    """
    On shutdown the admin site stays up while requests drain, and
    /health/ready says 503 so a load balancer stops sending visitors.
    """
    from twisted.internet import defer

    relay = await startRelay(str(tmp_path / "state"), "--admin", ADMIN, "--drain-timeout", "2")
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "slow")
    pending = defer.ensureDeferred(
        curl("-H", f"Host: slow.localhost:{relay.port}", "--max-time", "10", f"http://127.0.0.1:{relay.port}/never")
    )
    await wait(0.3)
    base = f"http://127.0.0.1:{relay.relay.adminPort}"
    assert (await fetch(base + "/health/ready"))[0] == 200
    stopping = defer.maybeDeferred(relay.service.stopService)
    status, body = await fetch(base + "/health/ready")
    assert status == 503 and b"draining" in body
    assert (await fetch(base + "/health/live"))[0] == 200
    await stopping
    await pending
