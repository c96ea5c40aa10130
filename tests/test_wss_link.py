"""
The agent's link over wss://: the relay's certificate and host name are
verified (against --ca for a private CA), a failure stops the agent with
the reason, and --insecure skips the check with a loud warning -- against
a real relay on its HTTPS listener.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.python import usage

from tests.conftest import Relay, RunningAgent, curl, startAgent, startRelay
from tests.pki import CA
from txtunnel.agent import tap as agentTap


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path, "private")


@pytest.fixture
def logged() -> Any:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


async def _httpsRelay(tmp_path: Path, cert: Path | None, *args: str) -> Relay:
    more = ["--https-cert", str(cert)] if cert is not None else []
    return await startRelay(str(tmp_path / "state"), "--https", "tcp:0:interface=127.0.0.1", *more, *args)


def _wss(relay: Relay, host: str = "localhost") -> str:
    return f"wss://{host}:{relay.relay.httpsPort}"


async def _refusal(agent: RunningAgent) -> str:
    try:
        await agent.agent.ready
    except RuntimeError as e:
        return str(e)
    raise AssertionError("the agent connected")


@pytest_twisted.ensureDeferred
async def test_verified_with_ca(tmp_path: Path, ca: CA, agents: list[RunningAgent], origin: int) -> None:
    """
    With --ca naming the relay's private CA the link comes up and the
    tunnel works; by host name and by IP address (when the certificate
    names it).
    """
    cert, _ = ca.server("relay", "localhost", "*.example.test")
    relay = await _httpsRelay(tmp_path, cert)
    try:
        agent = await startAgent(
            agents, relay, "--relay", _wss(relay), "--ca", str(ca.path), "--http", str(origin), "--subdomain", "safe"
        )
        assert agent.address().startswith("http://safe.localhost:")
        code, out, err = await curl(
            "--resolve", f"safe.localhost:{relay.port}:127.0.0.1", f"http://safe.localhost:{relay.port}/hello"
        )
        assert code == 0 and b"hello from origin" in out, err
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_refused_without_ca(tmp_path: Path, ca: CA, agents: list[RunningAgent], origin: int, logged: Any) -> None:
    """
    Without --ca a private CA's certificate is refused: the agent stops
    and says why, instead of retrying in silence.
    """
    cert, _ = ca.server("relay", "localhost")
    relay = await _httpsRelay(tmp_path, cert)
    try:
        agent = await startAgent(agents, relay, "--relay", _wss(relay), "--http", str(origin), expectReady=False)
        reason = await _refusal(agent)
        assert "cannot verify the relay wss://localhost" in reason
        assert "issuer is not a trusted CA" in reason and "--ca FILE" in reason
        assert not agent.service.client.running
        assert any(e.get("reason") == reason and e["log_level"].name == "critical" for e in logged)
        assert not relay.relay.sessions
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_refused_for_wrong_host_name(tmp_path: Path, ca: CA, agents: list[RunningAgent], origin: int) -> None:
    """
    A certificate from the trusted CA but for another host is refused.
    """
    cert, _ = ca.server("relay", "relay.example.test")
    relay = await _httpsRelay(tmp_path, cert)
    try:
        agent = await startAgent(
            agents, relay, "--relay", _wss(relay), "--ca", str(ca.path), "--http", str(origin), expectReady=False
        )
        reason = await _refusal(agent)
        assert "its certificate is not for 'localhost'" in reason
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_insecure_allowed_with_warning(
    tmp_path: Path, ca: CA, agents: list[RunningAgent], origin: int, logged: Any
) -> None:
    """
    --insecure connects to a relay whose certificate it cannot verify (a
    wrong name, an unknown CA), and warns loudly.
    """
    cert, _ = ca.server("relay", "relay.example.test")
    relay = await _httpsRelay(tmp_path, cert)
    try:
        agent = await startAgent(agents, relay, "--relay", _wss(relay), "--insecure", "--http", str(origin))
        assert agent.address()
        warnings = [e for e in logged if "--insecure" in e.get("log_format", "")]
        assert warnings and warnings[0]["log_level"].name == "warn"
        assert "NOT verified" in warnings[0]["log_format"]
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_development_ca_trusted_with_ca(tmp_path: Path, agents: list[RunningAgent], origin: int) -> None:
    """
    A development relay (--https, no certificate) is reached with the CA
    file it names in its log, by host name and by 127.0.0.1.
    """
    relay = await _httpsRelay(tmp_path, None)
    devCA = os.path.join(str(tmp_path / "state"), "tls", "dev-ca-localhost.pem")
    try:
        for host in ("localhost", "127.0.0.1"):
            agent = await startAgent(
                agents, relay, "--relay", _wss(relay, host), "--ca", devCA, "--http", str(origin), "--subdomain", "d"
            )
            assert agent.address()
            await agent.stop()
    finally:
        await defer.maybeDeferred(relay.service.stopService)


def test_verification_failure_after_a_link_is_retried(logged: Any) -> None:
    """
    Once the agent has had a link, a certificate that fails verification
    (a relay renewing it, say) is logged with the reason and retried, not
    fatal.
    """
    from OpenSSL import SSL
    from twisted.internet import reactor
    from twisted.python.failure import Failure

    from txtunnel.agent.service import Agent, AgentService

    agent = Agent(reactor, "wss://relay.test", None, [])
    service = AgentService(agent)
    agent.ready.callback([])
    service._connectFailed(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
    assert agent.failure is None
    errors = [e for e in logged if e["log_level"].name == "error"]
    assert "cannot verify the relay wss://relay.test: certificate verify failed" in errors[-1]["message"]
    # Other failures (a refused connection, a reset) are not TLS's to report.
    service._connectFailed(Failure(ConnectionResetError()))
    assert len([e for e in logged if e["log_level"].name == "error"]) == len(errors)


def test_tls_option_errors(tmp_path: Path, ca: CA) -> None:
    """
    TLS options that would do nothing or contradict each other, and files
    that cannot be used, are usage errors.
    """
    client, key = ca.client("agent")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("nope")
    for args, message in [
        (["--relay", "ws://localhost:8080", "--ca", str(ca.path)], "apply to a wss:// relay"),
        (["--relay", "ws://localhost:8080", "--insecure"], "apply to a wss:// relay"),
        (["--relay", "wss://r.test", "--ca", str(ca.path), "--insecure"], "give only one"),
        (["--relay", "wss://r.test", "--ca", str(garbage)], "holds no PEM certificate"),
        (["--relay", "wss://r.test", "--ca", str(tmp_path / "missing.pem")], "is not a file"),
        (["--relay", "wss://r.test", "--key", str(key)], "--key needs --cert"),
        (["--relay", "wss://r.test", "--cert", str(client)], "no unencrypted PEM private key"),
    ]:
        with pytest.raises(usage.UsageError, match=message):
            agentTap.Options(environ={}).parseOptions([*args, "--http", "80"])
    options = agentTap.Options(environ={"TXTUNNEL_INSECURE": "yes"})
    options.parseOptions(["--relay", "wss://r.test", "--http", "80"])
    assert options["link-tls"].insecure
    options = agentTap.Options(environ={})
    options.parseOptions(["--relay", "wss://r.test", "--http", "80", "--cert", str(client), "--key", str(key)])
    assert options["link-tls"] is not None and not options["link-tls"].insecure
