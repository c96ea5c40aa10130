# -*- test-case-name: tests.test_sharing -*-
"""
Device-code login for the command line (C{txtunnel login}), on the relay's
own host, after RFC 8628's shape:

C{POST /_txtunnel/device/code}
    Start: a JSON object with C{device_code} (secret, for polling),
    C{user_code} (short, shown to the person), C{verification_uri},
    C{verification_uri_complete} (the code filled in), C{expires_in} and
    C{interval}.
C{POST /_txtunnel/device/token} with C{X-Txtunnel-Device-Code: CODE}
    Poll: C{400 {"error": "authorization_pending"}} until the person has
    answered, then C{200 {"access_token": JWT, "token_type": "Bearer",
    "expires_in": ..., "email": ...}} once (or C{access_denied}, or
    C{expired_token}).  The device code travels in a header, not the URL,
    so it is not written to access logs.
C{GET /_txtunnel/device?code=USER-CODE}
    The page the person opens: after logging in (the visitor login flow,
    ending with a session on the relay's host) it names the account and
    offers Approve and Deny links, each carrying a signed token bound to
    that account and code, so another site cannot approve for them.
C{GET /_txtunnel/whoami} with C{Authorization: Bearer JWT}
    The token's email and the identity's other verified emails.

Codes live in the store's tickets (L{txtunnel.store.SQLiteStore}) and
expire after L{DEVICE_SECONDS}.
"""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from twisted.logger import Logger

from txtunnel.gates import VisitorRequest
from txtunnel.http1 import Answer

if TYPE_CHECKING:
    from txtunnel.relay.login import LoginGate

__all__ = ["DEVICE_SECONDS", "DeviceFlow", "TOKEN_SECONDS"]

#: Seconds a device code may wait for the person to approve it.
DEVICE_SECONDS = 600

#: Seconds between polls the client is told to keep.
INTERVAL = 2

#: Seconds a token from C{txtunnel login} lasts.
TOKEN_SECONDS = 30 * 86400

#: Letters of user codes: no vowels (no words), no look-alikes.
_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"


def jsonAnswer(status: int, document: dict[str, Any]) -> Answer:
    return Answer(
        status,
        str(document.get("error", "ok")),
        headers=[("Cache-Control", "no-store")],
        body=json.dumps(document).encode("utf-8") + b"\n",
        contentType="application/json",
    )


def userCode() -> str:
    letters = "".join(secrets.choice(_ALPHABET) for _ in range(8))
    return letters[:4] + "-" + letters[4:]


class DeviceFlow:
    """
    The device-login endpoints of one relay's L{LoginGate}.
    """

    log = Logger()

    def __init__(self, gate: LoginGate) -> None:
        self.gate = gate
        self.tokenLifetime = float(TOKEN_SECONDS)
        self.interval = INTERVAL

    @property
    def store(self) -> Any:
        return self.gate.relay.store

    async def handle(self, request: VisitorRequest) -> Answer:
        from txtunnel.relay.login import PREFIX

        path = request.head.path
        method = request.head.method
        if path == PREFIX + b"device/code" and method == b"POST":
            return await self._start(request)
        if path == PREFIX + b"device/token" and method == b"POST":
            return await self._poll(request)
        if path == PREFIX + b"device" and method in (b"GET", b"HEAD"):
            return await self._page(request)
        if path in (PREFIX + b"device/approve", PREFIX + b"device/deny") and method == b"GET":
            return await self._answer(request, path.endswith(b"approve"))
        if path == PREFIX + b"whoami" and method == b"GET":
            return await self._whoami(request)
        if path == PREFIX + b"share" and method in (b"GET", b"POST"):
            return await self._share(request)
        return Answer(405, "not a device-login request this relay knows")

    async def _start(self, request: VisitorRequest) -> Answer:
        device, user = secrets.token_urlsafe(32), userCode()
        expires = self.gate.now() + DEVICE_SECONDS
        await self.store.putTicket("device", device, {"user": user, "status": "pending", "expires": expires}, expires)
        await self.store.putTicket("device-user", user, {"device": device}, expires)
        page = f"{self.gate._base(request)}/_txtunnel/device"
        return jsonAnswer(
            200,
            {
                "device_code": device,
                "user_code": user,
                "verification_uri": page,
                "verification_uri_complete": page + "?" + urlencode({"code": user}),
                "expires_in": DEVICE_SECONDS,
                "interval": self.interval,
            },
        )

    async def _poll(self, request: VisitorRequest) -> Answer:
        device = (request.head.header(b"x-txtunnel-device-code") or b"").decode("latin-1").strip()
        ticket = await self.store.getTicket("device", device) if 0 < len(device) <= 128 else None
        if ticket is None:
            return jsonAnswer(400, {"error": "expired_token"})
        if ticket["status"] == "pending":
            return jsonAnswer(400, {"error": "authorization_pending", "interval": self.interval})
        await self.store.takeTicket("device", device)
        if ticket["status"] != "approved":
            return jsonAnswer(400, {"error": "access_denied"})
        email = ticket["email"]
        token = self.gate.tokens.issue(email, self.tokenLifetime, self.gate.now())
        self.log.info("device login approved for {email}", email=email)
        return jsonAnswer(
            200,
            {"access_token": token, "token_type": "Bearer", "expires_in": int(self.tokenLifetime), "email": email},
        )

    def _codeFrom(self, request: VisitorRequest) -> str:
        from txtunnel.relay.login import query

        return query(request).get("code", "").strip().upper()[:16]

    async def _page(self, request: VisitorRequest) -> Answer:
        from txtunnel.relay.login import page

        email = await self.gate.apexSession(request)
        if email is None:
            return self.gate.loginRedirect(request)
        user = self._codeFrom(request)
        if await self.store.getTicket("device-user", user) is None:
            return page(400, "Unknown code", "This device code is unknown or has expired; run txtunnel login again.")
        csrf = self.gate.signer.sign("device", {"u": user, "e": email}, self.gate.now() + DEVICE_SECONDS)
        base = f"{self.gate._base(request)}/_txtunnel/device/"
        params = urlencode({"code": user, "csrf": csrf})
        return page(
            200,
            "Approve a command-line login",
            f"Log in the command-line session showing code {user} as {email}? Approve only if you started it yourself.",
            [("Approve", base + "approve?" + params), ("Deny", base + "deny?" + params)],
        )

    async def _answer(self, request: VisitorRequest, approve: bool) -> Answer:
        from txtunnel.relay.login import page, query

        email = await self.gate.apexSession(request)
        if email is None:
            return page(403, "Not logged in", "Open the device page again to log in.")
        user = self._codeFrom(request)
        csrf = self.gate.signer.unsign("device", query(request).get("csrf"), self.gate.now())
        if csrf is None or csrf.get("u") != user or csrf.get("e") != email:
            return page(403, "Not approved", "This approval link is not yours or has expired.")
        link = await self.store.takeTicket("device-user", user)
        ticket = await self.store.getTicket("device", link["device"]) if link else None
        if link is None or ticket is None or ticket["status"] != "pending":
            return page(400, "Unknown code", "This device code is unknown, expired or already answered.")
        ticket.update(status="approved" if approve else "denied", email=email)
        await self.store.putTicket("device", link["device"], ticket, ticket["expires"])
        if approve:
            return page(200, "Approved", f"The command-line session is logged in as {email}; return to it.")
        return page(200, "Denied", "The command-line session was not logged in.")

    def _claims(self, request: VisitorRequest) -> dict[str, Any] | None:
        authorization = request.head.header(b"authorization") or b""
        if not authorization.lower().startswith(b"bearer "):
            return None
        return self.gate.tokens.verify(authorization[7:].strip().decode("latin-1"), self.gate.now())

    async def _share(self, request: VisitorRequest) -> Answer:
        """
        C{txtunnel share}: the creator of a shared tunnel reads (C{GET}) or
        changes (C{POST}, C{X-Txtunnel-Add} / C{X-Txtunnel-Remove}, comma
        lists) its allow-list; the tunnel is named by C{X-Txtunnel-Tunnel}.
        The agent is told, so the list survives its reconnects.
        """
        from txtunnel.allow import parseAllow
        from txtunnel.errors import BindError
        from txtunnel.gates import validateBind
        from txtunnel.relay.pool import Pool

        claims = self._claims(request)
        if claims is None:
            return jsonAnswer(401, {"error": "invalid_token"})
        name = (request.head.header(b"x-txtunnel-tunnel") or b"").decode("latin-1").strip().lower()
        tunnel = self.gate.relay.hosts.get(name) if name else None
        entries = getattr(tunnel, "request", {}).get("allow") if tunnel is not None else None
        if tunnel is None or not isinstance(entries, list):
            return jsonAnswer(404, {"error": "no_such_tunnel", "reason": f"no shared tunnel named {name!r} here"})
        if tunnel.request.get("creator") != claims["sub"]:
            return jsonAnswer(
                403, {"error": "not_creator", "reason": "only the tunnel's creator may change who it is shared with"}
            )
        if request.head.method == b"POST":
            try:
                add = parseAllow((request.head.header(b"x-txtunnel-add") or b"").decode("latin-1"))
                remove = parseAllow((request.head.header(b"x-txtunnel-remove") or b"").decode("latin-1"))
            except ValueError as e:
                return jsonAnswer(400, {"error": "bad_list", "reason": str(e)})
            candidate = {"allow": [e for e in entries if e not in remove] + [e for e in add if e not in entries]}
            if not candidate["allow"]:
                return jsonAnswer(400, {"error": "bad_list", "reason": "a shared tunnel keeps at least one entry"})
            try:
                validateBind(self.gate.relay.gates, candidate)
            except BindError as e:
                return jsonAnswer(400, {"error": "bad_list", "reason": str(e)})
            entries = candidate["allow"]
            if isinstance(tunnel, Pool):
                tunnel.setAllow(entries)
            else:
                tunnel.request["allow"] = entries
                tunnel.session.link.sendControl({"op": "allow", "id": tunnel.id, "allow": entries})
            self.log.info("{email} changed who {name} is shared with", email=claims["sub"], name=name)
        return jsonAnswer(200, {"tunnel": name, "allow": entries})

    async def _whoami(self, request: VisitorRequest) -> Answer:
        claims = self._claims(request)
        if claims is None:
            return jsonAnswer(401, {"error": "invalid_token"})
        emails = await self.store.emailsOf(claims["sub"])
        return jsonAnswer(200, {"email": claims["sub"], "emails": emails, "expires": claims["exp"]})
