"""
Client certificates: a relay with --agent-ca lets in only agents with a
certificate from that CA; a tunnel bound with --client-ca lets through only
visitors with a certificate from its CA (the ClientCertificateGate), on a
real relay, with curl as the visitor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.python import usage

from tests.conftest import Relay, RunningAgent, curl, startAgent, startRelay
from tests.pki import CA
from txtunnel.agent import tap as agentTap
from txtunnel.errors import BindError
from txtunnel.mtls import ClientCertificateGate
from txtunnel.relay import tap as relayTap

DOMAIN = "tunnels.test"


class PKI:
    def __init__(self, directory: Path) -> None:
        self.relayCA = CA(directory, "relay")
        self.serverCert, _ = self.relayCA.server("server", f"*.{DOMAIN}", DOMAIN, "localhost")
        self.agentCA = CA(directory, "agents")
        self.visitorCA = CA(directory, "visitors")
        self.otherCA = CA(directory, "other")
        self.agentCert = self.agentCA.client("agent")
        self.visitorCert = self.visitorCA.client("visitor", "alice")
        self.strangerCert = self.otherCA.client("stranger", "mallory")


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path)


async def _relay(tmp_path: Path, pki: PKI, *args: str) -> Relay:
    return await startRelay(
        str(tmp_path / "state"),
        "--domain",
        DOMAIN,
        "--https",
        "tcp:0:interface=127.0.0.1",
        "--https-cert",
        str(pki.serverCert),
        *args,
    )


async def _refusal(agent: RunningAgent) -> str:
    try:
        await agent.agent.ready
    except RuntimeError as e:
        return str(e)
    raise AssertionError("the agent connected")


@pytest_twisted.ensureDeferred
async def test_agent_ca(tmp_path: Path, pki: PKI, agents: list[RunningAgent], origin: int) -> None:
    """
    With --agent-ca only an agent presenting a certificate from that CA
    gets a link; no certificate, one from another CA, or a plain ws://
    link is refused with the reason, and the agent stops.
    """
    relay = await _relay(tmp_path, pki, "--agent-ca", str(pki.agentCA.path))
    wss = f"wss://localhost:{relay.relay.httpsPort}"
    common = ["--ca", str(pki.relayCA.path), "--http", str(origin)]
    try:
        cert, key = pki.agentCert
        agent = await startAgent(agents, relay, "--relay", wss, *common, "--cert", str(cert), "--key", str(key))
        assert agent.address()
        await agent.stop()
        agent = await startAgent(
            agents, relay, "--relay", wss, "--insecure", "--http", str(origin), "--cert", str(cert), "--key", str(key)
        )
        assert agent.address()
        await agent.stop()
        stranger, strangerKey = pki.strangerCert
        for args in (
            ["--relay", wss, *common],
            ["--relay", wss, *common, "--cert", str(stranger), "--key", str(strangerKey)],
        ):
            agent = await startAgent(agents, relay, *args, expectReady=False)
            reason = await _refusal(agent)
            assert "requires agents to connect over wss:// with a client certificate" in reason
        agent = await startAgent(agents, relay, "--http", str(origin), expectReady=False)
        assert "client certificate" in await _refusal(agent)
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_visitor_client_ca(tmp_path: Path, pki: PKI, agents: list[RunningAgent], origin: int) -> None:
    """
    A tunnel bound with --client-ca answers only visitors presenting a
    certificate from its CA (403 otherwise, with the reason); a tunnel
    beside it without one is open, and its visitors are not asked for a
    certificate.
    """
    relay = await _relay(tmp_path, pki)
    try:
        await startAgent(
            agents, relay, "--http", str(origin), "--subdomain", "locked", "--client-ca", str(pki.visitorCA.path)
        )
        await startAgent(agents, relay, "--http", str(origin), "--subdomain", "open")
        port = relay.relay.httpsPort
        assert relay.relay.wantsClientCertificate(f"locked.{DOMAIN}")
        assert not relay.relay.wantsClientCertificate(f"open.{DOMAIN}")
        assert not relay.relay.wantsClientCertificate(None)

        async def get(name: str, *args: str, host: str | None = None) -> tuple[int, bytes]:
            url = f"https://{name}.{DOMAIN}:{port}/hello"
            extra = ["-H", f"Host: {host}.{DOMAIN}:{port}"] if host else []
            code, out, err = await curl(
                "--cacert", str(pki.relayCA.path), "--resolve", f"{name}.{DOMAIN}:{port}:127.0.0.1",
                "-o", "-", "-w", "\n%{http_code}", *extra, *args, url,
            )  # fmt: skip
            assert code == 0, err
            body, _, status = out.rpartition(b"\n")
            return int(status), body

        visitor, visitorKey = pki.visitorCert
        stranger, strangerKey = pki.strangerCert
        status, body = await get("locked", "--cert", str(visitor), "--key", str(visitorKey))
        assert status == 200 and b"hello from origin" in body
        status, body = await get("locked")
        assert status == 403 and b"none was presented" in body
        status, body = await get("locked", "--cert", str(stranger), "--key", str(strangerKey))
        assert status == 403 and b"not from this tunnel's CA" in body
        status, body = await get("open")
        assert status == 200 and b"hello from origin" in body
        # SNI of the open tunnel (no certificate asked for), Host of the
        # locked one: refused, whatever certificate the client holds.
        status, body = await get("open", "--cert", str(visitor), "--key", str(visitorKey), host="locked")
        assert status == 403
        # Plain HTTP cannot carry a client certificate.
        code, out, err = await curl(
            "-o", "-", "-w", "\n%{http_code}", "--resolve", f"locked.{DOMAIN}:{relay.port}:127.0.0.1",
            f"http://locked.{DOMAIN}:{relay.port}/hello",
        )  # fmt: skip
        assert out.endswith(b"403") and b"use https://" in out
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_bind_with_a_non_ca_refused(tmp_path: Path, pki: PKI, agents: list[RunningAgent], origin: int) -> None:
    """
    A --client-ca file that holds a leaf certificate, not a CA, is refused
    at bind with the reason: it never becomes an open (or a dead) tunnel.
    """
    relay = await _relay(tmp_path, pki)
    try:
        leaf, _ = pki.visitorCert
        agent = await startAgent(agents, relay, "--http", str(origin), "--client-ca", str(leaf), expectReady=False)
        reason = await _refusal(agent)
        assert "not a CA" in reason
        assert not relay.relay.hosts._names
    finally:
        await defer.maybeDeferred(relay.service.stopService)


def test_gate_validate(pki: PKI) -> None:
    """
    Each kind of bad client-ca in a bind request is refused with a reason.
    """
    gate = ClientCertificateGate()
    good = pki.visitorCA.path.read_text()
    gate.validate({"type": "http", "client-ca": good})
    gate.validate({"type": "http"})
    for request, message in [
        ({"type": "tcp", "client-ca": good}, "http tunnels only"),
        ({"type": "http", "client-ca": 42}, "must be PEM text"),
        ({"type": "http", "client-ca": ""}, "must be PEM text"),
        ({"type": "http", "client-ca": "garbage"}, "no PEM certificate"),
        ({"type": "http", "client-ca": good * 200}, "larger than"),
        ({"type": "http", "client-ca": pki.visitorCert[0].read_text()}, "not a CA"),
    ]:
        with pytest.raises(BindError, match=message):
            gate.validate(request)


def test_options(tmp_path: Path, pki: PKI) -> None:
    """
    --agent-ca needs --https; --client-ca is for HTTP tunnels and sends
    only certificates, never a key that shares the file.
    """
    with pytest.raises(usage.UsageError, match="--agent-ca needs --https"):
        relayTap.Options(environ={}).parseOptions(["--agent-ca", str(pki.agentCA.path)])
    options = relayTap.Options(environ={})
    options.parseOptions(["--https", "tcp:0", "--https-cert", str(pki.serverCert), "--agent-ca", str(pki.agentCA.path)])
    assert len(options["agent-cas"]) == 1
    with pytest.raises(usage.UsageError, match="--client-ca applies to --http"):
        agentTap.Options(environ={}).parseOptions(["--tcp", "22", "--client-ca", str(pki.visitorCA.path)])
    ini = tmp_path / "agent.ini"
    ini.write_text(f"[tunnel:ssh]\ntype = tcp\ntarget = 22\nclient-ca = {pki.visitorCA.path}\n")
    with pytest.raises(usage.UsageError, match="client-ca: only tunnels of type = http"):
        agentTap.Options(environ={}).parseOptions(["--config", str(ini)])
    mixed = tmp_path / "mixed.pem"
    mixed.write_bytes(pki.agentCert[1].read_bytes() + pki.visitorCA.path.read_bytes())
    ini.write_text(f"[tunnel:web]\ntype = http\ntarget = 8000\nclient-ca = {mixed}\n")
    options = agentTap.Options(environ={})
    options.parseOptions(["--config", str(ini)])
    pem = options.tunnels[0]["options"]["client-ca"]
    assert pem == pki.visitorCA.path.read_text()
    assert "PRIVATE KEY" not in pem


def test_chains_to(tmp_path: Path, pki: PKI) -> None:
    """
    A client certificate chains to its CA directly or through an
    intermediate the client sends; not when expired, not without the
    intermediate, not to another CA, not a certificate for servers only.
    """
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from txtunnel.certificates import chainsTo

    ca = pki.visitorCA
    _, leaf = ca._issue("alice", [], ExtendedKeyUsageOID.CLIENT_AUTH)
    assert chainsTo(leaf, [], [ca.cert])
    assert not chainsTo(leaf, [], [pki.otherCA.cert])
    assert not chainsTo(None, [], [ca.cert])
    _, expired = ca._issue("old", [], ExtendedKeyUsageOID.CLIENT_AUTH, expired=True)
    assert not chainsTo(expired, [], [ca.cert])
    _, server = ca._issue("www.example.test", ["www.example.test"], ExtendedKeyUsageOID.SERVER_AUTH)
    assert not chainsTo(server, [], [ca.cert])
    middle = CA(tmp_path, "middle", parent=ca)
    _, deep = middle._issue("bob", [], ExtendedKeyUsageOID.CLIENT_AUTH)
    assert chainsTo(deep, [middle.cert], [ca.cert])
    assert not chainsTo(deep, [], [ca.cert])


def test_session_refuses_agent_without_certificate(pki: PKI) -> None:
    """
    Unit: the relay's hello check refuses a link whose carrier has no TLS
    transport when agent CAs are configured.
    """
    from txtunnel.mtls import agentAllowed

    assert not agentAllowed(None, [pki.agentCA.cert])
    assert not agentAllowed(object(), [pki.agentCA.cert])
