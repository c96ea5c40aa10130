# -*- test-case-name: tests.test_sharing -*-
"""
Visitor login for shared tunnels: the L{LoginGate}.

A tunnel whose bind request carries an C{allow} list is I{shared}: only a
logged-in visitor with a verified email on the list reaches it.  The flow:

1. A visitor without a session asks C{NAME.<domain>/page}; the gate
   redirects a C{GET} to C{<domain>/_txtunnel/login?to=<that URL>&bind=B}
   (other methods get a 401), setting C{B}, a random value kept per
   browser, in a cookie of C{NAME.<domain>} (C{txtunnel_bind}).
2. On the relay's own host (one callback URL for every tunnel, so one
   redirect URI is registered with the provider) the login starts:
   C{state}, C{nonce} and a PKCE verifier go into a short-lived signed
   cookie, and the visitor goes to the provider.
3. The provider sends the visitor to C{<domain>/_txtunnel/callback}; the
   relay checks C{state} against the cookie, trades the code (with the
   verifier) for an ID token, verifies it, records the identity (its
   verified emails) and hands the login to the tunnel's host with a
   one-time code kept in the store, with C{B}:
   C{NAME.<domain>/_txtunnel/session?code=...}.
4. There the gate takes the code (a second use finds nothing), checks that
   the browser's C{txtunnel_bind} cookie is C{B} (so a hand-off link sent
   to someone else logs nobody in: no login CSRF), sets the
   session cookie for that host only (signed with the relay secret,
   C{HttpOnly}, C{SameSite=Lax}, C{Secure} on HTTPS, expiring) and sends the
   visitor back to the page first asked for.

C{NAME.<domain>/_txtunnel/logout} ends the session -- asked from the
tunnel's own pages, or typed; a link or a form on another site (another
tunnel's included) gets a page that asks first, or a 403.  The "access denied"
and "logged out" pages link to C{NAME.<domain>/_txtunnel/login?switch=1},
which starts a new login asking the provider to let the visitor pick an
account (OpenID Connect's C{prompt=select_account}): without it a provider
that still has the visitor logged in would hand back the same account.
Requests that pass
carry C{X-Txtunnel-Email} to the local service; a visitor's own copy of
that header, and the relay's session cookie, are never forwarded.
"""

from __future__ import annotations

import html
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from zope.interface import implementer

from txtunnel.allow import allowed, isEmail, parseAllow
from txtunnel.errors import BindError
from txtunnel.gates import VisitorRequest
from txtunnel.http1 import Answer
from txtunnel.interfaces import IVisitorGate
from txtunnel.jwts import RelayJWT
from txtunnel.oidc import LoginFailed, pkcePair
from txtunnel.relay.device import DeviceFlow
from txtunnel.signing import Signer

if TYPE_CHECKING:
    from txtunnel.relay.service import Relay

__all__ = ["EMAIL_HEADER", "SESSION_COOKIE", "LoginGate"]

#: The header the local service finds the logged-in visitor's email in.
EMAIL_HEADER = b"X-Txtunnel-Email"

#: The session cookie on a tunnel's host, and the login-in-progress cookie
#: on the relay's own host.
SESSION_COOKIE = "txtunnel_session"
LOGIN_COOKIE = "txtunnel_login"

#: The browser's login binding on the host a login returns to: a random
#: value the login carries through the provider and the hand-off must
#: match, so a hand-off link works only in the browser that started the
#: login (no logging a victim in to someone else's account).
BIND_COOKIE = "txtunnel_bind"

#: Seconds a started login may take at the provider.
LOGIN_SECONDS = 600

#: Seconds the login binding cookie lasts (one per browser and host, reused
#: by every login started there meanwhile, so logins in two tabs both work).
BIND_SECONDS = 3600

#: Seconds the one-time hand-off code from the callback to the tunnel's host is good for.
HANDOFF_SECONDS = 60

#: Paths the relay answers itself.
PREFIX = b"/_txtunnel/"

#: A tunnel's link to log in with another account.
SWITCH = "/_txtunnel/login?switch=1"

#: The login link's extra query when switching accounts, or not.
SWITCHING: dict[bool, dict[str, str]] = {True: {"switch": "1"}, False: {}}


def page(
    status: int,
    title: str,
    message: str,
    links: list[tuple[str, str]] = (),  # type: ignore[assignment]
    headers: Any = (),
    form: tuple[str, str] | None = None,
) -> Answer:
    """
    A small HTML page the relay answers with; C{form}, if given, is a
    button (its label second) that POSTs to the URL given first.
    """
    items = "".join(f'<li><a href="{html.escape(href)}">{html.escape(text)}</a></li>' for text, href in links)
    button = ""
    if form is not None:
        action, label = form
        button = f'<form method="post" action="{html.escape(action)}"><button>{html.escape(label)}</button></form>'
    body = (
        "<!doctype html><html><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>{button}"
        f"{'<ul>' + items + '</ul>' if items else ''}</body></html>\n"
    ).encode()
    return Answer(status, message, headers=list(headers), body=body, contentType="text/html; charset=utf-8")


def bindingOf(request: VisitorRequest) -> tuple[str, list[tuple[str, str]]]:
    """
    The login binding of the browser sending C{request} (its cookie's, or a
    new one) and the C{Set-Cookie} to (re)send it with, for the host the
    login will return to.
    """
    value = cookies(request).get(BIND_COOKIE, "")
    if not validBinding(value):
        value = secrets.token_urlsafe(16)
    return value, [setCookie(BIND_COOKIE, value, request.scheme == "https", BIND_SECONDS, "/_txtunnel/")]


def validBinding(value: Any) -> bool:
    return isinstance(value, str) and 16 <= len(value) <= 64 and all(c.isalnum() or c in "-_" for c in value)


def sameOrigin(request: VisitorRequest, here: str) -> bool:
    """
    Whether C{request} comes from a page of C{here} itself, by what the
    browser says: C{Sec-Fetch-Site} (only C{same-origin}, or C{none} for
    a visitor's own typing, pass: another tunnel of this relay is
    C{same-site}) and C{Origin}, when sent.  A client that sends neither
    (curl, a script) is not a browser a page can drive, and passes.
    """
    site = request.head.header(b"sec-fetch-site")
    if site is not None and site.strip().lower() not in (b"same-origin", b"none"):
        return False
    origin = request.head.header(b"origin")
    return origin is None or origin.decode("latin-1").strip().lower() == here.lower()


def redirect(location: str, headers: list[tuple[str, str]] | None = None, reason: str | None = None) -> Answer:
    """
    A 302 to C{location}; C{reason}, the text logged and shown, is
    C{"see LOCATION"} unless given (a location carrying a secret, as a
    login's binding, is not logged).
    """
    return Answer(302, reason or f"see {location}", headers=[("Location", location), *(headers or [])])


def loginLink(base: str, params: dict[str, str], headers: list[tuple[str, str]]) -> Answer:
    """
    The redirect to the relay's login page with C{params}, its query left
    out of the logged reason: it carries the browser's login binding.
    """
    return redirect(f"{base}/_txtunnel/login?" + urlencode(params), headers, f"see {base}/_txtunnel/login")


def cookies(request: VisitorRequest) -> dict[str, str]:
    """
    The request's cookies by name (the first of each name).
    """
    found: dict[str, str] = {}
    for name, value in request.head.headers:
        if name.lower() != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            key, sep, val = part.strip().partition("=")
            if sep and key not in found:
                found[key] = val.strip()
    return found


def query(request: VisitorRequest) -> dict[str, str]:
    """
    The request's query parameters (the first of each name); none at all
    when there are more than 20, so a hostile query costs nothing.
    """
    text = request.head.target.partition(b"?")[2].decode("latin-1")
    try:
        return {k: v[0] for k, v in parse_qs(text, max_num_fields=20).items()}
    except ValueError:
        return {}


def setCookie(name: str, value: str, secure: bool, maxAge: int, path: str = "/") -> tuple[str, str]:
    flags = f"; Path={path}; Max-Age={maxAge}; HttpOnly; SameSite=Lax" + ("; Secure" if secure else "")
    return ("Set-Cookie", f"{name}={value}{flags}")


@implementer(IVisitorGate)
class LoginGate:
    """
    Guards shared tunnels and serves the relay's login pages.

    The same gate sits in C{Relay.gates} (tunnel hosts) and
    C{Relay.apexGates} (the relay's own host, for C{/_txtunnel/login} and
    C{/_txtunnel/callback}); C{request.tunnel} is C{None} on the latter.
    """

    log = Logger()

    def __init__(self, relay: Relay, providers: dict[str, Any], signer: Signer, lifetime: float) -> None:
        self.relay = relay
        self.providers = providers
        self.signer = signer
        self.lifetime = lifetime
        self.tokens = RelayJWT(signer.secret, relay.domain)
        self.device = DeviceFlow(self)
        #: Added to the wall clock: lets a test age sessions without waiting.
        self.clockSkew = 0.0

    def now(self) -> float:
        return self.relay.wallClock() + self.clockSkew

    # -- binds

    def validate(self, bindRequest: dict[str, Any]) -> None:
        if "allow" not in bindRequest:
            return
        entries = bindRequest["allow"]
        if not isinstance(entries, list):
            raise BindError("allow must be a list of emails and @domains")
        try:
            bindRequest["allow"] = parseAllow(entries)
        except ValueError as e:
            raise BindError(f"bad allow-list: {e}") from None
        if not self.providers:
            raise BindError(
                "this relay has no login providers ([provider:NAME] in relay.ini), so it cannot restrict "
                "a tunnel to --allow"
            )

    # -- requests

    def check(self, request: VisitorRequest) -> Answer | None | Deferred[Answer | None]:
        if request.tunnel is None:
            return ensureDeferred(self._apex(request))
        # A visitor must never be able to claim an email, shared tunnel or not.
        request.dropHeaders.add(EMAIL_HEADER.lower())
        entries = request.bindRequest.get("allow")
        if not isinstance(entries, list):
            return None
        return ensureDeferred(self._shared(request, entries))

    def _secure(self, request: VisitorRequest) -> bool:
        return request.scheme == "https"

    def _base(self, request: VisitorRequest) -> str:
        """
        The relay's own URL (scheme, domain, port) as the visitor reached it.
        """
        port = request.host.decode("latin-1").rpartition(":")[2] if b":" in request.host else ""
        return f"{request.scheme}://{self.relay.domain}{':' + port if port else ''}"

    async def _shared(self, request: VisitorRequest, entries: list[str]) -> Answer | None:
        path = request.head.path
        host = request.host.decode("latin-1").lower()
        here = f"{request.scheme}://{host}"
        if path == PREFIX + b"session":
            return await self._session(request, host)
        store: Any = self.relay.store
        session = await self._sessionOf(request, host)
        if path == PREFIX + b"logout":
            if not sameOrigin(request, here):
                # Another site (another tunnel included) may not end the
                # session: a cross-site link gets a page that asks, and a
                # cross-site form is refused.
                if request.head.method != b"GET":
                    return Answer(403, "a logout must be sent from this site's own page")
                return page(
                    200,
                    "Log out?",
                    f"Log out of {host}?",
                    form=(here + "/_txtunnel/logout", "Log out"),
                )
            if session is not None:
                # Ended on the relay too: a copy of the cookie is no good either.
                await store.takeTicket("session", session["i"])
            return page(
                200,
                "Logged out",
                f"You are logged out of {host}.",
                [("Log in again", here + "/"), ("Log in as someone else", here + SWITCH)],
                headers=[setCookie(SESSION_COOKIE, "", self._secure(request), 0)],
            )
        if session is not None:
            email = session["e"]
        elif (authorization := request.head.header(b"authorization") or b"").lower().startswith(b"bearer "):
            # An API client: a relay-signed token or one from a provider.
            bearer = await self.bearerEmail(authorization[7:].strip().decode("latin-1"))
            if bearer is None:
                return Answer(
                    401,
                    "the bearer token is not valid here",
                    headers=[("WWW-Authenticate", 'Bearer realm="txtunnel", error="invalid_token"')],
                )
            email = bearer
            request.dropHeaders.add(b"authorization")
        else:
            email = None
        switch = path == PREFIX + b"login" and query(request).get("switch") == "1"
        if email is None or switch:
            target = here + (request.head.target.decode("latin-1") if path != PREFIX + b"login" else "/")
            params = {"to": target, **SWITCHING[switch]}
            if request.head.method in (b"GET", b"HEAD"):
                binding, setBinding = bindingOf(request)
                return loginLink(self._base(request), {**params, "bind": binding}, setBinding)
            login = f"{self._base(request)}/_txtunnel/login?" + urlencode(params)
            return Answer(401, f"log in first: {login}", headers=[("WWW-Authenticate", 'Bearer realm="txtunnel"')])
        if path == PREFIX + b"login":
            return redirect(here + "/")  # already logged in
        emails = await store.emailsOf(email)
        creator = request.bindRequest.get("creator")
        if not allowed(entries, emails) and not (isinstance(creator, str) and creator in emails):
            self.log.info("visitor {email} denied on {host}", email=email, host=host)
            return page(
                403,
                "Access denied",
                f"You are logged in as {email}, which may not open {host}. "
                "To use another account, log in as someone else.",
                [("Log in as someone else", here + SWITCH), ("Log out", here + "/_txtunnel/logout")],
            )
        request.addHeaders.append((EMAIL_HEADER, email.encode("ascii", "replace")))
        others = [
            part.strip()
            for name, value in request.head.headers
            if name.lower() == b"cookie"
            for part in value.split(b";")
            if part.strip() and not part.strip().startswith(SESSION_COOKIE.encode() + b"=")
        ]
        request.dropHeaders.add(b"cookie")
        if others:
            request.addHeaders.append((b"Cookie", b"; ".join(others)))
        return None

    async def _sessionOf(self, request: VisitorRequest, host: str) -> dict[str, Any] | None:
        """
        The visitor's session on C{host}: its cookie is signed by this
        relay for this host, unexpired, and the relay still holds the
        session (logout removes it).
        """
        session = self.signer.unsign("session", cookies(request).get(SESSION_COOKIE), self.now())
        if session is None or session.get("h") != host or not isinstance(session.get("e"), str):
            return None
        sid = session.get("i")
        if not isinstance(sid, str):
            return None
        held = await self.relay.store.getTicket("session", sid)  # type: ignore[union-attr]
        if held is None or held.get("e") != session["e"] or held.get("h") != host:
            return None
        return session

    async def bearerEmail(self, token: str) -> str | None:
        """
        The verified email a bearer token proves: a token this relay signed
        (what C{txtunnel login} stores), or an ID token of a configured
        provider, checked against that provider's JWKS.
        """
        claims = self.tokens.verify(token, self.now())
        if claims is not None:
            return str(claims["sub"]) if isEmail(claims["sub"]) else None
        for provider in self.providers.values():
            verifyBearer = getattr(provider, "verifyBearer", None)
            if verifyBearer is None:
                continue
            try:
                email = await verifyBearer(token)
            except LoginFailed:
                continue
            if email is not None:
                await self.relay.store.identify([email])  # type: ignore[union-attr]
                return str(email)
        return None

    async def _session(self, request: VisitorRequest, host: str) -> Answer:
        code = query(request).get("code", "")
        store: Any = self.relay.store
        ticket = await store.takeTicket("login-handoff", code) if code and len(code) <= 128 else None
        if ticket is None or ticket.get("host") != host:
            return page(
                400,
                "Login link expired",
                "This login link has expired or was used already.",
                [("Log in again", f"{request.scheme}://{host}/")],
            )
        binding = ticket.get("bind")
        held = cookies(request).get(BIND_COOKIE, "")
        if not validBinding(binding) or not secrets.compare_digest(held.encode(), str(binding).encode()):
            self.log.info("login hand-off for {host} refused: started in another browser", host=host)
            return page(
                403,
                "Login started elsewhere",
                "This login link belongs to a login started in another browser; log in here instead.",
                [("Log in", f"{request.scheme}://{host}/")],
            )
        previous = await self._sessionOf(request, host)
        if previous is not None:
            # Logged in as someone else: the old session ends on the relay too.
            await store.takeTicket("session", previous["i"])
        expires = self.now() + self.lifetime
        sid = secrets.token_urlsafe(16)
        await store.putTicket("session", sid, {"e": ticket["email"], "h": host}, expires)
        value = self.signer.sign("session", {"e": ticket["email"], "h": host, "i": sid}, expires)
        nextPath = ticket.get("next") or "/"
        self.log.info("visitor {email} logged in to {host}", email=ticket["email"], host=host)
        return redirect(
            f"{request.scheme}://{host}{nextPath}",
            [setCookie(SESSION_COOKIE, value, self._secure(request), int(self.lifetime))],
        )

    # -- the relay's own host

    async def _apex(self, request: VisitorRequest) -> Answer | None:
        path = request.head.path
        if not self.providers:
            return None
        if path == PREFIX + b"login":
            return await self._login(request)
        if path == PREFIX + b"callback":
            return await self._callback(request)
        if path == PREFIX + b"session":
            return await self._session(request, request.host.decode("latin-1").lower())
        if path.startswith(PREFIX + b"device") or path in (PREFIX + b"whoami", PREFIX + b"share"):
            return await self.device.handle(request)
        return None

    async def apexSession(self, request: VisitorRequest) -> str | None:
        """
        The email of the visitor's session on the relay's own host (for
        approving a device login), if any.
        """
        session = await self._sessionOf(request, request.host.decode("latin-1").lower())
        return None if session is None else str(session["e"])

    def loginRedirect(self, request: VisitorRequest) -> Answer:
        """
        Send the visitor to log in, then back to this page of the relay's host.
        """
        here = f"{request.scheme}://{request.host.decode('latin-1').lower()}{request.head.target.decode('latin-1')}"
        binding, setBinding = bindingOf(request)
        return loginLink(self._base(request), {"to": here, "bind": binding}, setBinding)

    def _checkTarget(self, to: str) -> tuple[str, str, str] | None:
        """
        C{(scheme, host, path)} of a page to go back to after login, or
        C{None} unless it is a tunnel host of this relay (so the login
        pages are never an open redirect).
        """
        try:
            parts = urlsplit(to)
        except ValueError:
            return None
        if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
            return None
        kind, name = self.relay.hosts.split(parts.netloc.encode("latin-1"))
        path = parts.path or "/"
        if kind == "apex" and parts.hostname == self.relay.domain and path.startswith("/_txtunnel/device"):
            pass  # the relay's own device-login page
        elif kind != "tunnel" or not name:
            return None
        if not path.startswith("/") or path.startswith("//"):
            return None
        target = quote(path, safe="/%:@!$&'()*+,;=-._~") + (
            "?" + quote(parts.query, safe="=&%:@!$'()*+,;/?-._~") if parts.query else ""
        )
        return parts.scheme, parts.netloc.lower(), target

    async def _login(self, request: VisitorRequest) -> Answer:
        params = query(request)
        target = self._checkTarget(params.get("to", ""))
        if target is None:
            return page(400, "Bad login link", "This login link does not name a tunnel on this relay.")
        switch = params.get("switch") == "1"
        binding = params.get("bind")
        if not validBinding(binding):
            # Not started from the page it returns to (which binds the login
            # to the browser): start there.
            scheme, host, path = target
            return redirect(f"{scheme}://{host}{SWITCH if switch else path}")
        name = params.get("provider")
        if name is None and len(self.providers) == 1:
            name = next(iter(self.providers))
        if name is None or name not in self.providers:
            base = f"{self._base(request)}/_txtunnel/login?"
            links = [
                (
                    f"Log in with {p.label}",
                    base + urlencode({"to": params["to"], "provider": key, **SWITCHING[switch], "bind": binding}),
                )
                for key, p in sorted(self.providers.items())
            ]
            return page(200, "Log in", f"Log in to open {target[1]}.", links)
        provider = self.providers[name]
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        verifier, challenge = pkcePair()
        redirectURI = self._base(request) + "/_txtunnel/callback"
        # Switching accounts: the provider must offer a choice, not the account it remembers.
        extra = {"prompt": "select_account"} if switch else {}
        try:
            location = await provider.authorizationURL(redirectURI, state, nonce, challenge, **extra)
        except LoginFailed as e:
            self.log.warn("login provider {name} unusable: {why}", name=name, why=str(e))
            return page(502, "Login unavailable", str(e))
        cookie = self.signer.sign(
            "login",
            {"s": state, "n": nonce, "v": verifier, "p": name, "t": list(target), "b": binding},
            self.now() + LOGIN_SECONDS,
        )
        return redirect(
            location,
            [setCookie(LOGIN_COOKIE, cookie, self._secure(request), LOGIN_SECONDS, "/_txtunnel/")],
            # Its query (state, nonce, PKCE challenge) is not for the logs.
            f"see {location.split('?', 1)[0]}",
        )

    async def _callback(self, request: VisitorRequest) -> Answer:
        params = query(request)
        login = self.signer.unsign("login", cookies(request).get(LOGIN_COOKIE), self.now())
        state = params.get("state", "")
        clear = [setCookie(LOGIN_COOKIE, "", self._secure(request), 0, "/_txtunnel/")]
        if login is None:
            return page(400, "Login expired", "This login was not started here or took too long; try again.")
        scheme, host, nextPath = login["t"]
        again = [("Try again", f"{scheme}://{host}{nextPath}")]
        if not secrets.compare_digest(state.encode(), str(login["s"]).encode()):
            return page(400, "Login failed", "The login's state does not match; try again.", again)
        if "error" in params:
            return page(403, "Login refused", f"The login provider said: {params['error'][:100]}", again, headers=clear)
        provider = self.providers.get(login["p"])
        code = params.get("code", "")
        if provider is None or not code:
            return page(400, "Login failed", "The login provider sent no code.", again, headers=clear)
        try:
            emails = await provider.emails(code, login["v"], self._base(request) + "/_txtunnel/callback", login["n"])
        except LoginFailed as e:
            self.log.warn("login with {name} failed: {why}", name=login["p"], why=str(e))
            return page(403, "Login failed", str(e), again, headers=clear)
        store: Any = self.relay.store
        await store.identify(emails)
        handoff = secrets.token_urlsafe(32)
        await store.putTicket(
            "login-handoff",
            handoff,
            {"email": emails[0], "host": host, "next": nextPath, "bind": login.get("b")},
            self.now() + HANDOFF_SECONDS,
        )
        return redirect(
            f"{scheme}://{host}/_txtunnel/session?" + urlencode({"code": handoff}),
            clear,
            f"see {scheme}://{host}/_txtunnel/session",  # the one-time code is not for the logs
        )
