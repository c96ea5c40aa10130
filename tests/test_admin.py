"""
The admin endpoint of the relay and the agent: /metrics (checked against
docs/metrics.rst), /health and the token-protected /stats, with a real
relay, agent, origin and curl on loopback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock

from tests.conftest import Relay, RunningAgent, curl, startAgent, startRelay, wait
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


@pytest_twisted.ensureDeferred
async def test_metrics_match_docs(tmp_path: Any, agents: list[RunningAgent], origin: int) -> None:
    """
    After traffic (a 200, a 404 from the relay, a POST), both /metrics
    pages list exactly the names, types and labels docs/metrics.rst lists,
    and the counts add up.
    """
    relay, agent = await adminSetup(tmp_path, agents, origin)
    try:
        host = f"app.localhost:{relay.port}"
        code, out, err = await curl("-H", f"Host: {host}", f"http://127.0.0.1:{relay.port}/hello")
        assert code == 0 and b"hello from origin" in out, err
        code, out, err = await curl("-H", f"Host: {host}", "-d", "x" * 1000, f"http://127.0.0.1:{relay.port}/echo")
        assert code == 0 and out == b"x" * 1000, err
        code, out, err = await curl("-H", f"Host: nope.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/")
        assert code == 0
        status, relayText = await fetch(f"http://127.0.0.1:{relay.relay.adminPort}/metrics")
        assert status == 200
        status, agentText = await fetch(f"http://127.0.0.1:{agent.service.adminPort}/metrics")
        assert status == 200
        scraped = {**exported(relayText.decode()), **exported(agentText.decode())}
        docs = documented()
        assert sorted(scraped) == sorted(docs)
        for name, (kind, labels) in scraped.items():
            assert docs[name][0] == kind, name
            if labels:
                assert labels == docs[name][1], name
        families = {f.name: f for f in text_string_to_metric_families(relayText.decode())}
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value for s in families["txtunnel_relay_requests"].samples
        }
        ok = (("method", "GET"), ("status_class", "2xx"), ("tunnel", "app"))
        assert samples[("txtunnel_relay_requests_total", ok)] == 1
        posted = (("method", "POST"), ("status_class", "2xx"), ("tunnel", "app"))
        assert samples[("txtunnel_relay_requests_total", posted)] == 1
        missing = (("method", "GET"), ("status_class", "4xx"), ("tunnel", "-"))
        assert samples[("txtunnel_relay_requests_total", missing)] == 1
        tunnels = {s.labels["protocol"]: s.value for s in families["txtunnel_relay_tunnels"].samples}
        assert tunnels["http"] == 1
        inBytes = {
            s.labels["direction"]: s.value
            for s in families["txtunnel_relay_bytes"].samples
            if s.labels["protocol"] == "http" and s.name.endswith("_total")
        }
        assert inBytes["in"] > 1000 and inBytes["out"] > 1000
        agentFamilies = {f.name: f for f in text_string_to_metric_families(agentText.decode())}
        assert [s.value for s in agentFamilies["txtunnel_agent_connected"].samples] == [1]
        states = {s.labels["state"]: s.value for s in agentFamilies["txtunnel_agent_link_state"].samples}
        assert states["connected"] == 1 and sum(states.values()) == 1
    finally:
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
