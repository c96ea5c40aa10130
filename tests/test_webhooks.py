"""
Webhook verification: real signed requests (curl) through a real relay and
agent; only correctly signed ones reach the local service.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.conftest import Relay, RunningAgent, curl, startAgent
from txtunnel.http1 import RequestFramer, RequestHead
from txtunnel.webhooks import MAX_BODY, TOLERANCE, parseVerifier

SECRET = "whsec_test_0123456789"
BODY = b'{"action": "opened", "number": 8}'


class Hooks(Resource):
    """
    A local service that records every body it receives.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render_POST(self, request: Any) -> bytes:
        self.bodies.append(request.content.read())
        return b"received\n"


@pytest.fixture
def hooks() -> Iterator[tuple[int, Hooks]]:
    resource = Hooks()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")  # type: ignore[attr-defined]
    yield port.getHost().port, resource
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def sign(message: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


async def post(relay: Relay, name: str, *args: str, body: bytes = BODY) -> tuple[int, str]:
    """
    POST C{body} with curl; the status and the response body.
    """
    import os
    import tempfile

    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(body)
    try:
        code, out, err = await curl(
            "-H",
            f"Host: {name}.localhost:{relay.port}",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@" + f.name,
            *args,
            "-w",
            "\n%{http_code}",
            f"http://127.0.0.1:{relay.port}/hook",
        )
    finally:
        os.unlink(f.name)
    assert code == 0, err
    text, _, status = out.decode().rpartition("\n")
    return int(status), text.strip()


async def webhookAgent(agents: list[RunningAgent], relay: Relay, port: int, name: str, spec: str) -> None:
    await startAgent(agents, relay, "--http", str(port), "--subdomain", name, "--verify-webhook", spec)


@pytest_twisted.ensureDeferred
async def test_github(relay: Relay, agents: list[RunningAgent], hooks: tuple[int, Hooks]) -> None:
    port, resource = hooks
    await webhookAgent(agents, relay, port, "gh", f"github:{SECRET}")
    assert await post(relay, "gh", "-H", f"X-Hub-Signature-256: sha256={sign(BODY)}") == (200, "received")
    status, text = await post(relay, "gh", "-H", f"X-Hub-Signature-256: sha256={sign(BODY, 'wrong-secret')}")
    assert status == 401 and "bad X-Hub-Signature-256" in text
    status, text = await post(relay, "gh")
    assert status == 401 and "missing X-Hub-Signature-256" in text
    # The signature of another body does not pass this one.
    status, _ = await post(relay, "gh", "-H", f"X-Hub-Signature-256: sha256={sign(BODY)}", body=BODY + b" ")
    assert status == 401
    assert resource.bodies == [BODY]


@pytest_twisted.ensureDeferred
async def test_stripe(relay: Relay, agents: list[RunningAgent], hooks: tuple[int, Hooks]) -> None:
    port, resource = hooks
    await webhookAgent(agents, relay, port, "stripe", f"stripe:{SECRET}")
    now = int(time.time())

    def header(stamp: int, secret: str = SECRET) -> str:
        return f"Stripe-Signature: t={stamp},v1={sign(f'{stamp}.'.encode() + BODY, secret)},v0=ignored"

    assert (await post(relay, "stripe", "-H", header(now)))[0] == 200
    status, text = await post(relay, "stripe", "-H", header(now - TOLERANCE - 10))
    assert status == 401 and "tolerance" in text
    status, text = await post(relay, "stripe", "-H", header(now, "another-secret"))
    assert status == 401 and "bad Stripe-Signature" in text
    status, text = await post(relay, "stripe", "-H", "Stripe-Signature: v1=abc")
    assert status == 401 and "malformed" in text
    assert resource.bodies == [BODY]


@pytest_twisted.ensureDeferred
async def test_slack(relay: Relay, agents: list[RunningAgent], hooks: tuple[int, Hooks]) -> None:
    port, resource = hooks
    await webhookAgent(agents, relay, port, "slack", f"slack:{SECRET}")
    now = int(time.time())

    def headers(stamp: int) -> list[str]:
        signature = sign(f"v0:{stamp}:".encode() + BODY)
        return ["-H", f"X-Slack-Request-Timestamp: {stamp}", "-H", f"X-Slack-Signature: v0={signature}"]

    assert (await post(relay, "slack", *headers(now)))[0] == 200
    status, text = await post(relay, "slack", *headers(now - 3600))
    assert status == 401 and "tolerance" in text
    status, text = await post(
        relay, "slack", "-H", f"X-Slack-Request-Timestamp: {now}", "-H", "X-Slack-Signature: v0=00"
    )
    assert status == 401 and "bad X-Slack-Signature" in text
    assert resource.bodies == [BODY]


@pytest_twisted.ensureDeferred
async def test_genericChunkedAndLimits(relay: Relay, agents: list[RunningAgent], hooks: tuple[int, Hooks]) -> None:
    """
    The generic scheme; a chunked body is checked on its data, not its
    framing; a body over the cap gets 413 and never reaches the service.
    """
    port, resource = hooks
    await webhookAgent(agents, relay, port, "mine", f"hmac:{SECRET}")
    assert (await post(relay, "mine", "-H", f"X-Signature-256: {sign(BODY)}"))[0] == 200
    chunked = ["-H", "Transfer-Encoding: chunked", "-H", f"X-Signature-256: sha256={sign(BODY)}"]
    assert (await post(relay, "mine", *chunked))[0] == 200
    big = b"x" * (MAX_BODY + 1)
    status, text = await post(relay, "mine", "-H", f"X-Signature-256: {sign(big)}", body=big)
    assert status == 413 and "at most" in text
    assert resource.bodies == [BODY, BODY]


@pytest_twisted.ensureDeferred
async def test_unsignedTunnelUnaffected(relay: Relay, agents: list[RunningAgent], hooks: tuple[int, Hooks]) -> None:
    port, resource = hooks
    await startAgent(agents, relay, "--http", str(port), "--subdomain", "plain")
    assert (await post(relay, "plain"))[0] == 200


def test_parseVerifier() -> None:
    """
    C{KIND:SECRET} (and C{hmac/HEADER:SECRET}) parse; anything else is a
    clear error; the secret never shows in the verifier's repr.
    """
    verifier = parseVerifier(f"GitHub:{SECRET}")
    assert verifier.kind == "github" and SECRET not in repr(verifier)
    assert parseVerifier(f"hmac/X-Acme-Signature:{SECRET}").header == b"x-acme-signature"
    for bad, error in (
        ("github", "expected KIND:SECRET"),
        ("gitlab:secret-123", "expected KIND:SECRET"),
        ("github:short", "at least 8"),
        (":secret-123", "expected KIND:SECRET"),
        (f"github/X-Sig:{SECRET}", "only the hmac scheme takes a header"),
        (f"hmac/X Sig:{SECRET}", "not an HTTP header name"),
        (f"hmac/Host:{SECRET}", "frames or routes"),
        (f"hmac/:{SECRET}", "not an HTTP header name"),
    ):
        with pytest.raises(ValueError, match=error):
            parseVerifier(bad)


@pytest_twisted.ensureDeferred
async def test_genericHeaderAndOddTimestamps(
    relay: Relay, agents: list[RunningAgent], hooks: tuple[int, Hooks]
) -> None:
    """
    The generic scheme reads its signature from the header named in
    C{hmac/HEADER:SECRET}; and a Stripe timestamp of superscript digits
    gets a 401 with the reason (it once reset the stream with a traceback).
    """
    from tests.conftest import inThread
    from tests.test_http_tunnel import rawExchange

    port, resource = hooks
    await webhookAgent(agents, relay, port, "acme", f"hmac/X-Acme-Signature:{SECRET}")
    assert (await post(relay, "acme", "-H", f"X-Acme-Signature: sha256={sign(BODY)}"))[0] == 200
    status, text = await post(relay, "acme", "-H", f"X-Signature-256: sha256={sign(BODY)}")
    assert status == 401 and "missing X-Acme-Signature" in text
    status, text = await post(relay, "acme", "-H", f"X-Acme-Signature: {sign(BODY, 'wrong-secret')}")
    assert status == 401 and "bad X-Acme-Signature" in text
    await webhookAgent(agents, relay, port, "odd", f"stripe:{SECRET}")
    head = (
        f"POST /hook HTTP/1.1\r\nHost: odd.localhost:{relay.port}\r\nContent-Length: 2\r\n"
        "Stripe-Signature: t=\xb2,v1=00\r\n\r\n{}"
    )
    out = await inThread(rawExchange, relay.port, head.encode("latin-1"))
    assert out.startswith(b"HTTP/1.1 401") and b"malformed Stripe-Signature" in out, out
    assert resource.bodies == [BODY]


def test_hostileHeaders() -> None:
    """
    Malformed signature headers are refused, never raise.
    """
    now = time.time()
    for kind, lines in (
        ("github", ["X-Hub-Signature-256: sha256=\xff\xfe"]),
        ("stripe", ["Stripe-Signature: t=abc,v1=00"]),
        ("stripe", ["Stripe-Signature: ,,,=,t="]),
        ("slack", ["X-Slack-Signature: v0=00", "X-Slack-Request-Timestamp: -5"]),
        ("hmac", ["X-Signature-256: sha256="]),
        # Digits to str.isdigit() that int() refuses (they once raised).
        ("stripe", ["Stripe-Signature: t=\xb2,v1=00"]),
        ("stripe", ["Stripe-Signature: t=1\xb9\xb3,v1=00"]),
        ("slack", ["X-Slack-Signature: v0=00", "X-Slack-Request-Timestamp: \xb2"]),
        # More digits than int() reads; a timestamp far past any tolerance.
        ("stripe", ["Stripe-Signature: t=" + "9" * 5000 + ",v1=00"]),
        ("slack", ["X-Slack-Signature: v0=00", "X-Slack-Request-Timestamp: " + "1" * 5000]),
        ("stripe", ["Stripe-Signature: t=+17,v1=00"]),
        ("slack", ["X-Slack-Signature: v0=00", "X-Slack-Request-Timestamp: 1_700_000_000"]),
    ):
        verifier = parseVerifier(f"{kind}:{SECRET}")
        raw = ("POST / HTTP/1.1\r\nHost: x\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n").encode("latin-1")
        (event,) = RequestFramer().feed(raw)[:1]
        assert isinstance(event, RequestHead)
        assert verifier.check(event, b"", now) is not None


@pytest_twisted.ensureDeferred
async def test_pipelinedAndMalformed(relay: Relay, agents: list[RunningAgent], hooks: tuple[int, Hooks]) -> None:
    """
    Signed requests pipelined on one connection all pass, in order; a
    malformed chunked body or a WebSocket upgrade gets a 400 and reaches
    nothing.
    """
    from tests.conftest import inThread
    from tests.test_http_tunnel import parseResponses, rawExchange

    port, resource = hooks
    await webhookAgent(agents, relay, port, "pipe", f"github:{SECRET}")
    host = f"pipe.localhost:{relay.port}"

    def request(body: bytes) -> bytes:
        return (
            f"POST /hook HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            f"X-Hub-Signature-256: sha256={sign(body)}\r\n\r\n"
        ).encode() + body

    out = await inThread(rawExchange, relay.port, request(b"one") + request(b"two") + request(b"three"))
    assert [status for status, _, _ in parseResponses(out, [b"POST"] * 3)] == [200, 200, 200]
    assert resource.bodies == [b"one", b"two", b"three"]
    bad = f"POST /hook HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n"
    out = await inThread(rawExchange, relay.port, bad.encode())
    assert out.startswith(b"HTTP/1.1 400"), out
    upgrade = f"GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    out = await inThread(rawExchange, relay.port, upgrade.encode())
    assert out.startswith(b"HTTP/1.1 400") and b"not protocol upgrades" in out, out
    assert resource.bodies == [b"one", b"two", b"three"]
