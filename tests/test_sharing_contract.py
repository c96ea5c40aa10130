"""
docs/sharing.rst as a user runs it: the local test provider, C{txtunnel
relay} and C{txtunnel http --allow}, curl with a cookie jar as the browser,
C{txtunnel share} and SIGHUP to change the allow-list, and C{txtunnel
login}/C{whoami}/C{logout} as subprocesses.
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

from tests.test_contract import Proc, env, freePort, procs, tool, twistd  # noqa: F401  (fixtures)

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


def test_walkthrough(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> None:  # noqa: F811
    """
    docs/sharing.rst's commands, in its order, with its files: the walk-through
    (provider, C{txtunnel relay --config relay.ini}, C{python3 -m http.server},
    C{txtunnel http --allow}, visits by Alice, Bob and Eve, Eve switching
    accounts), then the reference sections it points to: C{txtunnel login},
    C{txtunnel share}, a config-file tunnel reloaded with SIGHUP,
    C{txtunnel whoami} and C{txtunnel logout}.  Only the ports differ: the
    relay takes the next free one after 8080 when that is taken, as the page
    says, and the others are free ones.
    """
    work = tmp_path / "work"
    work.mkdir()
    # 2. relay.ini as on the page; the relay says which port it took.
    providerPort = freePort()
    (work / "relay.ini").write_text(
        "[relay]\nstate-dir = ./relay-state\n\n[provider:local]\n"
        f"issuer = http://127.0.0.1:{providerPort}\nclient-id = relay\nclient-secret = relay-secret\n"
        "label = the local test provider\n"
    )
    relay = Proc([tool("txtunnel"), "relay", "--config", "relay.ini"], env, cwd=str(work))
    procs.append(relay)
    callback = relay.waitFor(r"visitor login with local; callback (http://localhost:(\d+)/_txtunnel/callback)")
    relayPort = int(callback.group(2))
    relay.waitFor(re.escape(f"relay listening on 127.0.0.1:{relayPort} for localhost"))
    relayURL = f"ws://localhost:{relayPort}"
    # 1. The provider, with the relay's callback URL.
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
            "--client-id",
            "relay",
            "--client-secret",
            "relay-secret",
            "--redirect-uri",
            callback.group(1),
        ],
        env,
    )
    procs.append(provider)
    provider.waitFor("OpenID Connect test provider at")
    # 3. Something to share.
    (work / "index.html").write_text("hello from my laptop\n")
    webPort = freePort()
    web = Proc([sys.executable, "-m", "http.server", str(webPort), "--bind", "127.0.0.1"], env, cwd=str(work))
    procs.append(web)
    web.waitFor("Serving HTTP")
    # 4. The shared tunnel.
    share = ["--subdomain", "web", "--allow", "alice@example.com,bob@example.com", "--relay", relayURL]
    agent = Proc([tool("txtunnel"), "http", str(webPort), *share], env)
    procs.append(agent)
    agent.waitFor(re.escape(f"tunnel ready: http://web.localhost:{relayPort}/ -> 127.0.0.1:{webPort}"))
    url = f"http://web.localhost:{relayPort}/"

    def visit(name: str, who: str | None, page: str = url) -> str:
        jar = tmp_path / name
        Path(str(jar) + ".provider").write_text(f"http://127.0.0.1:{providerPort}")
        return browser(jar, page, who)

    # 5. Visit it.
    assert visit("alice", "alice@example.com") == "hello from my laptop\n"
    assert visit("bob", "bob@example.com") == "hello from my laptop\n"
    denied = visit("eve", "eve@example.com")
    assert "Access denied" in denied and "eve@example.com" in denied and "/_txtunnel/logout" in denied
    switch = re.search(r'href="([^"]*)">Log in as someone else<', denied)
    assert switch, denied
    assert visit("eve", "alice@example.com", html.unescape(switch.group(1))) == "hello from my laptop\n"

    # Logging in from the command line.
    config = tmp_path / "config"
    loginEnv = dict(env, XDG_CONFIG_HOME=str(config))
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

    def txtunnel(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([tool("txtunnel"), *args], env=loginEnv, capture_output=True, timeout=30)

    whoami = txtunnel("whoami", "--relay", relayURL)
    assert whoami.returncode == 0 and whoami.stdout.decode().startswith("alice@example.com on "), whoami

    # Changing the list of a running tunnel: made while logged in, with txtunnel share.
    assert agent.stop() == 0, agent.output
    agent = Proc([tool("txtunnel"), "http", str(webPort), *share], loginEnv)
    procs.append(agent)
    agent.waitFor("tunnel ready: http://web.localhost")
    eve = tmp_path / "eve-only"
    assert "Access denied" in visit("eve-only", "eve@example.com")
    added = txtunnel("share", "add", "web", "eve@example.com", "--relay", relayURL)
    assert added.stdout == b"web is shared with: alice@example.com, bob@example.com, eve@example.com\n", added
    assert browser(eve, url) == "hello from my laptop\n"
    removed = txtunnel("share", "remove", "web", "bob@example.com", "--relay", relayURL)
    assert removed.stdout == b"web is shared with: alice@example.com, eve@example.com\n", removed
    listed = txtunnel("share", "list", "web", "--relay", relayURL)
    assert listed.returncode == 0 and b"alice@example.com, eve@example.com" in listed.stdout, listed
    assert "Access denied" in visit("bob-again", "bob@example.com")
    assert agent.stop() == 0, agent.output

    # Or, for a config-file tunnel, edit allow and send SIGHUP.
    agentIni = work / "agent.ini"
    agentIni.write_text(
        f"[agent]\nrelay = {relayURL}\n\n[tunnel:web]\ntype = http\ntarget = {webPort}\n"
        "subdomain = web\nallow = alice@example.com, bob@example.com\n"
    )
    fileAgent = twistd(procs, env, "tunnelagent", "--config", str(agentIni))
    fileAgent.waitFor("tunnel ready: http://web.localhost")
    assert "Access denied" in browser(eve, url)
    agentIni.write_text(agentIni.read_text().replace("bob@example.com", "bob@example.com, eve@example.com"))
    fileAgent.popen.send_signal(signal.SIGHUP)
    fileAgent.waitFor("reloaded .*agent.ini: allow-lists changed for web")
    fileAgent.waitFor("allow-list updated on the relay")
    assert browser(eve, url) == "hello from my laptop\n"

    logout = txtunnel("logout", "--relay", relayURL)
    assert logout.returncode == 0 and b"logged out" in logout.stdout
    whoami = txtunnel("whoami", "--relay", relayURL)
    assert whoami.returncode == 1 and b"not logged in" in whoami.stdout
    assert "Traceback" not in relay.output + agent.output + fileAgent.output
