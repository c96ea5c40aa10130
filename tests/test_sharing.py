"""
Shared tunnels: visitors log in at the relay with a real OpenID Connect
provider (authlib's server, on loopback) and only allow-listed emails get
through.  The browser is a requests session with a cookie jar following
real redirects across the tunnel host, the relay's host and the provider.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import pytest_twisted
import requests
from twisted.internet import defer, reactor
from twisted.web.server import Site

from tests.conftest import Relay, RunningAgent, curl, inThread, needBrowser, startAgent, startRelay, wait
from tests.test_gates import Headers
from txtunnel.allow import allowed, parseAllow
from txtunnel.errors import BindError
from txtunnel.signing import Signer
from txtunnel.testing.oidc import TestProvider

ALICE = {"sub": "alice", "email": "alice@example.com", "email_verified": True}
BOB = {"sub": "bob", "email": "bob@elsewhere.org", "email_verified": True}


@pytest.fixture(autouse=True)
def _localhostNames(monkeypatch: Any) -> None:
    """
    Resolve C{*.localhost} to 127.0.0.1, as browsers and curl do (glibc
    here does not).
    """
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and (host == "localhost" or host.endswith(".localhost")):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def headerEcho() -> Iterator[int]:
    """
    A local service that answers with the request headers it got.
    """
    port = reactor.listenTCP(0, Site(Headers()), interface="127.0.0.1")  # type: ignore[attr-defined]
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def provider() -> Iterator[TestProvider]:
    p = TestProvider(user=dict(ALICE)).start()
    yield p
    p.stop()


@pytest.fixture
def loginRelay(tmp_path: Any, provider: TestProvider) -> Iterator[Relay]:
    ini = tmp_path / "relay.ini"
    ini.write_text(
        "[relay]\nsession-lifetime = 600\n\n[provider:test]\n"
        f"issuer = {provider.issuer}\nclient-id = relay\nclient-secret = relay-secret\nlabel = Test IdP\n"
    )
    r = pytest_twisted.blockon(defer.ensureDeferred(startRelay(str(tmp_path / "state"), "--config", str(ini))))
    provider.client.redirectURIs.append(f"http://localhost:{r.port}/_txtunnel/callback")
    r.relay.loginGate.device.interval = 1  # poll faster than people need
    yield r
    pytest_twisted.blockon(defer.maybeDeferred(r.service.stopService))


def tunnelURL(relay: Relay, agent: RunningAgent) -> str:
    return agent.address()


def browse(session: requests.Session, url: str, **kwargs: Any) -> requests.Response:
    return session.get(url, timeout=30, **kwargs)


def seen(response: requests.Response) -> dict[str, str]:
    """
    The request headers the origin (tests.test_gates.Headers) reported.
    """
    found: dict[str, str] = {}
    for line in response.text.splitlines():
        key, _, value = line.partition("=")
        found.setdefault(key, value)
    return found


async def sharedAgent(agents: list[RunningAgent], relay: Relay, port: int, allow: str) -> str:
    agent = await startAgent(agents, relay, "--http", str(port), "--subdomain", "shared", "--allow", allow)
    return agent.address()


@pytest_twisted.ensureDeferred
async def test_loginFlow(loginRelay: Relay, agents: list[RunningAgent], headerEcho: int) -> None:
    """
    An allow-listed visitor goes through the provider and back to the page
    first asked for; the service sees the verified email, never the
    visitor's forged one or the relay's session cookie.
    """
    url = await sharedAgent(agents, loginRelay, headerEcho, "alice@example.com,@company.com")

    def visit() -> tuple[requests.Response, requests.Response, requests.Response]:
        s = requests.Session()
        s.cookies.set("other", "kept", domain="shared.localhost")
        first = browse(s, url + "page?x=1", headers={"X-Txtunnel-Email": "mallory@example.com"})
        again = browse(s, url + "second", headers={"X-Txtunnel-Email": "mallory@example.com"})
        loginAgain = browse(s, url + "_txtunnel/login", allow_redirects=False)
        stolen = s.cookies.get("txtunnel_session")
        browse(s, url + "_txtunnel/logout")
        # A copy of the cookie kept from before the logout is no good.
        replayed = requests.get(url, cookies={"txtunnel_session": stolen}, timeout=30, allow_redirects=False)
        assert replayed.status_code == 302 and "/_txtunnel/login?" in replayed.headers["Location"]
        return first, again, loginAgain

    first, again, loginAgain = await inThread(visit)
    assert loginAgain.status_code == 302 and loginAgain.headers["Location"] == url
    assert first.status_code == 200, first.text
    hops = [urlsplit(r.url) for r in first.history]
    assert [h.path for h in hops] == [
        "/page",
        "/_txtunnel/login",
        "/authorize",
        "/_txtunnel/callback",
        "/_txtunnel/session",
    ]
    assert hops[1].hostname == "localhost" and hops[0].hostname == "shared.localhost"
    got = seen(first)
    assert got["path"] == "/page?x=1"
    assert got["x-txtunnel-email"] == "alice@example.com"
    assert "txtunnel_session" not in got.get("cookie", "") and got["cookie"] == "other=kept"
    cookie = first.history[-1].headers["Set-Cookie"]
    assert cookie.startswith("txtunnel_session=")
    for flag in ("HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=600"):
        assert flag in cookie
    assert "Secure" not in cookie  # plain HTTP here
    assert "Domain" not in cookie  # this tunnel's host only
    # The second request rides on the session: no new login.
    assert again.status_code == 200 and not again.history
    assert seen(again)["x-txtunnel-email"] == "alice@example.com"


@pytest_twisted.ensureDeferred
async def test_domainEntryAndNotListed(
    loginRelay: Relay,
    agents: list[RunningAgent],
    headerEcho: int,
    provider: TestProvider,
) -> None:
    """
    An email not on the list gets an "access denied" page naming the
    account and a logout link; after logging out, another account gets in.
    """
    url = await sharedAgent(agents, loginRelay, headerEcho, "@example.com")
    provider.user = dict(BOB)

    def visit() -> tuple[requests.Response, requests.Response, requests.Response, requests.Response]:
        s = requests.Session()
        denied = browse(s, url)
        logout = browse(s, url + "_txtunnel/logout")
        provider.user = dict(ALICE)
        after = browse(s, url, allow_redirects=False)
        allowedNow = browse(s, url)
        return denied, logout, after, allowedNow

    denied, logout, after, allowedNow = await inThread(visit)
    assert denied.status_code == 403
    assert "bob@elsewhere.org" in denied.text and "Access denied" in denied.text
    assert f'href="{url}_txtunnel/logout"' in denied.text
    assert logout.status_code == 200 and "Max-Age=0" in logout.headers["Set-Cookie"]
    assert after.status_code == 302 and "/_txtunnel/login?" in after.headers["Location"]
    assert allowedNow.status_code == 200
    assert seen(allowedNow)["x-txtunnel-email"] == "alice@example.com"


@pytest_twisted.ensureDeferred
async def test_crossSiteLogoutRefused(loginRelay: Relay, agents: list[RunningAgent], headerEcho: int) -> None:
    """
    Another site -- another tunnel of the same relay included -- cannot end
    a visitor's session: its link gets a page that asks (a button that
    posts from the tunnel's own page), its form a 403; the session lives
    on until the visitor confirms.
    """
    url = await sharedAgent(agents, loginRelay, headerEcho, "alice@example.com")
    origin = url.rstrip("/")
    evil = origin.replace("shared.", "evil.")

    def visit() -> dict[str, requests.Response]:
        s = requests.Session()
        assert browse(s, url).status_code == 200
        asked = browse(s, url + "_txtunnel/logout", headers={"Sec-Fetch-Site": "same-site"})
        stillIn = browse(s, url, allow_redirects=False)
        posted = s.post(url + "_txtunnel/logout", headers={"Origin": evil, "Sec-Fetch-Site": "same-site"}, timeout=30)
        stillIn2 = browse(s, url, allow_redirects=False)
        confirmed = s.post(
            url + "_txtunnel/logout", headers={"Origin": origin, "Sec-Fetch-Site": "same-origin"}, timeout=30
        )
        after = browse(s, url, allow_redirects=False)
        return {
            "asked": asked,
            "stillIn": stillIn,
            "posted": posted,
            "stillIn2": stillIn2,
            "confirmed": confirmed,
            "after": after,
        }

    r = await inThread(visit)
    assert r["asked"].status_code == 200 and "Log out?" in r["asked"].text
    assert f'<form method="post" action="{origin}/_txtunnel/logout">' in r["asked"].text
    assert "Set-Cookie" not in r["asked"].headers
    assert r["stillIn"].status_code == 200 and r["stillIn2"].status_code == 200
    assert r["posted"].status_code == 403 and "own page" in r["posted"].text
    assert r["confirmed"].status_code == 200 and "Max-Age=0" in r["confirmed"].headers["Set-Cookie"]
    assert r["after"].status_code == 302 and "/_txtunnel/login?" in r["after"].headers["Location"]


def links(response: requests.Response) -> dict[str, str]:
    """
    The links of one of the relay's pages, by their text.
    """
    import html
    import re

    return {text: html.unescape(href) for href, text in re.findall(r'<a href="([^"]+)">([^<]+)</a>', response.text)}


@pytest_twisted.ensureDeferred
async def test_switchAccounts(
    loginRelay: Relay, agents: list[RunningAgent], headerEcho: int, provider: TestProvider
) -> None:
    """
    "Log in as someone else", on the access-denied page and on the
    logged-out page, asks the provider to let the visitor choose an account
    (prompt=select_account; a provider that remembers the visitor would
    otherwise log them in as the same account again); a first login does
    not.  The new login replaces the old session, which ends on the relay.
    """
    url = await sharedAgent(agents, loginRelay, headerEcho, "alice@example.com")
    provider.user = dict(BOB)

    def visit() -> dict[str, Any]:
        s = requests.Session()
        denied = browse(s, url + "page")
        old = s.cookies.get("txtunnel_session")
        provider.user = dict(ALICE)
        switched = browse(s, links(denied)["Log in as someone else"])
        replayed = requests.get(url, cookies={"txtunnel_session": old}, timeout=30, allow_redirects=False)
        logout = browse(s, url + "_txtunnel/logout")
        provider.user = dict(BOB)
        again = browse(s, links(logout)["Log in as someone else"])
        return {"denied": denied, "switched": switched, "replayed": replayed, "logout": logout, "again": again}

    got = await inThread(visit)
    assert got["denied"].status_code == 403 and "bob@elsewhere.org" in got["denied"].text
    assert links(got["denied"])["Log in as someone else"] == url + "_txtunnel/login?switch=1"
    assert got["switched"].status_code == 200 and seen(got["switched"])["x-txtunnel-email"] == "alice@example.com"
    assert got["replayed"].status_code == 302  # Bob's old session is over
    assert got["again"].status_code == 403 and "bob@elsewhere.org" in got["again"].text
    prompts = [q.get("prompt") for q in provider.authorizeQueries]
    assert prompts == [None, "select_account", "select_account"]


@pytest_twisted.ensureDeferred
async def test_switchAccountsGitHub(githubRelay: Relay, github: Any) -> None:
    """
    GitHub gets prompt=select_account too (its account picker) when the
    visitor switches accounts, and not otherwise.
    """
    base = f"http://localhost:{githubRelay.port}/_txtunnel/login?"
    for extra, prompt in (({}, None), ({"switch": "1"}, "select_account")):
        query = {"to": "http://shared.localhost/", **extra, "bind": "b" * 22}
        response = await inThread(
            lambda q=query: requests.get(base + urlencode(q), timeout=30, allow_redirects=False)  # type: ignore[misc]
        )
        assert response.status_code == 302
        assert parse_qs(urlsplit(response.headers["Location"]).query).get("prompt") == ([prompt] if prompt else None)


def startLogin(s: requests.Session, url: str) -> str:
    """
    Follow a visit up to the provider's answer; the callback URL it sends
    the browser to.
    """
    response = browse(s, url, allow_redirects=False)
    while response.status_code == 302 and "/_txtunnel/callback" not in response.headers["Location"]:
        response = browse(s, response.headers["Location"], allow_redirects=False)
    assert response.status_code == 302, response.text
    return str(response.headers["Location"])


@pytest_twisted.ensureDeferred
async def test_wrongState(loginRelay: Relay, agents: list[RunningAgent], headerEcho: int) -> None:
    """
    A callback whose state is not the one this browser's login started
    with is refused, and the code in it is never redeemed.
    """
    url = await sharedAgent(agents, loginRelay, headerEcho, "alice@example.com")

    def visit() -> tuple[requests.Response, requests.Response]:
        s = requests.Session()
        callback = startLogin(s, url)
        forged = callback.replace("state=", "state=x")
        bad = browse(s, forged)
        # Another browser (no login cookie) presenting a genuine callback.
        stranger = browse(requests.Session(), callback)
        return bad, stranger

    bad, stranger = await inThread(visit)
    assert bad.status_code == 400 and "state does not match" in bad.text
    assert stranger.status_code == 400 and "not started here" in stranger.text


@pytest_twisted.ensureDeferred
async def test_handoffBoundToItsBrowser(loginRelay: Relay, agents: list[RunningAgent], headerEcho: int) -> None:
    """
    Login CSRF: an attacker who logs in and stops at the hand-off link
    cannot log a victim in to the attacker's account with it -- the link
    works only in the browser that started the login (its txtunnel_bind
    cookie).  A login begun at the relay's own login page, without the
    tunnel's binding, is sent to start at the tunnel.
    """
    url = await sharedAgent(agents, loginRelay, headerEcho, "alice@example.com")

    def visit() -> dict[str, Any]:
        attacker = requests.Session()
        callback = startLogin(attacker, url)
        handoff = browse(attacker, callback, allow_redirects=False)
        assert handoff.status_code == 302 and "/_txtunnel/session?code=" in handoff.headers["Location"]
        victim = requests.Session()
        used = browse(victim, handoff.headers["Location"], allow_redirects=False)
        # The attacker's own browser would have been let in; the victim's
        # try used the code up, so nobody is.
        again = browse(attacker, handoff.headers["Location"], allow_redirects=False)
        honest = requests.Session()
        ownLogin = browse(honest, url + "mine")
        unbound = browse(
            requests.Session(),
            f"http://localhost:{loginRelay.port}/_txtunnel/login?" + urlencode({"to": url + "x"}),
            allow_redirects=False,
        )
        return {
            "used": used,
            "victimCookies": victim.cookies.get_dict(),
            "again": again,
            "ownLogin": ownLogin,
            "bind": honest.cookies.get("txtunnel_bind", domain="shared.localhost"),
            "unbound": unbound,
        }

    r = await inThread(visit)
    assert r["used"].status_code == 403 and "another browser" in r["used"].text
    assert "txtunnel_session" not in r["victimCookies"]
    assert r["again"].status_code == 400
    assert r["ownLogin"].status_code == 200 and seen(r["ownLogin"])["x-txtunnel-email"] == "alice@example.com"
    assert r["bind"] and len(r["bind"]) >= 16
    assert r["unbound"].status_code == 302 and r["unbound"].headers["Location"] == url + "x"


@pytest_twisted.ensureDeferred
async def test_replayedCodes(
    loginRelay: Relay,
    agents: list[RunningAgent],
    headerEcho: int,
    provider: TestProvider,
) -> None:
    """
    The provider's code is good once (the provider refuses a replay and the
    relay says the login failed), and so is the relay's hand-off code.
    """
    url = await sharedAgent(agents, loginRelay, headerEcho, "alice@example.com")

    def visit() -> tuple[requests.Response, requests.Response, requests.Response]:
        s = requests.Session()
        callback = startLogin(s, url)
        loginCookie = s.cookies.get("txtunnel_login")
        first = browse(s, callback, allow_redirects=False)
        assert first.status_code == 302
        handoff = first.headers["Location"]
        used = browse(s, handoff, allow_redirects=False)
        assert used.status_code == 302 and "txtunnel_session=" in used.headers["Set-Cookie"]
        # Replays, with the login cookie put back as an attacker would.
        s2 = requests.Session()
        s2.cookies.set("txtunnel_login", loginCookie, domain="localhost.local", path="/_txtunnel/")
        replay = browse(s2, callback)
        handoffAgain = browse(requests.Session(), handoff)
        return replay, handoffAgain, used

    replay, handoffAgain, used = await inThread(visit)
    assert replay.status_code == 403 and "refused the login code" in replay.text
    assert handoffAgain.status_code == 400 and "expired or was used already" in handoffAgain.text


@pytest_twisted.ensureDeferred
async def test_expiredSessionAndNonBrowsers(
    loginRelay: Relay,
    agents: list[RunningAgent],
    headerEcho: int,
) -> None:
    """
    An expired session sends the visitor back to log in; a request that is
    not a GET gets a 401; a forged cookie counts for nothing.
    """
    url = await sharedAgent(agents, loginRelay, headerEcho, "alice@example.com")
    s = requests.Session()
    ok = await inThread(browse, s, url)
    assert ok.status_code == 200
    loginRelay.relay.loginGate.clockSkew = 601
    expired = await inThread(lambda: browse(s, url, allow_redirects=False))
    assert expired.status_code == 302 and "/_txtunnel/login?to=" in expired.headers["Location"]
    loginRelay.relay.loginGate.clockSkew = 0
    post = await inThread(lambda: requests.post(url, data=b"x", timeout=30, allow_redirects=False))
    assert post.status_code == 401 and "log in first" in post.text
    forged = Signer(b"k" * 32).sign("session", {"e": "alice@example.com", "h": "shared.localhost"}, 2**40)
    stranger = await inThread(
        lambda: requests.get(url, cookies={"txtunnel_session": forged}, timeout=30, allow_redirects=False)
    )
    assert stranger.status_code == 302


@pytest_twisted.ensureDeferred
async def test_openRedirectRefused(loginRelay: Relay) -> None:
    """
    The login page only ever sends visitors back to this relay's tunnels.
    """
    base = f"http://localhost:{loginRelay.port}/_txtunnel/login?to="
    for target in ("http://evil.example/", "javascript:alert(1)", "http://localhost:1/", "http://x.localhost//evil"):
        r = await inThread(requests.get, base + target)
        assert r.status_code == 400, target
    other = await inThread(lambda: requests.get(f"http://localhost:{loginRelay.port}/other", timeout=30))
    assert other.status_code == 404


@pytest_twisted.ensureDeferred
async def test_publicTunnelDropsForgedEmail(
    loginRelay: Relay,
    agents: list[RunningAgent],
    headerEcho: int,
) -> None:
    """
    On a tunnel with no allow-list nobody logs in, and a visitor's own
    X-Txtunnel-Email never reaches the service.
    """
    agent = await startAgent(agents, loginRelay, "--http", str(headerEcho), "--subdomain", "open")
    r = await inThread(
        lambda: requests.get(agent.address(), headers={"X-Txtunnel-Email": "ceo@example.com"}, timeout=30)
    )
    assert r.status_code == 200 and "x-txtunnel-email" not in seen(r)


@pytest_twisted.ensureDeferred
async def test_allowNeedsAProvider(relay: Relay, agents: list[RunningAgent], headerEcho: int) -> None:
    """
    A relay with no login provider refuses a shared tunnel instead of
    serving it to everyone.
    """
    agent = await startAgent(
        agents, relay, "--http", str(headerEcho), "--allow", "alice@example.com", expectReady=False
    )
    with pytest.raises(RuntimeError, match="no login providers"):
        await agent.agent.ready


def test_gateValidatesAllowLists() -> None:
    """
    Bad allow-lists in a bind request are refused with the reason.
    """
    from types import SimpleNamespace

    from txtunnel.relay.login import LoginGate

    gate = LoginGate(SimpleNamespace(domain="localhost"), {"p": object()}, Signer(b"s" * 32), 60)  # type: ignore[arg-type]
    for bad in ("alice@example.com", ["not an email"], [1], ["@"], ["a@b.c" + "x" * 300]):
        with pytest.raises(BindError):
            gate.validate({"allow": bad})
    request = {"allow": ["Alice@Example.COM", "@Company.com", "alice@example.com"]}
    gate.validate(request)
    assert request["allow"] == ["alice@example.com", "@company.com"]


def test_allowMatching() -> None:
    entries = parseAllow("alice@example.com, @company.com")
    assert allowed(entries, ["ALICE@example.com"])
    assert allowed(entries, ["x@other.org", "bob@company.com"])
    assert not allowed(entries, ["bob@evil-company.com", "bob@sub.company.com", "company.com@x.org"])
    with pytest.raises(ValueError, match="not an email"):
        parseAllow("alice")


def test_signer() -> None:
    signer = Signer(b"s" * 32)
    token = signer.sign("session", {"e": "a@b.c"}, 100)
    assert signer.unsign("session", token, 99) == {"e": "a@b.c", "x": 100}
    assert signer.unsign("session", token, 100) is None  # expired
    assert signer.unsign("login", token, 0) is None  # another purpose
    assert Signer(b"t" * 32).unsign("session", token, 0) is None
    body, mac = token.split(".")
    assert signer.unsign("session", body + "." + mac[:-2] + "AA", 0) is None
    for junk in ("", ".", "a.b.c", "x" * 5000, "@@.@@"):
        assert signer.unsign("session", junk, 0) is None


def test_identitiesMerge() -> None:
    from txtunnel.store import SQLiteStore

    store = SQLiteStore(":memory:")
    a = store.identify(["alice@example.com"]).result
    b = store.identify(["alice@work.example"]).result
    assert a != b
    merged = store.identify(["ALICE@work.example", "alice@example.com"]).result
    assert merged == min(a, b)
    assert store.emailsOf("alice@example.com").result == ["alice@example.com", "alice@work.example"]
    assert store.emailsOf("nobody@x.org").result == ["nobody@x.org"]
    store.putTicket("t", "k", {"v": 1}, 2**40)
    assert store.takeTicket("t", "k").result == {"v": 1}
    assert store.takeTicket("t", "k").result is None


@pytest_twisted.ensureDeferred
async def test_idTokenChecks(provider: TestProvider) -> None:
    """
    ID tokens are checked against the provider's real JWKS: signature,
    issuer, audience, expiry and nonce each refuse a bad one.
    """
    import time

    from joserfc import jwt
    from joserfc.jwk import RSAKey

    from txtunnel.oidc import LoginFailed, OIDCProvider

    client = OIDCProvider(reactor, "test", provider.issuer, "relay", "relay-secret")
    now = int(time.time())
    good = {"iss": provider.issuer, "aud": "relay", "exp": now + 60, "iat": now, "nonce": "n", "sub": "a"}
    header = {"alg": "RS256", "kid": "test-1"}
    claims = await client.verify(jwt.encode(header, good, provider.key), "n")
    assert claims["sub"] == "a"
    stranger = RSAKey.generate_key(2048, parameters={"kid": "test-1"})
    bad = [
        jwt.encode(header, good, stranger),
        jwt.encode(header, dict(good, iss="http://evil"), provider.key),
        jwt.encode(header, dict(good, aud="someone-else"), provider.key),
        jwt.encode(header, dict(good, exp=now - 3600), provider.key),
        jwt.encode(header, dict(good, nonce="other"), provider.key),
        jwt.encode(header, {k: v for k, v in good.items() if k != "nonce"}, provider.key),
        "eyJhbGciOiJub25lIn0." + jwt.encode(header, good, provider.key).split(".")[1] + ".",
        "not a token",
    ]
    for token in bad:
        with pytest.raises(LoginFailed, match="ID token was not valid"):
            await client.verify(token, "n")


@pytest_twisted.ensureDeferred
async def test_providerKeyRotation(
    loginRelay: Relay, agents: list[RunningAgent], headerEcho: int, provider: TestProvider
) -> None:
    """
    When the provider rotates its signing key, the next login still works:
    the relay fetches the key set again once for the unknown key id (it
    once refused every login until its cache expired an hour later).
    Tokens with made-up key ids cannot make it fetch the set at will: at
    most one fetch a minute, and tokens arriving during a fetch wait for
    it.
    """
    import time

    from joserfc import jwt
    from joserfc.jwk import RSAKey

    from txtunnel.oidc import LoginFailed, OIDCProvider

    url = await sharedAgent(agents, loginRelay, headerEcho, "alice@example.com")
    assert (await inThread(browse, requests.Session(), url)).status_code == 200
    before = provider.jwksRequests
    provider.rotate()
    after = await inThread(browse, requests.Session(), url)
    assert after.status_code == 200, after.text
    assert seen(after)["x-txtunnel-email"] == "alice@example.com"
    assert provider.jwksRequests == before + 1

    client = OIDCProvider(reactor, "test", provider.issuer, "relay", "relay-secret")
    now = int(time.time())
    claims = {"iss": provider.issuer, "aud": "relay", "exp": now + 60, "iat": now, "nonce": "n", "sub": "a"}
    good = jwt.encode({"alg": "RS256", "kid": provider.key.kid}, claims, provider.key)
    assert (await client.verify(good, "n"))["sub"] == "a"
    provider.rotate()
    rotated = jwt.encode({"alg": "RS256", "kid": provider.key.kid}, claims, provider.key)
    start = provider.jwksRequests
    # Several at once during the rotation: one fetch, all verified.
    results = await defer.gatherResults([defer.ensureDeferred(client.verify(rotated, "n")) for _ in range(5)])
    assert [r["sub"] for r in results] == ["a"] * 5
    assert provider.jwksRequests == start + 1
    stranger = RSAKey.generate_key(2048, parameters={"kid": "made-up"})
    for kid in ("made-up", "made-up-2", "made-up-3"):
        forged = jwt.encode({"alg": "RS256", "kid": kid}, claims, stranger)
        with pytest.raises(LoginFailed, match="ID token was not valid"):
            await client.verify(forged, "n")
    assert provider.jwksRequests == start + 1


@pytest_twisted.ensureDeferred
async def test_allowListReload(
    loginRelay: Relay, agents: list[RunningAgent], headerEcho: int, provider: TestProvider, tmp_path: Any
) -> None:
    """
    Changing a tunnel's allow-list in agent.ini and reloading (what SIGHUP
    does) lets a new visitor in at the same URL; a list the relay refuses,
    or dropping the list, changes nothing.
    """
    from txtunnel.agent.tap import reloadAllowLists
    from txtunnel.errors import ConfigError

    ini = tmp_path / "agent.ini"
    ini.write_text(f"[tunnel:web]\ntype = http\ntarget = {headerEcho}\nsubdomain = team\nallow = alice@example.com\n")
    agent = await startAgent(agents, loginRelay, "--config", str(ini))
    url = agent.address()
    provider.user = dict(BOB)
    s = requests.Session()
    denied = await inThread(browse, s, url)
    assert denied.status_code == 403
    ini.write_text(ini.read_text().replace("alice@example.com", "alice@example.com, bob@elsewhere.org"))
    assert reloadAllowLists(agent.agent, str(ini)) == ["web"]
    for _ in range(50):
        if "bob@elsewhere.org" in loginRelay.relay.hosts.get("team").request["allow"]:
            break
        await defer.ensureDeferred(wait(0.05))
    welcome = await inThread(browse, s, url)
    assert welcome.status_code == 200 and seen(welcome)["x-txtunnel-email"] == "bob@elsewhere.org"
    assert agent.address() == url
    ini.write_text(ini.read_text().replace("allow = alice@example.com, bob@elsewhere.org", ""))
    with pytest.raises(ConfigError, match="stays shared"):
        reloadAllowLists(agent.agent, str(ini))
    ini.write_text(ini.read_text() + "allow = nobody\n")
    with pytest.raises(ConfigError, match="not an email"):
        reloadAllowLists(agent.agent, str(ini))
    # The relay checks an update like a bind: a bad list changes nothing.
    session = agent.agent.session
    bid = next(b for b, t in session.byId.items() if t.name == "web")
    session.link.sendControl({"op": "update", "id": bid, "allow": ["not-an-email"]})
    session.link.sendControl({"op": "update", "id": bid, "allow": "alice@example.com"})
    session.link.sendControl({"op": "update", "id": bid, "allow": []})
    await defer.ensureDeferred(wait(0.2))
    assert loginRelay.relay.hosts.get("team").request["allow"] == ["alice@example.com", "bob@elsewhere.org"]


@pytest.mark.parametrize(
    "section, error",
    [
        ("[provider:x]\nissuer = https://idp.example\nclient-id = r\n", "client-secret: missing"),
        ("[provider:x]\nissuer = ftp://idp\nclient-id = r\nclient-secret = s\n", "issuer: expected"),
        ("[provider:x]\nissuer = https://i\nclient-id = r\nclient-secret = s\ncolour = red\n", "colour: unknown key"),
        ("[provider:x]\ntype = saml\nissuer = https://i\nclient-id = r\nclient-secret = s\n", "type: expected oidc"),
        ("[provider:x]\nissuer = https://i\nclient-id = r\nclient-secret = s\nscopes = email\n", "must include openid"),
        ("[provider:b@d]\nissuer = https://i\nclient-id = r\nclient-secret = s\n", "a provider name is"),
        ("[elsewhere]\n", "expected [relay] or [provider:NAME]"),
        ("[relay]\nsession-lifetime = 5\n", "between 60 seconds and 90 days"),
    ],
)
def test_providerConfigErrors(tmp_path: Any, section: str, error: str) -> None:
    from twisted.python import usage

    from txtunnel.relay.tap import Options

    ini = tmp_path / "relay.ini"
    ini.write_text(section)
    with pytest.raises(usage.UsageError) as e:
        Options(environ={}).parseOptions(["--config", str(ini)])
    assert error in str(e.value) and str(ini) in str(e.value)


def test_providerSecretFromEnvironment(tmp_path: Any) -> None:
    from txtunnel.relay.tap import Options

    ini = tmp_path / "relay.ini"
    ini.write_text("[provider:corp-sso]\nissuer = https://idp.example\nclient-id = relay\n")
    options = Options(environ={"TXTUNNEL_RELAY_PROVIDER_CORP_SSO_CLIENT_SECRET": "from-env"})
    options.parseOptions(["--config", str(ini)])
    assert options.providers["corp-sso"]["client-secret"] == "from-env"


@pytest.mark.parametrize(
    "args, error",
    [
        (["--tcp", "22", "--allow", "a@b.example"], "--allow applies to HTTP tunnels"),
        (["--http", "80", "--allow", "nobody"], "not an email address"),
        (["--http", "80", "--allow", ","], "needs at least one"),
        (["--udp", "53", "--verify-webhook", "github:0123456789"], "--verify-webhook applies to HTTP"),
        (["--http", "80", "--verify-webhook", "gitlab:0123456789"], "KIND one of github"),
    ],
)
def test_agentOptionErrors(args: list[str], error: str) -> None:
    from twisted.python import usage

    from txtunnel.agent.tap import Options

    with pytest.raises(usage.UsageError, match=error):
        Options(environ={}).parseOptions(args)


def test_agentTunnelKeys(tmp_path: Any) -> None:
    from twisted.python import usage

    from txtunnel.agent.tap import Options

    ini = tmp_path / "agent.ini"
    ini.write_text(
        "[tunnel:web]\ntype = http\ntarget = 80\nallow = A@Example.com, @corp.example\n"
        "verify-webhook = stripe:whsec_0123456789\n"
    )
    options = Options(environ={})
    options.parseOptions(["--config", str(ini)])
    (tunnel,) = options.tunnels
    assert tunnel["options"]["allow"] == ["a@example.com", "@corp.example"]
    assert tunnel["options"]["verify-webhook"].kind == "stripe"
    ini.write_text("[tunnel:db]\ntype = tcp\ntarget = 5432\nallow = a@example.com\n")
    with pytest.raises(usage.UsageError, match=r"\[tunnel:db\] allow: only tunnels of type = http"):
        Options(environ={}).parseOptions(["--config", str(ini)])


def chromiumVisit(url: str, https: bool = False, then: Any = None) -> tuple[str, str, list[dict[str, Any]], str]:
    """
    Open C{url} in headless Chromium (C{*.localhost} mapped to loopback,
    the test certificate trusted when C{https}); the page's final URL, its
    text, the browser's cookies and the protocol it was fetched with.
    C{then}, if given, is called with the page afterwards, before the
    browser closes.
    """
    import os
    import shutil

    needBrowser("the shared-tunnel browser test")
    import playwright.sync_api as playwright

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=os.path.realpath(executable),
            args=["--no-sandbox", "--host-resolver-rules=MAP *.localhost 127.0.0.1, MAP localhost 127.0.0.1"],
        )
        try:
            page = browser.new_context(ignore_https_errors=https).new_page()
            page.goto(url)
            protocol = page.evaluate("performance.getEntriesByType('navigation')[0].nextHopProtocol")
            found = page.url, page.inner_text("body"), page.context.cookies(), str(protocol)
            if then is not None:
                then(page)
            return found
        finally:
            browser.close()


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_chromium(loginRelay: Relay, agents: list[RunningAgent], headerEcho: int) -> None:
    """
    The whole login in headless Chromium: the browser's own redirect and
    cookie handling ends on the shared page, with the session cookie kept
    for the tunnel's host only, HttpOnly and SameSite=Lax.
    """
    url = await sharedAgent(agents, loginRelay, headerEcho, "alice@example.com")
    logout: dict[str, Any] = {}

    def fromAnotherTunnel(page: Any) -> None:
        # A page of another tunnel on the relay links to the logout: the
        # browser's own Sec-Fetch-Site makes the relay ask first.
        page.goto(url.replace("shared.", "evil.") + "page")
        page.evaluate(f"location.href = {url + '_txtunnel/logout'!r}")
        page.wait_for_url(url + "_txtunnel/logout")
        logout["asked"] = page.inner_text("body")
        logout["kept"] = [c["name"] for c in page.context.cookies()]
        page.click("button")
        page.wait_for_load_state()
        logout["done"] = page.inner_text("body")
        logout["left"] = [c["name"] for c in page.context.cookies()]

    final, text, jar, _ = await inThread(chromiumVisit, url + "inside?from=chromium", False, fromAnotherTunnel)
    assert final == url + "inside?from=chromium"
    assert "x-txtunnel-email=alice@example.com" in text and "path=/inside?from=chromium" in text
    (session,) = [c for c in jar if c["name"] == "txtunnel_session"]
    assert session["domain"] == "shared.localhost" and session["httpOnly"] and session["sameSite"] == "Lax"
    assert "Log out of shared.localhost" in logout["asked"] and "txtunnel_session" in logout["kept"]
    assert "You are logged out" in logout["done"] and "txtunnel_session" not in logout["left"]
    assert not [c for c in jar if c["name"] == "txtunnel_login" and c["value"]]


def providerIDToken(provider: TestProvider) -> str:
    """
    An ID token the provider issues for the relay's client, by the code flow.
    """
    from txtunnel.oidc import pkcePair

    verifier, challenge = pkcePair()
    redirect = "http://localhost:1/cb"
    provider.client.redirectURIs.append(redirect)
    params = {
        "response_type": "code",
        "client_id": "relay",
        "redirect_uri": redirect,
        "scope": "openid email",
        "nonce": "n",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    answer = requests.get(provider.issuer + "/authorize", params=params, allow_redirects=False, timeout=30)
    code = answer.headers["Location"].split("code=")[1].split("&")[0]
    token = requests.post(
        provider.issuer + "/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": redirect, "code_verifier": verifier},
        auth=("relay", "relay-secret"),
        timeout=30,
    )
    return str(token.json()["id_token"])


@pytest_twisted.ensureDeferred
async def test_bearerTokens(
    loginRelay: Relay, agents: list[RunningAgent], headerEcho: int, provider: TestProvider
) -> None:
    """
    API clients present a relay-signed JWT or a provider's token (checked
    against its JWKS) instead of a cookie; the token is not passed on, and
    bad, expired, foreign or not-allowed ones are refused.
    """
    import time

    from txtunnel.jwts import RelayJWT

    url = await sharedAgent(agents, loginRelay, headerEcho, "alice@example.com")
    gate = loginRelay.relay.loginGate
    now = time.time()

    def get(token: str) -> requests.Response:
        return requests.get(url, headers={"Authorization": "Bearer " + token}, timeout=30, allow_redirects=False)

    ok = await inThread(get, gate.tokens.issue("alice@example.com", 60, now))
    assert ok.status_code == 200, ok.text
    assert seen(ok)["x-txtunnel-email"] == "alice@example.com" and "authorization" not in seen(ok)
    fromProvider = await inThread(get, await inThread(providerIDToken, provider))
    assert fromProvider.status_code == 200 and seen(fromProvider)["x-txtunnel-email"] == "alice@example.com"
    notListed = await inThread(get, gate.tokens.issue("bob@elsewhere.org", 60, now))
    assert notListed.status_code == 403 and "bob@elsewhere.org" in notListed.text
    for bad in (
        gate.tokens.issue("alice@example.com", 60, now - 3600),  # expired
        RelayJWT(b"another relay's secret.........", "localhost").issue("alice@example.com", 60, now),
        "garbage",
        "a.b.c",
        "x" * 10000,
    ):
        refused = await inThread(get, bad)
        assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["WWW-Authenticate"]


# -- command-line login (device code)


def approveInBrowser(start: dict[str, Any], choice: str = "Approve") -> requests.Response:
    """
    What the person does: open the verification URL, log in at the
    provider, follow the Approve (or Deny) link.
    """
    import re

    s = requests.Session()
    page = browse(s, start["verification_uri_complete"])
    assert page.status_code == 200, page.text
    assert start["user_code"] in page.text
    links = dict((text, href) for href, text in re.findall(r'<a href="([^"]+)">([^<]+)</a>', page.text))
    return browse(s, links[choice].replace("&amp;", "&"))


@pytest_twisted.ensureDeferred
async def test_deviceLoginApprove(
    loginRelay: Relay, agents: list[RunningAgent], headerEcho: int, tmp_path: Any, monkeypatch: Any
) -> None:
    """
    C{txtunnel login}'s flow: the code is approved in a browser after the
    provider login, the token is kept with mode 0600, whoami names the
    account, and an agent using it is the tunnel's creator, who may always
    open it.
    """
    import os
    import stat

    from twisted.internet import reactor

    from txtunnel.credentials import deviceLogin, tokensPath, whoami

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    relayURL = loginRelay.url
    approvals: list[Any] = []

    def show(start: dict[str, Any]) -> None:
        approvals.append(defer.ensureDeferred(inThread(approveInBrowser, start)))

    entry = await deviceLogin(reactor, relayURL, show)
    approved = await approvals[0]
    assert approved.status_code == 200 and "alice@example.com" in approved.text
    assert entry["email"] == "alice@example.com"
    assert stat.S_IMODE(os.stat(tokensPath()).st_mode) == 0o600
    me = await whoami(reactor, relayURL)
    assert me["email"] == "alice@example.com"
    # The creator is not on the list, yet may open the tunnel.
    agent = await startAgent(agents, loginRelay, "--http", str(headerEcho), "--allow", "carol@example.com")
    url = agent.address()
    token = entry["token"]
    mine = await inThread(
        lambda: requests.get(url, headers={"Authorization": "Bearer " + token}, timeout=30, allow_redirects=False)
    )
    assert mine.status_code == 200 and seen(mine)["x-txtunnel-email"] == "alice@example.com"


@pytest_twisted.ensureDeferred
async def test_deviceLoginDenyAndExpiry(loginRelay: Relay, tmp_path: Any, monkeypatch: Any) -> None:
    """
    A denied code ends the login with a message; an expired one too; an
    approval link is good only for the account and code it was made for.
    """
    import time

    from twisted.internet import reactor

    from txtunnel.credentials import LoginError, deviceLogin

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    answers: list[Any] = []
    with pytest.raises(LoginError, match="denied"):
        await deviceLogin(
            reactor,
            loginRelay.url,
            lambda start: answers.append(defer.ensureDeferred(inThread(approveInBrowser, start, "Deny"))),
        )
    assert (await answers[0]).status_code == 200

    store = loginRelay.relay.store
    starts: list[dict[str, Any]] = []

    def expire(start: dict[str, Any]) -> None:
        starts.append(start)
        store._now = lambda: time.time() + 601  # type: ignore[union-attr]

    try:
        with pytest.raises(LoginError, match="expired"):
            await deviceLogin(reactor, loginRelay.url, expire)
    finally:
        store._now = time.time  # type: ignore[union-attr]
    assert starts and starts[0]["expires_in"] == 600

    # A forged approval link (another code, no valid csrf) is refused.
    def forge() -> requests.Response:
        s = requests.Session()
        start = requests.post(loginRelay.url.replace("ws:", "http:") + "/_txtunnel/device/code", timeout=30).json()
        browse(s, start["verification_uri_complete"])  # logs in
        base = start["verification_uri"]
        return browse(s, base + "/approve?code=" + start["user_code"] + "&csrf=forged")

    forged = await inThread(forge)
    assert forged.status_code == 403 and "not yours" in forged.text


@pytest_twisted.ensureDeferred
async def test_devicePollErrors(loginRelay: Relay) -> None:
    base = loginRelay.url.replace("ws:", "http:")

    def poll(code: str | None) -> requests.Response:
        headers = {"X-Txtunnel-Device-Code": code} if code is not None else {}
        return requests.post(base + "/_txtunnel/device/token", headers=headers, timeout=30)

    for code in (None, "unknown", "x" * 500):
        r = await inThread(poll, code)
        assert r.status_code == 400 and r.json() == {"error": "expired_token"}
    start = (await inThread(lambda: requests.post(base + "/_txtunnel/device/code", timeout=30))).json()
    pending = await inThread(poll, start["device_code"])
    assert pending.json()["error"] == "authorization_pending"
    bad = await inThread(lambda: requests.get(base + "/_txtunnel/whoami", headers={"Authorization": "Bearer x"}))
    assert bad.status_code == 401


@pytest_twisted.ensureDeferred
async def test_agentLoginToken(tmp_path: Any, provider: TestProvider, headerEcho: int, monkeypatch: Any) -> None:
    """
    On a relay that requires a token, a valid login token lets an agent in
    instead; an invalid one is refused with a message saying to log in.
    """
    import json
    import time

    from txtunnel.credentials import relayBase, tokensPath

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    ini = tmp_path / "relay.ini"
    ini.write_text(f"[provider:test]\nissuer = {provider.issuer}\nclient-id = relay\nclient-secret = relay-secret\n")
    relay = await startRelay(str(tmp_path / "state"), "--config", str(ini), "--token", "static-token-123")
    started: list[RunningAgent] = []
    try:
        os_path = tokensPath()
        import os

        os.makedirs(os.path.dirname(os_path))
        token = relay.relay.loginGate.tokens.issue("alice@example.com", 60, time.time())
        with open(os_path, "w") as f:
            json.dump({relayBase(relay.url): {"token": token, "email": "a", "expires": time.time() + 60}}, f)
        agent = await startAgent(started, relay, "--http", str(headerEcho))
        assert agent.address()
        with open(os_path, "w") as f:
            json.dump({relayBase(relay.url): {"token": token + "x", "email": "a", "expires": time.time() + 60}}, f)
        refused = await startAgent(started, relay, "--http", str(headerEcho), expectReady=False)
        with pytest.raises(RuntimeError, match="run 'txtunnel login' again"):
            await refused.agent.ready
    finally:
        for a in started:
            await a.stop()
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_agentOutlivesItsLoginToken(
    tmp_path: Any, provider: TestProvider, headerEcho: int, monkeypatch: Any
) -> None:
    """
    An agent with a static token and a login token keeps running when the
    login token expires (it once died on its next reconnect, 30 days after
    'txtunnel login'): the relay lets it in on the static token, as nobody
    in particular, and tells it why.  The agent reads the stored login
    token again at each reconnect, so a new 'txtunnel login' counts without
    a restart.
    """
    from tests.test_reconnect import dropLink, waitFor

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    ini = tmp_path / "relay.ini"
    ini.write_text(f"[provider:test]\nissuer = {provider.issuer}\nclient-id = relay\nclient-secret = relay-secret\n")
    relay = await startRelay(str(tmp_path / "state"), "--config", str(ini), "--token", "static-token-123")
    started: list[RunningAgent] = []
    try:
        writeLogin(relay, "alice@example.com")
        args = ["--http", str(headerEcho), "--token", "static-token-123"]
        agent = await startAgent(started, relay, *args, "--reconnect-initial", "0.2", "--reconnect-jitter", "0")

        def relayEmail() -> Any:
            sessions = [s for s in relay.relay.sessions if s.state == "ready"]
            return sessions[0].email if len(sessions) == 1 else "?"

        assert relayEmail() == "alice@example.com"
        # Thirty-one days later on the relay: the stored token has expired.
        gate = relay.relay.loginGate
        gate.clockSkew = 31 * 86400
        old = dropLink(agent)
        await waitFor(lambda: agent.agent.session not in (None, old) and agent.agent.tunnels[0].address is not None)
        assert agent.agent.failure is None
        assert relayEmail() is None
        # 'txtunnel login' again: the next reconnect brings the new token.
        import json
        import time

        from txtunnel.credentials import relayBase, tokensPath

        token = gate.tokens.issue("bob@elsewhere.org", 600, gate.now())
        with open(tokensPath(), "w") as f:
            json.dump({relayBase(relay.url): {"token": token, "email": "b", "expires": time.time() + 600}}, f)
        old = dropLink(agent)
        await waitFor(lambda: agent.agent.session not in (None, old) and agent.agent.tunnels[0].address is not None)
        assert relayEmail() == "bob@elsewhere.org"
        # Without a good static token, a bad login token is still refused.
        gate.clockSkew = 62 * 86400
        refused = await startAgent(started, relay, "--http", str(headerEcho), "--token", "wrong", expectReady=False)
        with pytest.raises(RuntimeError, match="run 'txtunnel login' again .and the static token is not valid"):
            await refused.agent.ready
    finally:
        for a in started:
            await a.stop()
        await defer.maybeDeferred(relay.service.stopService)


# -- GitHub OAuth


@pytest.fixture
def github() -> Iterator[Any]:
    from txtunnel.testing.github import FakeGitHub

    fake = FakeGitHub().start()
    yield fake
    fake.stop()


@pytest.fixture
def githubRelay(tmp_path: Any, github: Any) -> Iterator[Relay]:
    ini = tmp_path / "relay.ini"
    ini.write_text(
        "[provider:gh]\ntype = github\n"
        f"issuer = {github.url}\napi-url = {github.url}/api\nclient-id = gh-relay\nclient-secret = gh-secret\n"
    )
    r = pytest_twisted.blockon(defer.ensureDeferred(startRelay(str(tmp_path / "state"), "--config", str(ini))))
    yield r
    pytest_twisted.blockon(defer.maybeDeferred(r.service.stopService))


@pytest_twisted.ensureDeferred
async def test_githubLogin(githubRelay: Relay, agents: list[RunningAgent], headerEcho: int, github: Any) -> None:
    """
    GitHub's verified emails all join the visitor's identity (so a
    secondary one on the list lets them in, under the primary address);
    an unverified one does not count, an account with none is refused, and
    a replayed code is refused by GitHub.
    """
    github.emails = [
        {"email": "alice@example.com", "verified": True, "primary": True},
        {"email": "alice@work.example", "verified": True, "primary": False},
        {"email": "boss@company.example", "verified": False, "primary": False},
    ]
    url = await sharedAgent(agents, githubRelay, headerEcho, "@work.example")
    other = await startAgent(agents, githubRelay, "--http", str(headerEcho), "--allow", "boss@company.example")

    def visit() -> tuple[requests.Response, requests.Response]:
        s = requests.Session()
        return browse(s, url + "x"), browse(s, other.address())

    ok, unverified = await inThread(visit)
    assert ok.status_code == 200, ok.text
    assert urlsplit(ok.history[2].url).path == "/login/oauth/authorize"
    assert seen(ok)["x-txtunnel-email"] == "alice@example.com"
    assert unverified.status_code == 403 and "alice@example.com" in unverified.text
    assert await githubRelay.relay.store.emailsOf("alice@work.example") == ["alice@example.com", "alice@work.example"]

    github.emails = [{"email": "nobody@example.com", "verified": False, "primary": True}]

    def replay() -> tuple[requests.Response, requests.Response]:
        s = requests.Session()
        none = browse(s, url)
        github.emails = [{"email": "alice@work.example", "verified": True, "primary": True}]
        s2 = requests.Session()
        callback = startLogin(s2, url)
        loginCookie = s2.cookies.get("txtunnel_login")
        assert browse(s2, callback, allow_redirects=False).status_code == 302
        s3 = requests.Session()
        s3.cookies.set("txtunnel_login", loginCookie, domain="localhost.local", path="/_txtunnel/")
        return none, browse(s3, callback)

    none, replayed = await inThread(replay)
    assert none.status_code == 403 and "no verified email" in none.text
    assert replayed.status_code == 403 and "bad_verification_code" in replayed.text


@pytest_twisted.ensureDeferred
async def test_secureCookiesOnHTTPS(
    tmp_path: Any, provider: TestProvider, agents: list[RunningAgent], headerEcho: int
) -> None:
    """
    Reached over HTTPS, the login and session cookies are Secure, and the
    whole flow stays on https:// URLs.
    """
    from tests.test_http_tunnel import selfSignedCertificate

    key, cert = selfSignedCertificate(tmp_path)
    ini = tmp_path / "relay.ini"
    ini.write_text(f"[provider:test]\nissuer = {provider.issuer}\nclient-id = relay\nclient-secret = relay-secret\n")
    relay = await startRelay(
        str(tmp_path / "state"),
        "--config",
        str(ini),
        "--https",
        f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
    )
    try:
        port = relay.relay.httpsPort
        provider.client.redirectURIs.append(f"https://localhost:{port}/_txtunnel/callback")
        await startAgent(
            agents, relay, "--http", str(headerEcho), "--subdomain", "secure", "--allow", "alice@example.com"
        )

        def visit() -> requests.Response:
            # verify per request: a session's is overridden by REQUESTS_CA_BUNDLE.
            return browse(requests.Session(), f"https://secure.localhost:{port}/page", verify=cert)

        page = await inThread(visit)
        assert page.status_code == 200 and seen(page)["x-txtunnel-email"] == "alice@example.com"
        relayHops = [r for r in page.history if urlsplit(r.url).hostname != "127.0.0.1"]
        assert all(r.url.startswith("https://") for r in relayHops)
        login = next(r for r in page.history if urlsplit(r.url).path == "/_txtunnel/login")
        session = page.history[-1]
        for response in (login, session):
            assert "; Secure" in response.headers["Set-Cookie"], response.headers["Set-Cookie"]
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_hostileLoginRequests(loginRelay: Relay, agents: list[RunningAgent], headerEcho: int) -> None:
    """
    Malformed login requests get a clear 4xx, never a 500 or a split header.
    """
    url = await sharedAgent(agents, loginRelay, headerEcho, "alice@example.com")
    base = f"http://localhost:{loginRelay.port}/_txtunnel/"

    def get(target: str, jar: dict[str, str] | None) -> requests.Response:
        return requests.get(target, cookies=jar, timeout=30, allow_redirects=False)

    cases = [
        (base + "login?to=" + url + "%0d%0aSet-Cookie:%20x=1", None),
        (base + "login?" + "&".join(f"p{i}=1" for i in range(50)), None),
        (base + "login?to=" + url + "&provider=nonexistent", None),
        (base + "callback?state=x&code=y", {"txtunnel_login": "garbage"}),
        (base + "callback?state=x&code=y", {"txtunnel_login": "a" * 5000}),
        (url + "_txtunnel/session?code=" + "x" * 500, None),
        (url + "_txtunnel/session", None),
        (url, {"txtunnel_session": "%%%;;;==="}),
    ]
    for target, jar in cases:
        r = await inThread(get, target, jar)
        assert 200 <= r.status_code < 500, (target, r.status_code, r.text)
        assert "x=1" not in r.headers.get("Set-Cookie", ""), target


@pytest_twisted.ensureDeferred
async def test_unusableEmailsRefused(
    loginRelay: Relay, agents: list[RunningAgent], headerEcho: int, provider: TestProvider
) -> None:
    """
    An email a provider vouches for must still be a plain address: one
    that would split the header to the service ends the login instead.
    """
    url = await sharedAgent(agents, loginRelay, headerEcho, "@example.com")
    provider.user = {"sub": "x", "email": "evil@example.com\r\nX-Admin: 1", "email_verified": True}
    refused = await inThread(browse, requests.Session(), url)
    assert refused.status_code == 403 and "not a usable email address" in refused.text
    provider.user = {"sub": "y", "email": "mallory@example.com", "email_verified": False}
    unverified = await inThread(browse, requests.Session(), url)
    assert unverified.status_code == 403 and "has not verified" in unverified.text


# -- txtunnel share


def writeLogin(relay: Relay, email: str) -> None:
    """
    Store a login token for C{email} as 'txtunnel login' would.
    """
    import json
    import os
    import time

    from txtunnel.credentials import relayBase, tokensPath

    token = relay.relay.loginGate.tokens.issue(email, 600, time.time())
    os.makedirs(os.path.dirname(tokensPath()), exist_ok=True)
    with open(tokensPath(), "w") as f:
        json.dump({relayBase(relay.url): {"token": token, "email": email, "expires": time.time() + 600}}, f)


@pytest_twisted.ensureDeferred
async def test_shareAddRemove(
    loginRelay: Relay,
    agents: list[RunningAgent],
    headerEcho: int,
    provider: TestProvider,
    tmp_path: Any,
    monkeypatch: Any,
) -> None:
    """
    The creator changes who a running tunnel is shared with from the
    command line; the change applies at once, the agent keeps it, and
    nobody else may make it.
    """
    from twisted.internet import reactor

    from txtunnel.credentials import LoginError, share

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    writeLogin(loginRelay, "alice@example.com")
    agent = await startAgent(
        agents, loginRelay, "--http", str(headerEcho), "--subdomain", "team", "--allow", "carol@x.org"
    )
    url = agent.address()
    provider.user = dict(BOB)
    s = requests.Session()
    assert (await inThread(browse, s, url)).status_code == 403
    answer = await share(reactor, loginRelay.url, "team", ["bob@elsewhere.org"], [])
    assert answer == {"tunnel": "team", "allow": ["carol@x.org", "bob@elsewhere.org"]}
    assert (await inThread(browse, s, url)).status_code == 200
    assert agent.agent.tunnels[0].options["allow"] == ["carol@x.org", "bob@elsewhere.org"]
    assert (await share(reactor, loginRelay.url, "team", [], []))["allow"] == ["carol@x.org", "bob@elsewhere.org"]
    await share(reactor, loginRelay.url, "team", [], ["bob@elsewhere.org"])
    assert (await inThread(browse, s, url)).status_code == 403
    with pytest.raises(LoginError, match="at least one entry"):
        await share(reactor, loginRelay.url, "team", [], ["carol@x.org"])
    with pytest.raises(LoginError, match="no shared tunnel named 'nope'"):
        await share(reactor, loginRelay.url, "nope", ["bob@elsewhere.org"], [])
    writeLogin(loginRelay, "bob@elsewhere.org")
    with pytest.raises(LoginError, match="only the tunnel's creator"):
        await share(reactor, loginRelay.url, "team", ["bob@elsewhere.org"], [])


@pytest.mark.parametrize(
    "args, error",
    [
        (["share"], "give list NAME"),
        (["share", "grant", "web"], "give list NAME"),
        (["share", "add", "web"], "add and remove take one or more"),
        (["share", "list", "web", "a@b.example"], "list takes no entries"),
        (["share", "add", "web", "not-an-email"], "not an email address"),
    ],
)
def test_shareUsage(args: list[str], error: str) -> None:
    from twisted.python import usage

    from txtunnel.cli import Options

    with pytest.raises(usage.UsageError, match=error):
        Options().parseOptions(args)


# -- pools


POOL_KEY = "pool-key-0123456789abcdef"


async def pooledShared(
    agents: list[RunningAgent], relay: Relay, port: int, *args: str, expectReady: bool = True
) -> RunningAgent:
    return await startAgent(
        agents, relay, "--http", str(port), "-s", "team", "--pool", POOL_KEY, *args, expectReady=expectReady
    )


@pytest_twisted.ensureDeferred
async def test_pooledTunnelLogin(
    loginRelay: Relay,
    agents: list[RunningAgent],
    headerEcho: int,
    provider: TestProvider,
    tmp_path: Any,
    monkeypatch: Any,
) -> None:
    """
    A pool of shared tunnels asks visitors to log in like a single shared
    tunnel (the login gate once let every visitor of a pool through); an
    agent with another allow-list cannot join the pool; and the creator's
    'txtunnel share' changes the list of every member, so a visitor is
    let in or out whichever member serves them.
    """
    from twisted.internet import reactor

    from txtunnel.credentials import share

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    writeLogin(loginRelay, "alice@example.com")
    a = await pooledShared(agents, loginRelay, headerEcho, "--allow", "carol@x.org")
    b = await pooledShared(agents, loginRelay, headerEcho, "--allow", "carol@x.org")
    url = a.address()
    assert b.address() == url

    def anonymous() -> list[requests.Response]:
        return [requests.get(url, timeout=30, allow_redirects=False) for _ in range(4)]

    for response in await inThread(anonymous):
        assert response.status_code == 302 and "/_txtunnel/login?" in response.headers["Location"]
    code, out, _ = await curl("-si", "-X", "POST", url)
    assert out.startswith(b"HTTP/1.1 401"), out

    stranger = await pooledShared(agents, loginRelay, headerEcho, "--allow", "mallory@evil.example", expectReady=False)
    with pytest.raises(RuntimeError, match="allow-list .* differs from that of the pool"):
        await stranger.agent.ready
    open_ = await pooledShared(agents, loginRelay, headerEcho, expectReady=False)
    with pytest.raises(RuntimeError, match="differs from that of the pool"):
        await open_.agent.ready

    provider.user = dict(BOB)
    s = requests.Session()
    assert [(await inThread(browse, s, url)).status_code for _ in range(4)] == [403] * 4
    answer = await share(reactor, loginRelay.url, "team", ["bob@elsewhere.org"], [])
    assert answer["allow"] == ["carol@x.org", "bob@elsewhere.org"]
    from tests.test_reconnect import waitFor

    both = ["carol@x.org", "bob@elsewhere.org"]
    await waitFor(lambda: all(m.agent.tunnels[0].options["allow"] == both for m in (a, b)))
    visits = [await inThread(browse, s, url) for _ in range(4)]
    assert [v.status_code for v in visits] == [200] * 4
    assert {seen(v)["x-txtunnel-email"] for v in visits} == {"bob@elsewhere.org"}
    await share(reactor, loginRelay.url, "team", [], ["bob@elsewhere.org"])
    await waitFor(lambda: all(m.agent.tunnels[0].options["allow"] == ["carol@x.org"] for m in (a, b)))
    assert [(await inThread(browse, s, url)).status_code for _ in range(4)] == [403] * 4
    # One member's own update (an agent.ini reload) reaches the other member too.
    a.agent.tunnels[0].options["allow"] = both
    assert a.agent.session.update(a.agent.tunnels[0])
    await waitFor(lambda: b.agent.tunnels[0].options["allow"] == both)
    assert [(await inThread(browse, s, url)).status_code for _ in range(4)] == [200] * 4


# -- HTTP/2


async def httpsLoginRelay(tmp_path: Any, provider: TestProvider) -> tuple[Relay, str]:
    """
    A relay with the test provider and an HTTPS listener (which offers
    HTTP/2 by ALPN); its certificate's path.
    """
    from tests.test_http_tunnel import selfSignedCertificate

    key, cert = selfSignedCertificate(tmp_path)
    ini = tmp_path / "relay.ini"
    ini.write_text(f"[provider:test]\nissuer = {provider.issuer}\nclient-id = relay\nclient-secret = relay-secret\n")
    relay = await startRelay(
        str(tmp_path / "state"),
        "--config",
        str(ini),
        "--https",
        f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
    )
    provider.client.redirectURIs.append(f"https://localhost:{relay.relay.httpsPort}/_txtunnel/callback")
    provider.client.redirectURIs.append(f"http://localhost:{relay.port}/_txtunnel/callback")
    return relay, cert


@pytest_twisted.ensureDeferred
async def test_loginOverHTTP2(
    tmp_path: Any, provider: TestProvider, agents: list[RunningAgent], headerEcho: int
) -> None:
    """
    The relay's own pages answer over HTTP/2 as over HTTP/1.1 (they once
    all answered 404 there, so a browser on an HTTPS relay could not log
    in): curl logs in over h2 on the HTTPS listener from the first visit
    to the shared page, and reaches the device-login pages; over h2c
    (prior knowledge) on the plain listener too.
    """
    relay, cert = await httpsLoginRelay(tmp_path, provider)
    try:
        port, plain = relay.relay.httpsPort, relay.port
        await startAgent(
            agents, relay, "--http", str(headerEcho), "--subdomain", "secure", "--allow", "alice@example.com"
        )
        jar = str(tmp_path / "jar")
        h2 = ["--http2", "--cacert", cert, "-b", jar, "-c", jar]
        code, out, err = await curl(*h2, "-L", "-D", "-", f"https://secure.localhost:{port}/page?x=1")
        assert code == 0, err
        statuses = [line.split()[:2] for line in out.decode("latin-1").splitlines() if line.startswith("HTTP/")]
        # page -> login -> provider (HTTP/1.1) -> callback -> session -> page
        assert len(statuses) == 6, out
        relayHops = [statuses[i] for i in (0, 1, 3, 4, 5)]
        assert relayHops == [["HTTP/2", "302"]] * 4 + [["HTTP/2", "200"]], out
        assert statuses[2][1] == "302"  # the provider's redirect to the callback
        assert b"x-txtunnel-email=alice@example.com" in out and b"path=/page?x=1" in out
        assert b"; Secure" in out

        # The device-login pages: a code, its page (log in first), the poll.
        code, out, err = await curl(*h2, "-X", "POST", f"https://localhost:{port}/_txtunnel/device/code")
        assert code == 0, err
        import json

        start = json.loads(out)
        assert start["verification_uri"] == f"https://localhost:{port}/_txtunnel/device"
        code, out, err = await curl("--http2", "--cacert", cert, "-i", start["verification_uri_complete"])
        assert out.startswith(b"HTTP/2 302") and b"/_txtunnel/login?" in out, out
        code, out, err = await curl(*h2, "-L", start["verification_uri_complete"])
        assert code == 0 and start["user_code"].encode() in out and b"alice@example.com" in out, out
        code, out, err = await curl(
            *h2,
            "-i",
            "-X",
            "POST",
            "-H",
            f"X-Txtunnel-Device-Code: {start['device_code']}",
            f"https://localhost:{port}/_txtunnel/device/token",
        )
        assert out.startswith(b"HTTP/2 400") and b"authorization_pending" in out, out

        # h2c, prior knowledge, on the plain listener.
        code, out, err = await curl(
            "--http2-prior-knowledge",
            "-i",
            f"http://localhost:{plain}/_txtunnel/login?to=http%3A%2F%2Fsecure.localhost%3A{plain}%2F&bind={'b' * 22}",
        )
        assert out.startswith(b"HTTP/2 302") and f"{provider.issuer}/authorize?".encode() in out, out
        code, out, err = await curl("--http2-prior-knowledge", "-i", f"http://localhost:{plain}/_txtunnel/device")
        assert out.startswith(b"HTTP/2 302") and b"/_txtunnel/login?" in out, out
        code, out, err = await curl("--http2-prior-knowledge", "-i", f"http://localhost:{plain}/elsewhere")
        assert out.startswith(b"HTTP/2 404") and b"this is a txtunnel relay" in out, out
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_chromiumHTTPS(
    tmp_path: Any, provider: TestProvider, agents: list[RunningAgent], headerEcho: int
) -> None:
    """
    The whole login in headless Chromium on the relay's HTTPS listener,
    where the browser speaks HTTP/2 to the relay's login pages and the
    tunnel; the session cookie is Secure.
    """
    relay, _ = await httpsLoginRelay(tmp_path, provider)
    try:
        await startAgent(
            agents, relay, "--http", str(headerEcho), "--subdomain", "secure", "--allow", "alice@example.com"
        )
        url = f"https://secure.localhost:{relay.relay.httpsPort}/inside?from=chromium"
        final, text, jar, protocol = await inThread(chromiumVisit, url, True)
        assert final == url and protocol == "h2"
        assert "x-txtunnel-email=alice@example.com" in text and "path=/inside?from=chromium" in text
        (session,) = [c for c in jar if c["name"] == "txtunnel_session"]
        assert session["domain"] == "secure.localhost" and session["secure"] and session["httpOnly"]
    finally:
        await defer.maybeDeferred(relay.service.stopService)
