"""
docs/sharing.rst as a user runs it: the local test provider, twistd relay
and agent, curl with a cookie jar as the browser, SIGHUP to change the
allow-list, and C{txtunnel login}/C{whoami}/C{logout} as subprocesses.
"""

from __future__ import annotations

import html
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_contract import Proc, env, freePort, procs, tool, twistd, webRoot  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.contract, pytest.mark.slow]


def browser(jar: Path, url: str, choose: str | None = None) -> str:
    """
    Visit C{url} following redirects with a cookie jar; on the test
    provider's account page follow the link for C{choose}.  The final body.
    """
    args = ["curl", "-sS", "-L", "--max-time", "20", "-c", str(jar), "-b", str(jar)]
    body = subprocess.run([*args, url], capture_output=True, timeout=30, check=True).stdout.decode()
    if choose is not None and "Test provider" in body:
        link = re.search(r'href="(\?[^"]*login_as=' + re.escape(choose) + ')"', body)
        assert link, body
        provider = re.search(r"(http://127\.0\.0\.1:\d+)", Path(str(jar) + ".provider").read_text()).group(1)
        body = subprocess.run(
            [*args, provider + "/authorize" + html.unescape(link.group(1))], capture_output=True, timeout=30, check=True
        ).stdout.decode()
    return body


def test_walkthrough(tmp_path: Path, procs: list[Proc], env: dict[str, str], webRoot: int) -> None:  # noqa: F811
    relayPort, providerPort = freePort(), freePort()
    provider = Proc(
        [
            sys.executable,
            "-m",
            "txtunnel.testing.oidc",
            "--port",
            str(providerPort),
            "--email",
            "alice@example.com",
            "--email",
            "bob@example.com",
            "--email",
            "eve@example.com",
            "--redirect-uri",
            f"http://localhost:{relayPort}/_txtunnel/callback",
        ],
        env,
    )
    procs.append(provider)
    provider.waitFor("OpenID Connect test provider at")
    (tmp_path / "relay.ini").write_text(
        f"[relay]\nhttp = tcp:{relayPort}:interface=127.0.0.1\nstate-dir = {tmp_path / 'state'}\n\n"
        f"[provider:local]\nissuer = http://127.0.0.1:{providerPort}\nclient-id = relay\n"
        "client-secret = relay-secret\n"
    )
    relay = twistd(procs, env, "tunnelrelay", "--config", str(tmp_path / "relay.ini"))
    relay.waitFor(re.escape(f"callback http://localhost:{relayPort}/_txtunnel/callback"))
    agentIni = tmp_path / "agent.ini"
    agentIni.write_text(
        f"[agent]\nrelay = ws://localhost:{relayPort}\n\n[tunnel:web]\ntype = http\ntarget = {webRoot}\n"
        "subdomain = web\nallow = alice@example.com, bob@example.com\n"
    )
    agent = twistd(procs, env, "tunnelagent", "--config", str(agentIni))
    agent.waitFor("tunnel ready: http://web.localhost")
    url = f"http://web.localhost:{relayPort}/"

    def visit(name: str, who: str) -> str:
        jar = tmp_path / name
        Path(str(jar) + ".provider").write_text(f"http://127.0.0.1:{providerPort}")
        return browser(jar, url, who)

    assert visit("alice", "alice@example.com") == "hello through twistd\n"
    assert visit("bob", "bob@example.com") == "hello through twistd\n"
    denied = visit("eve", "eve@example.com")
    assert "Access denied" in denied and "eve@example.com" in denied and "/_txtunnel/logout" in denied

    # Share with Eve too, without a new URL.
    agentIni.write_text(agentIni.read_text().replace("bob@example.com", "bob@example.com, eve@example.com"))
    agent.popen.send_signal(signal.SIGHUP)
    agent.waitFor("allow-list updated on the relay")
    assert browser(tmp_path / "eve", url) == "hello through twistd\n"

    # The command-line login.
    config = tmp_path / "config"
    loginEnv = dict(env, XDG_CONFIG_HOME=str(config))
    relayURL = f"ws://localhost:{relayPort}"
    login = Proc([tool("txtunnel"), "login", "--relay", relayURL, "--no-browser"], loginEnv)
    procs.append(login)
    page = login.waitFor(r"open (http://\S+device\?code=\S+)").group(1)
    jar = tmp_path / "cli"
    Path(str(jar) + ".provider").write_text(f"http://127.0.0.1:{providerPort}")
    approval = browser(jar, page, "alice@example.com")
    approve = re.search(r'href="([^"]*/approve\?[^"]*)"', approval)
    assert approve, approval
    assert "Approved" in browser(jar, html.unescape(approve.group(1)))
    login.waitFor("logged in to .* as alice@example.com")
    assert login.popen.wait(20) == 0
    tokens = config / "txtunnel" / "tokens.json"
    assert stat.S_IMODE(os.stat(tokens).st_mode) == 0o600
    whoami = subprocess.run(
        [tool("txtunnel"), "whoami", "--relay", relayURL], env=loginEnv, capture_output=True, timeout=30
    )
    assert whoami.returncode == 0 and whoami.stdout.decode().startswith("alice@example.com on "), whoami
    logout = subprocess.run(
        [tool("txtunnel"), "logout", "--relay", relayURL], env=loginEnv, capture_output=True, timeout=30
    )
    assert logout.returncode == 0 and b"logged out" in logout.stdout
    whoami = subprocess.run(
        [tool("txtunnel"), "whoami", "--relay", relayURL], env=loginEnv, capture_output=True, timeout=30
    )
    assert whoami.returncode == 1 and b"not logged in" in whoami.stdout
    assert "Traceback" not in relay.output + agent.output
