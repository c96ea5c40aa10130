"""
The access log (one structured event per request at the relay's edge),
the JSON and text log formats, and the -v/-q/--log-format options.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python import usage

from tests.conftest import Relay, RunningAgent, curl, inThread, startAgent
from tests.test_http_tunnel import rawExchange
from txtunnel import cli
from txtunnel.access import ACCESS_NAMESPACE
from txtunnel.logs import eventAsJSON, eventAsText, observer


def collected(side: str) -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def collect(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == ACCESS_NAMESPACE and event.get("access") == side:
            events.append(event)

    globalLogPublisher.addObserver(collect)
    yield events
    globalLogPublisher.removeObserver(collect)


@pytest.fixture
def accessEvents() -> Iterator[list[dict[str, Any]]]:
    """
    The relay's access events.
    """
    yield from collected("relay")


@pytest.fixture
def agentAccessEvents() -> Iterator[list[dict[str, Any]]]:
    yield from collected("agent")


@pytest_twisted.ensureDeferred
async def test_access_events(
    relay: Relay,
    agents: list[RunningAgent],
    origin: int,
    accessEvents: list[dict[str, Any]],
    agentAccessEvents: list[dict[str, Any]],
) -> None:
    """
    Each request through a tunnel, and each answer the relay gives itself,
    is one event with the tunnel, client, method, path (no query), status,
    bytes each way and duration.
    """
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "logged")
    host = f"logged.localhost:{relay.port}"
    code, out, err = await curl("-H", f"Host: {host}", f"http://127.0.0.1:{relay.port}/hello?secret=xyz")
    assert code == 0, err
    code, out, err = await curl("-H", f"Host: {host}", "-d", "a" * 5000, f"http://127.0.0.1:{relay.port}/echo")
    assert code == 0 and len(out) == 5000, err
    code, out, err = await curl("-H", f"Host: other.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/x")
    assert code == 0
    answer = await inThread(rawExchange, relay.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 414")
    agentSide = [(e["path"], e["status"], e["tunnel"], e["client_ip"]) for e in agentAccessEvents]
    assert agentSide == [("/hello", 200, "logged", "127.0.0.1"), ("/echo", 200, "logged", "127.0.0.1")]
    assert agentAccessEvents[1]["bytes_in"] == 5000 and agentAccessEvents[1]["bytes_out"] == 5000
    byPath = {e["path"]: e for e in accessEvents}
    get = byPath["/hello"]
    assert get["tunnel"] == "logged" and get["method"] == "GET" and get["status"] == 200
    assert get["client_ip"] == "127.0.0.1" and get["host"] == host
    assert get["bytes_in"] > 50 and get["bytes_out"] > 100 and get["duration"] >= 0
    assert "secret" not in json.dumps([eventAsJSON(e) for e in accessEvents])
    post = byPath["/echo"]
    assert post["method"] == "POST" and post["bytes_in"] > 5000 and post["bytes_out"] > 5000
    missing = byPath["/x"]
    assert missing["tunnel"] == "-" and missing["status"] == 404
    assert any(e["status"] == 414 and e["method"] == "-" for e in accessEvents)


@pytest_twisted.ensureDeferred
async def test_local_service_down_logged_502(
    relay: Relay, agents: list[RunningAgent], accessEvents: list[dict[str, Any]]
) -> None:
    from tests.conftest import closedPort

    await startAgent(agents, relay, "--http", str(closedPort()), "--subdomain", "down")
    code, out, err = await curl("-H", f"Host: down.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/")
    assert code == 0 and b"refused" in out
    assert [(e["tunnel"], e["status"]) for e in accessEvents] == [("down", 502)]


def test_json_and_text_lines() -> None:
    """
    One JSON object per line with the event's fields; bytes and odd values
    become strings; failures carry their traceback.
    """
    out = io.StringIO()
    # A reactor that is not running: lines are written at once (see test_log_batching).
    obs = observer(out, "json", LogLevel.info, reactor=Clock())
    obs(
        {
            "log_format": "{client_ip} {status}",
            "log_level": LogLevel.info,
            "log_namespace": ACCESS_NAMESPACE,
            "log_time": 0.0,
            "client_ip": "10.0.0.1",
            "status": 200,
            "raw": b"\xff",
            "thing": object(),
        }
    )
    obs({"log_format": "hidden", "log_level": LogLevel.debug, "log_namespace": "x", "log_time": 0.0})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["message"] == "10.0.0.1 200"
    assert record["time"] == "1970-01-01T00:00:00.000Z"
    assert record["level"] == "info" and record["namespace"] == ACCESS_NAMESPACE
    assert record["status"] == 200 and record["raw"] == "\ufffd" and record["thing"].startswith("<object")
    text = eventAsText({"log_format": "oops {x}", "x": 1, "log_level": LogLevel.warn, "log_time": 0.0})
    assert text is not None and text.endswith("warning: oops 1\n")
    with pytest.raises(ValueError, match="text, json"):
        observer(out, "xml")


@pytest.mark.parametrize(
    "argv, level, format",
    [
        (["http", "8000"], LogLevel.info, "text"),
        (["-v", "http", "8000"], LogLevel.debug, "text"),
        (["http", "8000", "-q", "--log-format", "json"], LogLevel.warn, "json"),
        (["--log-format", "json", "relay"], LogLevel.info, "json"),
        (["relay", "-v"], LogLevel.debug, "text"),
        (["demo", "--log-format", "json", "-q"], LogLevel.warn, "json"),
    ],
)
def test_log_options(argv: list[str], level: LogLevel, format: str) -> None:
    options = cli.Options()
    options.parseOptions(argv)
    assert cli.logSettings(options) == (level, format)


def test_bad_log_format() -> None:
    with pytest.raises(usage.UsageError, match="--log-format"):
        cli.Options().parseOptions(["--log-format", "xml", "relay"])


@pytest_twisted.ensureDeferred
async def test_tcp_connection_logged(
    relay: Relay, agents: list[RunningAgent], echoServer: int, accessEvents: list[dict[str, Any]]
) -> None:
    """
    A TCP tunnel's connection is one access event when it ends, with its
    bytes each way.
    """
    from tests.conftest import wait
    from tests.test_tcp_tunnel import echoThrough, portOf

    agent = await startAgent(agents, relay, "--tcp", str(echoServer))
    assert await inThread(echoThrough, portOf(agent), b"z" * 3000) == b"z" * 3000
    for _ in range(100):
        if accessEvents:
            break
        await wait(0.02)
    [event] = accessEvents
    assert event["protocol"] == "tcp" and event["address"] == agent.address()
    # Named like HTTP events: by the relay's name for the tunnel, its port.
    assert event["tunnel"] == str(portOf(agent)) and event["access"] == "relay"
    assert formatEvent(event).endswith(f"[{portOf(agent)}]")
    assert event["client_ip"] == "127.0.0.1" and event["bytes_in"] == 3000 and event["bytes_out"] == 3000


@pytest_twisted.ensureDeferred
async def test_close_delimited_response_logged(
    relay: Relay, agents: list[RunningAgent], accessEvents: list[dict[str, Any]]
) -> None:
    """
    A response that only the server's close ends is logged with its status.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.protocol import Factory, Protocol

    class OldServer(Protocol):
        def dataReceived(self, data: bytes) -> None:
            if b"\r\n\r\n" in data:
                self.transport.write(b"HTTP/1.0 203 Old\r\n\r\nuntil close")  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(OldServer))
    try:
        await startAgent(agents, relay, "--http", str(port.getHost().port), "--subdomain", "old")
        code, out, err = await curl("-H", f"Host: old.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/")
        assert code == 0 and out == b"until close", err
    finally:
        await port.stopListening()
    assert [(e["tunnel"], e["status"]) for e in accessEvents] == [("old", 203)]


@pytest_twisted.ensureDeferred
async def test_gate_answer_logged_with_its_tunnel(
    relay: Relay, agents: list[RunningAgent], origin: int, accessEvents: list[dict[str, Any]]
) -> None:
    """
    An answer a visitor gate gives (a policy refusal) is logged and counted
    under the tunnel it was for.
    """
    from txtunnel.http1 import Answer

    class Refuse:
        def check(self, request: Any) -> Answer:
            return Answer(403, "no")

        def validate(self, bindRequest: dict[str, Any]) -> None:
            pass

    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "guarded")
    relay.relay.gates[:] = [Refuse()]
    code, out, err = await curl("-H", f"Host: guarded.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/a")
    assert code == 0, err
    assert [(e["tunnel"], e["status"], e["path"]) for e in accessEvents] == [("guarded", 403, "/a")]
    text = relay.relay.metrics.render().decode()
    assert 'txtunnel_relay_requests_total{method="GET",status_class="4xx",tunnel="guarded"} 1.0' in text


def test_agent_access_log_switch() -> None:
    from txtunnel.agent import tap as agentTap

    def parsed(args: list[str], environ: dict[str, str] | None = None) -> Any:
        options = agentTap.Options(environ=environ or {})
        options.parseOptions(["--http", "8000", *args])
        return options["access-log"]

    assert parsed([]) is True
    assert parsed(["--no-access-log"]) is False
    assert parsed([], {"TXTUNNEL_ACCESS_LOG": "no"}) is False
    with pytest.raises(usage.UsageError, match="TXTUNNEL_ACCESS_LOG: 'maybe' is not true or false"):
        parsed([], {"TXTUNNEL_ACCESS_LOG": "maybe"})


@pytest_twisted.ensureDeferred
async def test_relay_access_log_off(
    tmp_path: Any, agents: list[RunningAgent], origin: int, accessEvents: list[dict[str, Any]]
) -> None:
    """
    --no-access-log silences the relay's lines; the metrics still count.
    """
    from tests.conftest import startRelay

    quiet = await startRelay(str(tmp_path / "quiet"), "--no-access-log")
    try:
        await startAgent(agents, quiet, "--http", str(origin), "--subdomain", "hush", "--no-access-log")
        code, out, err = await curl("-H", f"Host: hush.localhost:{quiet.port}", f"http://127.0.0.1:{quiet.port}/")
        assert code == 0, err
        assert accessEvents == []
        assert 'tunnel="hush"} 1.0' in quiet.relay.metrics.render().decode()
    finally:
        await quiet.service.stopService()


@pytest_twisted.ensureDeferred
async def test_http2_requests_logged(
    relay: Relay, agents: list[RunningAgent], origin: int, accessEvents: list[dict[str, Any]]
) -> None:
    """
    Requests over HTTP/2 (curl --http2-prior-knowledge) are logged and
    counted like HTTP/1.1 ones, relay answers included.
    """
    await startAgent(agents, relay, "--http", str(origin), "--subdomain", "two")
    host = f"two.localhost:{relay.port}"
    resolve = ["--http2-prior-knowledge", "--resolve", f"{host}:127.0.0.1"]
    code, out, err = await curl(*resolve, "-d", "b" * 3000, f"http://{host}/echo?q=secret")
    assert code == 0 and out == b"b" * 3000, err
    other = f"none.localhost:{relay.port}"
    code, out, err = await curl("--http2-prior-knowledge", "--resolve", f"{other}:127.0.0.1", f"http://{other}/x")
    assert code == 0, err
    seen = [(e["tunnel"], e["method"], e["path"], e["status"], e["http"]) for e in accessEvents]
    assert seen == [("two", "POST", "/echo", 200, "2"), ("-", "GET", "/x", 404, "2")]
    assert accessEvents[0]["bytes_in"] == 3000 and accessEvents[0]["bytes_out"] == 3000
    text = relay.relay.metrics.render().decode()
    assert 'txtunnel_relay_requests_total{method="POST",status_class="2xx",tunnel="two"} 1.0' in text
