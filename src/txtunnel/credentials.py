# -*- test-case-name: tests.test_sharing -*-
"""
The command line's login: C{txtunnel login} runs the relay's device-code
flow (L{txtunnel.relay.device}) and keeps the token it gets, one per relay,
in C{$XDG_CONFIG_HOME/txtunnel/tokens.json} (mode 0600).  Agents started by
the same user present the token for their relay (in the link's hello), so
the relay knows who made a tunnel: its creator may always open it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

__all__ = ["LoginError", "deviceLogin", "forget", "relayBase", "remember", "tokenFor", "tokensPath", "whoami"]


class LoginError(Exception):
    """
    The login did not complete; the message is for the person.
    """


def tokensPath() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "txtunnel", "tokens.json")


def relayBase(relayURL: str) -> str:
    """
    The relay's HTTP(S) base URL for its C{ws://} or C{wss://} agent URL:
    the key tokens are kept under, and where the login endpoints are.
    """
    parts = urlsplit(relayURL)
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise LoginError(f"{relayURL!r} is not a relay URL like ws://relay.example:8080")
    return f"{scheme}://{parts.netloc.lower()}"


def _load() -> dict[str, Any]:
    try:
        with open(tokensPath(), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise LoginError(f"cannot read {tokensPath()}: {e}") from None
    return data if isinstance(data, dict) else {}


def _save(data: dict[str, Any]) -> None:
    path = tokensPath()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    temporary = path + ".new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


def remember(relayURL: str, answer: dict[str, Any]) -> dict[str, Any]:
    entry = {
        "token": answer["access_token"],
        "email": answer.get("email"),
        "expires": int(time.time()) + int(answer.get("expires_in", 0)),
    }
    data = _load()
    data[relayBase(relayURL)] = entry
    _save(data)
    return entry


def forget(relayURL: str) -> bool:
    data = _load()
    if data.pop(relayBase(relayURL), None) is None:
        return False
    _save(data)
    return True


def stored(relayURL: str) -> dict[str, Any] | None:
    try:
        entry = _load().get(relayBase(relayURL))
    except LoginError:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        return None
    if entry.get("expires", 0) <= time.time():
        return None
    return entry


def tokenFor(relayURL: str) -> str | None:
    """
    The unexpired login token for the relay at C{relayURL}, if any.
    """
    entry = stored(relayURL)
    return str(entry["token"]) if entry else None


async def deviceLogin(reactor: Any, relayURL: str, show: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    """
    Run the device-code flow against the relay: start it, C{show} the
    person where to approve it, poll until answered, keep the token.

    @return: the stored entry (token, email, expiry).
    @raise LoginError: if the relay refuses, the person denies, or the code expires.
    """
    from twisted.internet.task import deferLater

    from txtunnel.oidc import LoginFailed, fetchJSON

    base = relayBase(relayURL)
    try:
        status, start = await fetchJSON(reactor, base + "/_txtunnel/device/code", data={})
    except LoginFailed as e:
        raise LoginError(str(e)) from None
    if status != 200 or not isinstance(start, dict) or "device_code" not in start:
        raise LoginError(f"the relay at {base} does not offer login (status {status}); it needs a [provider:NAME]")
    show(start)
    interval = max(1, int(start.get("interval", 2)))
    deadline = reactor.seconds() + int(start.get("expires_in", 600)) + 5
    while reactor.seconds() < deadline:
        await deferLater(reactor, interval, lambda: None)
        try:
            status, answer = await fetchJSON(
                reactor,
                base + "/_txtunnel/device/token",
                data={},
                headers={"X-Txtunnel-Device-Code": start["device_code"]},
            )
        except LoginFailed:
            continue  # a network blip: poll again
        error = answer.get("error") if isinstance(answer, dict) else "invalid answer"
        if status == 200 and isinstance(answer, dict) and "access_token" in answer:
            return remember(relayURL, answer)
        if error == "authorization_pending":
            continue
        if error == "access_denied":
            raise LoginError("the login was denied in the browser")
        if error == "expired_token":
            raise LoginError("the login code expired before it was approved; run 'txtunnel login' again")
        raise LoginError(f"the relay refused the login: {error}")
    raise LoginError("the login code expired before it was approved; run 'txtunnel login' again")


async def whoami(reactor: Any, relayURL: str) -> dict[str, Any]:
    """
    Ask the relay who the stored token says we are.
    """
    from txtunnel.oidc import LoginFailed, fetchJSON

    token = tokenFor(relayURL)
    if token is None:
        raise LoginError(f"not logged in to {relayBase(relayURL)}; run 'txtunnel login'")
    try:
        status, answer = await fetchJSON(
            reactor, relayBase(relayURL) + "/_txtunnel/whoami", headers={"Authorization": "Bearer " + token}
        )
    except LoginFailed as e:
        raise LoginError(str(e)) from None
    if status != 200 or not isinstance(answer, dict):
        raise LoginError("the relay does not accept the stored login; run 'txtunnel login' again")
    return answer


async def share(reactor: Any, relayURL: str, tunnel: str, add: list[str], remove: list[str]) -> dict[str, Any]:
    """
    Show, or change, who the shared tunnel C{tunnel} (its name on the relay)
    is shared with; only its creator (the logged-in user whose agent made
    it) may.  The relay tells the agent, and the change applies at once.

    @return: the relay's answer: C{{"tunnel": NAME, "allow": [...]}}.
    """
    from txtunnel.oidc import LoginFailed, fetchJSON

    token = tokenFor(relayURL)
    if token is None:
        raise LoginError(f"not logged in to {relayBase(relayURL)}; run 'txtunnel login'")
    headers = {"Authorization": "Bearer " + token, "X-Txtunnel-Tunnel": tunnel}
    if add:
        headers["X-Txtunnel-Add"] = ",".join(add)
    if remove:
        headers["X-Txtunnel-Remove"] = ",".join(remove)
    try:
        status, answer = await fetchJSON(
            reactor,
            relayBase(relayURL) + "/_txtunnel/share",
            data={} if add or remove else None,
            headers=headers,
        )
    except LoginFailed as e:
        raise LoginError(str(e)) from None
    if status != 200 or not isinstance(answer, dict):
        reason = answer.get("reason") or answer.get("error") if isinstance(answer, dict) else status
        raise LoginError(f"the relay refused: {reason}")
    return answer
