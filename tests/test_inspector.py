"""
The agent's traffic inspector over real sockets: a real relay, agent and
origin, curl as visitor and as API client; and (slow) the page itself in
headless Chromium with Playwright.
"""

from __future__ import annotations

import json
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.conftest import Relay, RunningAgent, curl, inThread, needBrowser, startAgent, wait

INSPECT = "tcp:0:interface=127.0.0.1"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


class Counting(Resource):
    """
    Counts the requests for each path; answers JSON (404 for C{/missing}).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hits: dict[bytes, list[bytes]] = {}

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        self.hits.setdefault(request.path, []).append(body)
        if request.path == b"/missing":
            request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"path": request.path.decode(), "n": len(self.hits[request.path])}).encode()


@pytest.fixture
def counting() -> Iterator[tuple[int, Counting]]:
    resource = Counting()
    site = Site(resource)
    site.noisy = False
    port = pytest_twisted.blockon(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site))
    yield port.getHost().port, resource
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


async def inspected(agents: list[RunningAgent], relay: Relay, port: int, name: str) -> tuple[RunningAgent, str]:
    agent = await startAgent(agents, relay, "--http", str(port), "--subdomain", name, "--inspect", INSPECT)
    await agent.service.sitesReady
    return agent, f"http://127.0.0.1:{agent.service.inspectPort}"


async def api(url: str, *args: str) -> tuple[int, Any]:
    code, out, err = await curl("-o", "-", "-w", "\n%{http_code}", *args, url)
    assert code == 0, err
    body, _, status = out.rpartition(b"\n")
    try:
        return int(status), json.loads(body)
    except ValueError:
        return int(status), body


@pytest_twisted.ensureDeferred
async def test_list_detail_replay(relay: Relay, agents: list[RunningAgent], counting: tuple[int, Counting]) -> None:
    """
    A request through the tunnel is listed and detailed; replay sends it
    again (the origin sees it twice) and the replay is captured too; an
    edited replay changes method, path and body.
    """
    port, origin = counting
    agent, base = await inspected(agents, relay, port, "insp")
    host = f"insp.localhost:{relay.port}"
    code, out, err = await curl(
        "-H",
        f"Host: {host}",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"hello": "world"}',
        f"http://127.0.0.1:{relay.port}/hook?x=1",
    )
    assert code == 0 and json.loads(out)["n"] == 1, err
    status, listing = await api(base + "/api/requests")
    assert status == 200
    [summary] = listing["requests"]
    assert summary["method"] == "POST" and summary["target"] == "/hook?x=1" and summary["status"] == 200
    status, detail = await api(f"{base}/api/requests/{summary['id']}")
    assert detail["request"]["body"]["kind"] == "json"
    assert json.loads(detail["request"]["body"]["text"]) == {"hello": "world"}
    assert detail["response"]["body"]["kind"] == "json"
    assert ["X-Forwarded-For", "127.0.0.1"] in detail["request"]["headers"]

    status, replayed = await api(
        f"{base}/api/requests/{summary['id']}/replay", "-X", "POST", "-H", "Content-Type: application/json", "-d", "{}"
    )
    assert status == 202 and replayed["replayOf"] == summary["id"]
    for _ in range(100):
        if len(origin.hits.get(b"/hook", [])) == 2:
            break
        await wait(0.02)
    assert origin.hits[b"/hook"] == [b'{"hello": "world"}'] * 2
    for _ in range(100):
        status, again = await api(f"{base}/api/requests/{replayed['id']}")
        if again["done"]:
            break
        await wait(0.02)
    assert again["replayOf"] == summary["id"] and again["status"] == 200
    assert json.loads(again["response"]["body"]["text"])["n"] == 2

    edits = {"method": "PUT", "target": "/edited", "body": "changed"}
    status, replayed = await api(
        f"{base}/api/requests/{summary['id']}/replay",
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(edits),
    )
    assert status == 202
    for _ in range(100):
        if origin.hits.get(b"/edited"):
            break
        await wait(0.02)
    assert origin.hits[b"/edited"] == [b"changed"]


@pytest_twisted.ensureDeferred
async def test_api_refusals(relay: Relay, agents: list[RunningAgent], counting: tuple[int, Counting]) -> None:
    """
    Foreign Host names (DNS rebinding), replays without JSON, bad edits
    and unknown ids get clear errors.
    """
    port, origin = counting
    agent, base = await inspected(agents, relay, port, "refuse")
    code, out, err = await curl("-H", f"Host: refuse.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/one")
    assert code == 0, err
    status, body = await api(base + "/api/requests", "-H", "Host: evil.example")
    assert status == 403 and "localhost" in body["error"]
    status, body = await api(base + "/", "-H", "Host: evil.example:4040")
    assert status == 403
    assert (await api(base + "/api/requests", "-H", "Host: localhost:4040"))[0] == 200
    status, listing = await api(base + "/api/requests")
    rid = listing["requests"][0]["id"]
    status, body = await api(f"{base}/api/requests/{rid}/replay", "-X", "POST", "-d", "a=b")
    assert status == 415
    status, body = await api(
        f"{base}/api/requests/{rid}/replay", "-X", "POST", "-H", "Content-Type: application/json", "-d", "[1"
    )
    assert status == 400 and "JSON" in body["error"]
    status, body = await api(
        f"{base}/api/requests/{rid}/replay",
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"target": "/x\\r\\nEvil: 1"}',
    )
    assert status == 400 and "target" in body["error"]
    assert (await api(f"{base}/api/requests/999999"))[0] == 404
    assert (await api(f"{base}/api/requests/nope"))[0] == 404
    assert origin.hits == {b"/one": [b""]}
    status, page = await api(base + "/")
    assert status == 200 and b"txtunnel inspector" in page


@pytest_twisted.ensureDeferred
async def test_inspector_off(relay: Relay, agents: list[RunningAgent], counting: tuple[int, Counting]) -> None:
    """
    With --inspect "" nothing listens and nothing is captured.
    """
    port, _ = counting
    agent = await startAgent(agents, relay, "--http", str(port), "--subdomain", "off")
    await agent.service.sitesReady
    assert agent.service.inspectPort is None and not agent.agent.traffic.keep
    code, out, err = await curl("-H", f"Host: off.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/")
    assert code == 0 and not agent.agent.traffic.captures


def _sse(port: int, path: bytes) -> bytes:
    """
    Read the event stream (raw socket: no client buffering) until an event
    names C{path}.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
        seen = b""
        while path not in seen:
            data = s.recv(65536)
            if not data:
                break
            seen += data
        return seen


@pytest_twisted.ensureDeferred
async def test_events_pushed(relay: Relay, agents: list[RunningAgent], counting: tuple[int, Counting]) -> None:
    port, _ = counting
    agent, base = await inspected(agents, relay, port, "events")
    reader = defer.ensureDeferred(inThread(_sse, agent.service.inspectPort, b"/pushed"))
    await wait(0.3)
    code, out, err = await curl("-H", f"Host: events.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/pushed")
    assert code == 0, err
    seen = await reader
    assert b"content-type: text/event-stream" in seen.lower()
    assert b"event: request" in seen and b'"target": "/pushed"' in seen


def _browse(base: str, visit: str, host: str, shot: Path) -> dict[str, Any]:
    """
    In headless Chromium: load the page, make requests through the tunnel,
    see them appear without reload, open one, replay it, see the replay;
    filter by text, status class and method; replay it edited to a new
    path.  Returns what the page showed, for the test to check.
    """
    from playwright.sync_api import sync_playwright

    def send(path: str, data: bytes | None = None) -> None:
        headers = {"Host": host, "Content-Type": "application/json"}
        request = urllib.request.Request(visit + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as e:
            e.read()

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(base + "/")
            page.wait_for_selector("#live.on", timeout=10000)
            rows = page.locator("#list li")
            send("/browser?x=1", b'{"from": "browser test"}')
            row = page.locator("#list li", has_text="/browser?x=1")
            row.first.wait_for(timeout=10000)
            row.first.click()
            page.wait_for_selector("#detail pre.body-json", timeout=10000)
            detailText = page.inner_text("#detail")
            page.click("#replay")
            page.locator("#list li", has_text="replay of").first.wait_for(timeout=10000)
            send("/missing")
            page.locator("#list li", has_text="/missing").first.wait_for(timeout=10000)
            page.locator("#list li span.s4", has_text="404").first.wait_for(timeout=10000)
            seen: dict[str, Any] = {"all": rows.count()}

            page.fill("#filter", "x=1")
            seen["text"] = rows.count()
            page.fill("#filter", "no-such-thing")
            seen["textNone"] = rows.count()
            page.fill("#filter", "")
            page.select_option("#statusFilter", "4")
            seen["4xx"] = rows.all_inner_texts()
            page.select_option("#statusFilter", "2")
            seen["2xx"] = rows.count()
            page.select_option("#statusFilter", "5")
            seen["5xx"] = rows.count()
            page.select_option("#statusFilter", "")
            page.select_option("#methodFilter", "POST")
            seen["POST"] = rows.count()
            page.select_option("#methodFilter", "GET")
            seen["GET"] = rows.all_inner_texts()
            page.select_option("#methodFilter", "")
            seen["reset"] = rows.count()

            page.locator("#list li", has_text="/browser?x=1").first.click()
            page.wait_for_selector("#detail pre.body-json", timeout=10000)
            page.click("#edit")
            page.wait_for_selector("#editor.open", timeout=10000)
            page.fill("#edTarget", "/edited?y=2")
            page.click("#sendEdited")
            page.locator("#list li", has_text="/edited?y=2").first.wait_for(timeout=10000)
            page.wait_for_selector("#detail h2:has-text('/edited?y=2')", timeout=10000)
            seen["edited"] = page.inner_text("#detail h2")
            seen["detail"] = detailText
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            return seen
        finally:
            browser.close()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_inspector_in_chromium(relay: Relay, agents: list[RunningAgent], counting: tuple[int, Counting]) -> None:
    """
    The inspector page in real headless Chromium: requests appear live,
    replay sends one again, the text, status class and method filters
    pick the right rows, and an edited replay reaches the origin with the
    new path.  Saves test-artifacts/inspector.png.
    """
    needBrowser("the inspector's browser test")
    port, origin = counting
    agent, base = await inspected(agents, relay, port, "browser")
    shot = ARTIFACTS / "inspector.png"
    if shot.exists():
        shot.unlink()
    seen = await inThread(_browse, base, f"http://127.0.0.1:{relay.port}", f"browser.localhost:{relay.port}", shot)
    assert '"from": "browser test"' in seen["detail"]
    # The POST, its replay and the 404 GET.
    assert seen["all"] == 3
    assert seen["text"] == 2 and seen["textNone"] == 0
    assert len(seen["4xx"]) == 1 and "/missing" in seen["4xx"][0] and "404" in seen["4xx"][0]
    assert seen["2xx"] == 2 and seen["5xx"] == 0
    assert seen["POST"] == 2
    assert len(seen["GET"]) == 1 and "/missing" in seen["GET"][0]
    assert seen["reset"] == 3
    assert "/edited?y=2" in seen["edited"]
    assert origin.hits[b"/browser"] == [b'{"from": "browser test"}'] * 2
    assert origin.hits[b"/edited"] == [b'{"from": "browser test"}']
    assert origin.hits[b"/missing"] == [b""]
    assert shot.stat().st_size > 10000


@pytest_twisted.ensureDeferred
async def test_default_port_taken_moves_on(relay: Relay, agents: list[RunningAgent], origin: int) -> None:
    """
    When the inspector's and the admin site's default ports are taken
    (another agent), the next free ones are used and logged; a port the
    user chose that is taken is an error logged, and the agent runs on.
    """
    from twisted.logger import globalLogPublisher

    from txtunnel.agent import tap as agentTap
    from txtunnel.agent.service import AgentService

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        options = agentTap.Options(environ={})
        options.parseOptions(["--relay", relay.url, "--http", str(origin)])
        agent = agentTap.buildAgent(options, reactor)
        service = AgentService(agent, admin=endpoint, adminDefaulted=True, inspect=endpoint, inspectDefaulted=True)
        agents.append(RunningAgent(agent, service))
        service.startService()
        await service.sitesReady
        assert service.inspectPort not in (None, port) and service.adminPort not in (None, port)
        assert service.inspectPort != service.adminPort
        second = agentTap.buildAgent(options, reactor)
        other = AgentService(second, inspect=endpoint)
        agents.append(RunningAgent(second, other))
        other.startService()
        await other.sitesReady
        assert other.inspectPort is None
    globalLogPublisher.removeObserver(events.append)
    texts = [e.get("log_format", "") for e in events]
    assert any("was taken; listening on" in t for t in texts)
    assert any("cannot start the" in t for t in texts)


def _watchers(port: int, count: int) -> bytes:
    """
    Open C{count} event streams, then one more; return what the last got.
    """
    held = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /api/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert b"200 OK" in s.recv(4096)
            held.append(s)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /api/events HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            return s.recv(4096)
    finally:
        for s in held:
            s.close()


@pytest_twisted.ensureDeferred
async def test_too_many_watchers_and_oversized_edits(
    relay: Relay, agents: list[RunningAgent], counting: tuple[int, Counting], tmp_path: Any
) -> None:
    from txtunnel.inspector import MAX_REPLAY_BODY, MAX_WATCHERS

    port, origin = counting
    agent, base = await inspected(agents, relay, port, "crowd")
    answer = await inThread(_watchers, agent.service.inspectPort, MAX_WATCHERS)
    assert answer.startswith(b"HTTP/1.1 503") and b"live views" in answer
    for _ in range(100):
        if not agent.agent.traffic.listeners:
            break
        await wait(0.02)
    assert agent.agent.traffic.listeners == []
    code, out, err = await curl("-H", f"Host: crowd.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/c")
    assert code == 0, err
    status, listing = await api(base + "/api/requests")
    big = tmp_path / "big.json"
    big.write_bytes(b'{"body": "' + b"x" * MAX_REPLAY_BODY + b'"}')
    status, body = await api(
        f"{base}/api/requests/{listing['requests'][0]['id']}/replay",
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        f"@{big}",
    )
    assert status == 413 and origin.hits == {b"/c": [b""]}
