"""
The values of the metrics, not only their names: link drops, refusals and
reconnects, limit rejections, the request duration histogram's count and
the open connections gauge, each after real traffic through a relay and
an agent on loopback, read from the admin sites' /metrics pages.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted

from tests.conftest import RunningAgent, curl, startAgent, startRelay
from tests.test_admin import ADMIN, GOOD, sampleValue, scrape, scrapeUntil
from tests.test_reconnect import dropLink, rebound
from txtunnel.relay.session import MAX_TUNNELS_PER_LINK


def histogramCount(text: str, name: str) -> float:
    return sampleValue(text, name + "_count")


def requestsTotal(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


@pytest_twisted.ensureDeferred
async def test_link_drop_refusal_and_reconnect(tmp_path: Any, agents: list[RunningAgent], origin: int) -> None:
    """
    A dropped link counts once in the relay's links_lost_total and once in
    the agent's reconnects_total; both sides count two links.  An agent
    with a bad token counts in link_refusals_total{code="auth"} and not in
    links_total.
    """
    relay = await startRelay(str(tmp_path / "state"), "--admin", ADMIN, "--token", GOOD)
    try:
        agent = await startAgent(agents, relay, "--http", str(origin), "--token", GOOD, "--admin", ADMIN)
        await agent.service.sitesReady
        agentText = await scrape(agent.service.adminPort)
        assert sampleValue(agentText, "txtunnel_agent_links_total") == 1
        assert sampleValue(agentText, "txtunnel_agent_reconnects_total") == 0
        old = dropLink(agent)
        await rebound(agent, old)
        agentText = await scrape(agent.service.adminPort)
        assert sampleValue(agentText, "txtunnel_agent_links_total") == 2
        assert sampleValue(agentText, "txtunnel_agent_reconnects_total") == 1
        assert sampleValue(agentText, "txtunnel_agent_connected") == 1
        relayText = await scrapeUntil(
            relay.relay.adminPort, lambda t: sampleValue(t, "txtunnel_relay_links_lost_total") == 1
        )
        assert sampleValue(relayText, "txtunnel_relay_links_total") == 2
        assert sampleValue(relayText, "txtunnel_relay_agents_connected") == 1
        assert sampleValue(relayText, "txtunnel_relay_link_refusals_total", code="auth") == 0

        refused = await startAgent(
            agents, relay, "--http", str(origin), "--token", "wrong-token-1234", expectReady=False
        )
        with pytest.raises(RuntimeError, match="token"):
            await refused.agent.ready
        relayText = await scrape(relay.relay.adminPort)
        assert sampleValue(relayText, "txtunnel_relay_link_refusals_total", code="auth") == 1
        assert sampleValue(relayText, "txtunnel_relay_links_total") == 2
        assert sampleValue(relayText, "txtunnel_relay_agents_connected") == 1
    finally:
        await relay.service.stopService()


@pytest_twisted.ensureDeferred
async def test_limit_rejections(tmp_path: Any, agents: list[RunningAgent], origin: int) -> None:
    """
    Each limit counts its own rejections: a bind past the tunnels per
    link, a request line over the limit (414), and a visitor past
    --max-streams (503).  The others stay at 0 (the per-address limits are
    off here, so that all 51 binds reach the per-link one).
    """
    relay = await startRelay(
        str(tmp_path / "state"),
        "--admin",
        ADMIN,
        "--max-streams",
        "1",
        "--max-tunnels-per-ip",
        "0",
        "--bind-rate",
        "off",
    )
    config = tmp_path / "agent.ini"
    config.write_text(
        "".join(
            f"[tunnel:t{i}]\ntype = http\ntarget = {origin}\nsubdomain = t{i}\n\n"
            for i in range(MAX_TUNNELS_PER_LINK + 1)
        )
    )
    held = None
    try:
        agent = await startAgent(agents, relay, "--config", str(config))
        assert sum(1 for t in agent.agent.tunnels if t.address) == MAX_TUNNELS_PER_LINK
        text = await scrape(relay.relay.adminPort)
        assert sampleValue(text, "txtunnel_relay_limit_rejections_total", limit="tunnels-per-link") == 1

        host = f"Host: t0.localhost:{relay.port}"
        base = f"http://127.0.0.1:{relay.port}"
        code, out, err = await curl("-o", "/dev/null", "-w", "%{http_code}", "-H", host, f"{base}/{'x' * 9000}")
        assert code == 0 and out == b"414", (out, err)
        text = await scrape(relay.relay.adminPort)
        assert sampleValue(text, "txtunnel_relay_limit_rejections_total", limit="request-head") == 1

        held = socket.create_connection(("127.0.0.1", relay.port))
        held.sendall(f"GET /never HTTP/1.1\r\n{host}\r\n\r\n".encode())
        await scrapeUntil(
            relay.relay.adminPort, lambda t: sampleValue(t, "txtunnel_relay_streams_open", protocol="http") == 1
        )
        code, out, err = await curl("-o", "/dev/null", "-w", "%{http_code}", "-H", host, f"{base}/hello")
        assert code == 0 and out == b"503", (out, err)
        text = await scrape(relay.relay.adminPort)
        rejections = {
            limit: sampleValue(text, "txtunnel_relay_limit_rejections_total", limit=limit)
            for limit in ("tunnels-per-link", "request-head", "max-streams", "tunnels-per-ip", "bind-rate", "rate")
        }
        assert rejections == {
            "tunnels-per-link": 1,
            "request-head": 1,
            "max-streams": 1,
            "tunnels-per-ip": 0,
            "bind-rate": 0,
            "rate": 0,
        }
    finally:
        if held is not None:
            held.close()
        await relay.service.stopService()


@pytest_twisted.ensureDeferred
async def test_duration_count_and_open_connections(tmp_path: Any, agents: list[RunningAgent], origin: int) -> None:
    """
    The request duration histograms count exactly the requests made (the
    relay's all five, the agent's the four that reached it, with no
    inspector and no access log), matching requests_total; and
    connections_open counts an idle visitor connection while it is held
    open and drops again when it closes.
    """
    relay = await startRelay(str(tmp_path / "state"), "--admin", ADMIN)
    held = None
    try:
        agent = await startAgent(
            agents, relay, "--http", str(origin), "--subdomain", "app", "--admin", ADMIN, "--no-access-log"
        )
        await agent.service.sitesReady
        base = f"http://127.0.0.1:{relay.port}"
        app = f"Host: app.localhost:{relay.port}"
        for args in (
            ["-H", app, f"{base}/hello"],
            ["-H", app, f"{base}/hello?2"],
            ["-H", app, f"{base}/"],
            ["-H", app, "-d", "posted", f"{base}/echo"],
            ["-H", f"Host: nope.localhost:{relay.port}", f"{base}/"],
        ):
            code, _, err = await curl("-o", "/dev/null", *args)
            assert code == 0, err
        relayText = await scrape(relay.relay.adminPort)
        assert histogramCount(relayText, "txtunnel_relay_request_duration_seconds") == 5
        assert requestsTotal(relayText, "txtunnel_relay_requests_total") == 5
        agentText = await scrape(agent.service.adminPort)
        assert histogramCount(agentText, "txtunnel_agent_request_duration_seconds") == 4
        assert requestsTotal(agentText, "txtunnel_agent_requests_total") == 4

        def connections(n: int) -> Any:
            return lambda t: sampleValue(t, "txtunnel_relay_connections_open", scheme="http") == n

        # The agent's link is one connection on the HTTP listener.
        await scrapeUntil(relay.relay.adminPort, connections(1))
        held = socket.create_connection(("127.0.0.1", relay.port))
        await scrapeUntil(relay.relay.adminPort, connections(2))
        held.close()
        held = None
        await scrapeUntil(relay.relay.adminPort, connections(1))
    finally:
        if held is not None:
            held.close()
        await relay.service.stopService()
