"""
HTTPS and the wss:// link as a user runs them: twistd relay and agents as
subprocesses, curl as the visitor.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_contract import STOPPED_BY_SIGTERM, Proc, curl, env, freePort, procs, startRelay, twistd, webRoot

__all__ = ["env", "procs", "webRoot"]

pytestmark = pytest.mark.contract


def test_development_https_and_wss_agent(tmp_path: Path, procs: list[Proc], env: dict[str, str], webRoot: int) -> None:
    """
    twistd tunnelrelay --https with no certificate makes a development CA
    and says where; an agent that trusts it (--ca) links over wss:// and
    its tunnel is served over HTTPS to curl --cacert; an agent that does
    not trust it stops with the reason; --insecure links with a warning.
    """
    httpsPort = freePort()
    relay, port = startRelay(procs, env, tmp_path / "state", "--https", f"tcp:{httpsPort}:interface=127.0.0.1")
    relay.waitFor(f"relay listening on 127.0.0.1:{httpsPort} .*agents connect to wss://")
    caFile = relay.waitFor(r"development CA (\S+\.pem)").group(1)
    assert Path(caFile) == tmp_path / "state" / "tls" / "dev-ca-localhost.pem"
    wss = f"wss://localhost:{httpsPort}"

    agent = twistd(procs, env, "tunnelagent", "--relay", wss, "--ca", caFile, "--http", str(webRoot), "-s", "web")
    agent.waitFor(re.escape(f"tunnel ready: http://web.localhost:{port}/ -> 127.0.0.1:{webRoot}"))
    result = curl(
        "--cacert", caFile, "--resolve", f"web.localhost:{httpsPort}:127.0.0.1", f"https://web.localhost:{httpsPort}/"
    )
    assert result.stdout == b"hello through twistd\n", result.stderr
    result = curl("--resolve", f"web.localhost:{httpsPort}:127.0.0.1", f"https://web.localhost:{httpsPort}/")
    assert result.returncode == 60

    untrusting = twistd(procs, env, "tunnelagent", "--relay", wss, "--http", str(webRoot))
    untrusting.waitFor(r"cannot verify the relay wss://localhost:\d+: .*not a trusted CA.*--ca FILE")
    untrusting.popen.wait(20)  # it stops by itself
    assert "tunnel ready" not in untrusting.output

    insecure = twistd(procs, env, "tunnelagent", "--relay", wss, "--insecure", "--http", str(webRoot), "-s", "dev")
    insecure.waitFor(r"\*\*\* --insecure: the relay's TLS certificate is NOT verified")
    insecure.waitFor(re.escape(f"tunnel ready: http://dev.localhost:{port}/"))

    for p in (agent, insecure, relay):
        assert p.stop() in STOPPED_BY_SIGTERM
    assert "Traceback" not in relay.output + agent.output + untrusting.output + insecure.output


def test_agent_client_certificates(tmp_path: Path, procs: list[Proc], env: dict[str, str], webRoot: int) -> None:
    """
    twistd tunnelrelay with a private CA's certificate and --agent-ca lets
    in the twistd agent that has a client certificate from that CA and
    turns away, with the reason, the one that has none.
    """
    from tests.pki import CA

    relayCA, agentCA = CA(tmp_path, "relay"), CA(tmp_path, "agents")
    serverCert, _ = relayCA.server("server", "localhost", "*.tunnels.test")
    cert, key = agentCA.client("agent")
    httpsPort = freePort()
    relay, port = startRelay(
        procs, env, tmp_path / "state",
        "--https", f"tcp:{httpsPort}:interface=127.0.0.1", "--https-cert", str(serverCert),
        "--agent-ca", str(agentCA.path), "--domain", "tunnels.test",
    )  # fmt: skip
    relay.waitFor(r"HTTPS certificate for localhost, \*\.tunnels\.test")
    common = ["--relay", f"wss://localhost:{httpsPort}", "--ca", str(relayCA.path), "--http", str(webRoot)]
    agent = twistd(procs, env, "tunnelagent", *common, "-s", "web", "--cert", str(cert), "--key", str(key))
    agent.waitFor(re.escape(f"tunnel ready: http://web.tunnels.test:{port}/"))
    stranger = twistd(procs, env, "tunnelagent", *common)
    stranger.waitFor("relay refused this agent: this relay requires agents to connect over wss:// with a client")
    stranger.popen.wait(20)
    for p in (agent, relay):
        assert p.stop() in STOPPED_BY_SIGTERM
    assert "Traceback" not in relay.output + agent.output + stranger.output
