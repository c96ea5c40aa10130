"""
Unit tests of the policy parts: IP rules, rates and their bounded tables,
sizes, header rules, the response head rewriter, tokens files, the quota
gate's month, and the policy options of the relay and agent.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python import usage

from tests.test_config import agentOptions, relayOptions
from txtunnel.errors import ConfigError
from txtunnel.headerrules import headerAdd, headerAdds, headerNames
from txtunnel.http1 import RequestFramer, RequestHead
from txtunnel.iprules import IPRules, networkList
from txtunnel.ratelimit import BucketTable, Rate, parseRate
from txtunnel.relay.policy import IPGate, RateGate, formatSize, monthEnd, monthOf, parseSize
from txtunnel.relay.tokens import hashToken, loadTokensFile
from txtunnel.rewrite import ResponseHeadRewriter

# -- IP rules


def test_ip_rules_v4_v6_and_deny_wins() -> None:
    rules = IPRules.fromLists(["10.0.0.0/8", "2001:db8::/32"], ["10.1.0.0/16", "2001:db8:bad::/48"])
    assert rules.permits("10.2.3.4")
    assert not rules.permits("10.1.2.3")  # in both: deny wins
    assert not rules.permits("192.0.2.1")  # not allowed
    assert rules.permits("2001:db8::1")
    assert not rules.permits("2001:db8:bad::1")
    assert not rules.permits("2001:db9::1")
    assert rules.permits("::ffff:10.2.3.4")  # IPv4-mapped is checked as IPv4
    assert not rules.permits("::ffff:10.1.2.3")
    assert not rules.permits("not-an-ip")  # fails closed
    assert IPRules().permits("not-an-ip")  # no rules: nothing to check
    denyOnly = IPRules.fromLists([], ["fe80::/10"])
    assert denyOnly.permits("192.0.2.1") and not denyOnly.permits("fe80::1%eth0")


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "300.1.1.1", "example.com", "10.0.0.0/8/8", "::g"])
def test_bad_networks(bad: str) -> None:
    with pytest.raises(ValueError, match="not an IP address or CIDR"):
        networkList(bad)


def test_network_lists() -> None:
    assert networkList("10.1.2.3/8, 2001:DB8::/32 192.0.2.7") == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]
    with pytest.raises(ValueError, match="at most 256"):
        networkList(["10.0.0.1"] * 257)


# -- rates


def test_parse_rate() -> None:
    assert parseRate("10/s") == Rate(10, 1)
    assert parseRate("600/m") == Rate(600, 60)
    assert parseRate("5/m:3") == Rate(5, 60, 3)
    # The burst is on top of the rate: eight at once, then five a minute.
    assert parseRate("5/m:3").capacity == 8
    assert parseRate("20/s:40").capacity == 60 and parseRate("5/m").capacity == 5
    assert str(parseRate("5/m:3")) == "5/m:3"
    for off in ("", "0", "off"):
        assert parseRate(off) is None
    for bad in ("10", "10/d", "x/s", "-1/s", "1/s:x", "inf/s", "nan/s"):
        with pytest.raises(ValueError, match="not a rate"):
            parseRate(bad)


def test_bucket_refills_and_is_bounded() -> None:
    clock = Clock()
    table = BucketTable(Rate(2, 1), clock.seconds, size=3)
    assert table.take("a") == 0 and table.take("a") == 0
    assert table.take("a") == pytest.approx(0.5)
    clock.advance(0.5)
    assert table.take("a") == 0
    for key in ("b", "c", "d", "e"):
        table.take(key)
    assert len(table) == 3  # least recently used forgotten
    assert table.wait("a") == 0  # forgotten key: full bucket again


def test_rate_gate_memory_bounded_under_many_addresses() -> None:
    from txtunnel.gates import VisitorRequest

    clock = Clock()
    gate = RateGate(clock.seconds, perIP=Rate(1, 60), size=1000)
    head = parse(b"GET / HTTP/1.1\r\nHost: a.localhost\r\n\r\n")
    for i in range(5000):
        request = VisitorRequest(head, f"10.0.{i // 256}.{i % 256}", "http", b"a.localhost", "a", object())
        assert gate.check(request) is None
    assert gate.perIP is not None and len(gate.perIP) == 1000
    again = VisitorRequest(head, "10.0.19.135", "http", b"a.localhost", "a", object())
    answer = gate.check(again)
    assert answer is not None and answer.status == 429 and ("Retry-After", "60") in answer.headers


def test_ip_gate_unit() -> None:
    from txtunnel.gates import VisitorRequest

    class Tunnel:
        request = {"type": "http", "policy": {"ip-deny": ["192.0.2.0/24"]}}

    gate = IPGate(IPRules.fromLists([], ["198.51.100.7"]))
    head = parse(b"GET / HTTP/1.1\r\nHost: a.localhost\r\n\r\n")
    tunnel = Tunnel()

    def status(ip: str) -> int | None:
        answer = gate.check(VisitorRequest(head, ip, "http", b"a.localhost", "a", tunnel))
        return None if answer is None else answer.status

    assert status("198.51.100.7") == 403
    assert status("192.0.2.9") == 403
    assert status("203.0.113.1") is None


# -- sizes, months


def test_sizes() -> None:
    assert parseSize("10MiB") == 10 * 1024 * 1024
    assert parseSize("1.5 GB") == 1_500_000_000
    assert parseSize("500") == 500
    assert parseSize("off") == 0
    for bad in ("ten", "10XB", "-5", "inf"):
        with pytest.raises(ValueError, match="not a size"):
            parseSize(bad)
    assert formatSize(10 * 1024 * 1024) == "10.0 MiB"


def test_months() -> None:
    when = 1795000000.0  # 2026-11-17
    assert monthOf(when) == "2026-11"
    assert monthOf(monthEnd(when)) == "2026-12"
    assert monthOf(monthEnd(monthEnd(when))) == "2027-01"


# -- header rules


def test_header_rules() -> None:
    assert headerAdd("X-Team:  blue ") == ("X-Team", "blue")
    assert headerAdds("X-A: 1\nX-B: 2") == ["X-A: 1", "X-B: 2"]
    assert headerNames("Cookie, X-Debug") == ["Cookie", "X-Debug"]
    for bad, words in (
        ("no colon", "not a header"),
        ("Bad Name: x", "not an HTTP header name"),
        ("Content-Length: 5", "frames or routes"),
        ("X-A: a\rb", "line break"),
    ):
        with pytest.raises(ValueError, match=words):
            headerAdd(bad)
    with pytest.raises(ValueError, match="frames or routes"):
        headerNames("Transfer-Encoding")


# -- response head rewriting


def parse(raw: bytes) -> RequestHead:
    (head,) = [e for e in RequestFramer().feed(raw) if isinstance(e, RequestHead)]
    return head


REQUESTS = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /b HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n"
RESPONSES = (
    b"HTTP/1.1 100 Continue\r\nServer: s\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 24\r\n\r\nServer: not-a-header\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 999\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nServer: s\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"c\r\nServer: evil\r\n0\r\n\r\n"
)
EXPECTED = (
    b"HTTP/1.1 100 Continue\r\nServer: s\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 24\r\nX-Frame-Options: DENY\r\n\r\nServer: not-a-header\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\nX-Frame-Options: DENY\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Frame-Options: DENY\r\n\r\n"
    b"c\r\nServer: evil\r\n0\r\n\r\n"
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(RESPONSES)), max_size=12))
def test_rewriter_any_split(cuts: list[int]) -> None:
    """
    Heads are rewritten and bodies (even ones that look like headers) kept,
    however the bytes are split; interim 1xx heads are left as they are.
    """
    rewriter = ResponseHeadRewriter([(b"X-Frame-Options", b"DENY")], [b"server", b"x-frame-options"])
    rewriter.requestData(REQUESTS)
    points = sorted(set(cuts))
    pieces = [RESPONSES[a:b] for a, b in zip([0, *points], [*points, len(RESPONSES)], strict=True)]
    assert b"".join(rewriter.responseData(p) for p in pieces) == EXPECTED


def test_rewriter_passes_upgrades_and_garbage() -> None:
    rewriter = ResponseHeadRewriter([(b"X-A", b"1")], [])
    rewriter.requestData(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
    out = rewriter.responseData(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello")
    assert out == b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello"
    assert rewriter.responseData(b"HTTP/1.1 200 OK\r\n\r\n") == b"HTTP/1.1 200 OK\r\n\r\n"
    unasked = ResponseHeadRewriter([(b"X-A", b"1")], [])
    assert unasked.responseData(b"garbage") == b"garbage" and unasked.passthrough


# -- tokens files


def test_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(
        f"# comment\n\nplain-token-1 http:alice tcp:20005\nsha256:{hashToken('other-token').hex()} tls:secure udp:53\n"
    )
    first, second = loadTokensFile(str(path))
    assert first.digest == hashToken("plain-token-1")
    assert first.reserved == {("http", "alice"), ("tcp", "20005")}
    assert second.digest == hashToken("other-token")
    assert second.reserved == {("tls", "secure"), ("udp", "53")}
    assert "plain-token-1" not in repr(first)


@pytest.mark.parametrize(
    "text, words",
    [
        ("short\n", "line 1: tokens must be at least 8"),
        ("# ok\nlong-enough-token ftp:x\n", "line 2: 'ftp:x' is not a reservation"),
        ("long-enough-token tcp:99999\n", "line 1: 99999 is not a port"),
        ("long-enough-token http:Bad_Name!\n", "line 1"),
    ],
)
def test_tokens_file_errors(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        loadTokensFile(str(path))
    with pytest.raises(ConfigError, match="cannot read tokens file"):
        loadTokensFile(str(tmp_path / "missing"))


def test_relay_with_tokens_file_refuses_bad_file(tmp_path: Path) -> None:
    from twisted.internet.testing import MemoryReactor

    from txtunnel.relay.service import Relay

    path = tmp_path / "tokens"
    path.write_text("ok-token-123 tcp:20005\n")
    options = relayOptions(["--tokens-file", str(path), "--token", "cli-token-1"])
    relay = Relay(MemoryReactor(), dict(options), {})
    assert relay.checkToken("ok-token-123") and relay.checkToken("cli-token-1")
    assert not relay.checkToken("other-token")
    assert 20005 in relay.ports.reserved


# -- options


def test_relay_policy_options(tmp_path: Path) -> None:
    ini = tmp_path / "relay.ini"
    ini.write_text(
        "[relay]\n"
        "ip-deny = 192.0.2.0/24, 2001:db8::/32\n"
        "rate-per-ip = 10/s:20\n"
        "quota-per-ip = 10MiB\n"
        "add-header =\n  X-A: 1\n  X-B: 2\n"
        "max-streams = 50\n"
        "header-timeout = 5\n"
    )
    options = relayOptions(["--config", str(ini), "--ip-allow", "10.0.0.0/8"])
    assert options["ip-deny"] == ["192.0.2.0/24", "2001:db8::/32"]
    assert options["ip-allow"] == ["10.0.0.0/8"]
    assert options["rate-per-ip"] == Rate(10, 1, 20)
    assert options["quota-per-ip"] == 10 * 1024 * 1024
    assert options["add-header"] == ["X-A: 1", "X-B: 2"]
    assert options["max-streams"] == 50 and options["header-timeout"] == 5.0
    assert options["bind-rate"] == Rate(5, 60, 3) and options["max-tunnels-per-ip"] == 10


@pytest.mark.parametrize(
    "args, words",
    [
        (["--ip-deny", "10.0.0.0/40"], "--ip-deny: '10.0.0.0/40' is not an IP address"),
        (["--rate-per-ip", "fast"], "--rate-per-ip: 'fast' is not a rate"),
        (["--quota-per-ip", "lots"], "--quota-per-ip: 'lots' is not a size"),
        (["--max-streams", "-1"], "must not be negative"),
        (["--add-header", "Host: evil"], "frames or routes"),
    ],
)
def test_relay_bad_policy_options(args: list[str], words: str) -> None:
    with pytest.raises(usage.UsageError, match=words):
        relayOptions(args)


def test_agent_policy_options_and_sections(tmp_path: Path) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text(
        "[agent]\n"
        "ip-deny = 192.0.2.0/24\n"
        "[tunnel:web]\ntype = http\ntarget = 8000\nbasic-auth = alice:pw1, bob:pw2\nrate = 5/s\n"
        "add-response-header = X-Frame-Options: DENY\n"
        "[tunnel:api]\ntype = http\ntarget = 8001\nip-deny = 198.51.100.0/24\nquota = 1GiB\n"
        "[tunnel:db]\ntype = tcp\ntarget = 5432\n"
    )
    options = agentOptions(["--config", str(ini)])
    tunnels = {t["name"]: t["options"] for t in options.tunnels}
    web = tunnels["web"]["policy"]
    assert web["ip-deny"] == ["192.0.2.0/24"] and web["rate"] == "5/s"
    assert [c.split("$")[2] for c in web["basic-auth"]] == ["alice", "bob"]
    assert "pw1" not in repr(web)
    assert web["add-response-header"] == ["X-Frame-Options: DENY"]
    assert tunnels["api"]["policy"] == {"ip-deny": ["198.51.100.0/24"], "quota": 1024**3}
    assert "policy" not in tunnels["db"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("[tunnel:db]\ntype = tcp\ntarget = 1\nbasic-auth = a:b\n", "basic-auth: only tunnels of type = http"),
        ("[tunnel:w]\ntype = http\ntarget = 1\nip-allow = nope\n", r"\[tunnel:w\] ip-allow: 'nope' is not an IP"),
        ("[tunnel:w]\ntype = http\ntarget = 1\nbasic-auth = nopassword\n", "USER:PASSWORD"),
    ],
)
def test_agent_policy_errors(tmp_path: Path, text: str, words: str) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text(text)
    with pytest.raises(usage.UsageError, match=words):
        agentOptions(["--config", str(ini)])


def test_agent_policy_only_for_http() -> None:
    with pytest.raises(usage.UsageError, match="--basic-auth applies to HTTP tunnels"):
        agentOptions(["--tcp", "22", "--basic-auth", "a:b"])
    options = agentOptions(["--http", "80", "--basic-auth", "a:b", "--remove-header", "Cookie"])
    policy: dict[str, Any] = options.tunnels[0]["options"]["policy"]
    assert policy["remove-header"] == ["Cookie"] and policy["basic-auth"][0].startswith("pbkdf2-sha256$")


def test_visitor_keys_group_ipv6_by_64() -> None:
    """
    Rates and quotas count an IPv6 visitor by its /64, IPv4 by address.
    """
    from txtunnel.iprules import visitorKey

    assert visitorKey("2001:db8:1:2:aaaa::1") == visitorKey("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert visitorKey("2001:db8:1:3::1") != visitorKey("2001:db8:1:2::1")
    assert visitorKey("10.1.2.3") == visitorKey("::ffff:10.1.2.3") == "10.1.2.3"
    assert visitorKey("10.1.2.4") != visitorKey("10.1.2.3")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=15), children, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(
    ["basic-auth", "ip-allow", "ip-deny", "add-header", "remove-header", "rate-per-ip", "rate", "quota", "x"]
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json, st.dictionaries(_keys, _json, max_size=5)), st.sampled_from(["http", "tcp", None, 5]))
def test_any_bind_policy_is_accepted_or_refused_with_a_reason(policy: Any, kind: Any) -> None:
    """
    Whatever an agent puts in a bind request's policy, the relay either
    accepts it or refuses the bind with a BindError; nothing else escapes.
    """
    from txtunnel.errors import BindError
    from txtunnel.relay.policy import TunnelPolicy, parsePolicy

    try:
        parsed = parsePolicy({"type": kind, "policy": policy})
    except BindError as e:
        assert str(e)
    else:
        assert isinstance(parsed, TunnelPolicy)


def test_documented_token_hash_command() -> None:
    """
    docs/security.rst: printf 'txtunnel-token:%s' TOKEN | sha256sum gives
    the sha256:HEX a tokens file accepts.
    """
    import subprocess

    out = subprocess.run(
        "printf 'txtunnel-token:%s' 'my-agent-token' | sha256sum", shell=True, capture_output=True, check=True
    ).stdout
    assert out.split()[0].decode() == hashToken("my-agent-token").hex()


# -- basic auth cost


def test_basic_auth_derives_at_most_one_key(monkeypatch: Any) -> None:
    """
    However many entries a tunnel lists, a header costs at most one PBKDF2:
    the entry of its user name, or (for an unknown user) a decoy with the
    first entry's salt, so the time taken does not reveal which users
    exist.  The right password still passes and a wrong one fails.
    """
    import hashlib

    from txtunnel import basicauth

    stored = [basicauth.hashCredentials(f"user{i}:pw{i}", iterations=10_000) for i in range(32)]
    calls: list[int] = []
    real = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        calls.append(iterations)
        return real(name, password, salt, iterations)

    monkeypatch.setattr(basicauth.hashlib, "pbkdf2_hmac", counting)
    for userPass, ok in (("user7:pw7", True), ("user7:bad", False), ("nobody:pw7", False), ("user31:pw31", True)):
        calls.clear()
        assert basicauth.checkCredentials(userPass, stored) is ok, userPass
        assert calls == [10_000], userPass


def test_basic_auth_limits_at_bind() -> None:
    """
    A bind cannot make each check expensive: iterations above
    MAX_ITERATIONS (200,000) are refused, and so is a user listed twice
    (each header is checked against one entry).
    """
    from txtunnel.basicauth import MAX_ITERATIONS, credentialsList, hashCredentials

    assert MAX_ITERATIONS == 200_000
    with pytest.raises(ValueError, match="between 10000 and 200000"):
        credentialsList([hashCredentials("a:b", iterations=MAX_ITERATIONS + 1)])
    credentialsList([hashCredentials("a:b", iterations=MAX_ITERATIONS)])
    with pytest.raises(ValueError, match="'alice' is listed twice"):
        credentialsList(
            [hashCredentials("alice:one", iterations=10_000), hashCredentials("alice:two", iterations=10_000)]
        )


def test_basic_auth_attempts_throttled_per_address() -> None:
    """
    Password checks from one visitor address (an IPv6 /64 counts as one)
    are limited: past twenty a minute, the gate answers 429 with
    Retry-After without hashing; another address is still checked, and a
    credential accepted before still passes (it is cached, no hash).
    """
    from txtunnel.basicauth import hashCredentials
    from txtunnel.gates import VisitorRequest
    from txtunnel.relay.policy import BasicAuthGate

    class Tunnel:
        request = {"type": "http", "policy": {"basic-auth": [hashCredentials("alice:secret", iterations=10_000)]}}

    clock = Clock()
    gate = BasicAuthGate(clock=clock.seconds)
    tunnel = Tunnel()

    def answer(ip: str, userPass: str) -> Any:
        auth = base64.b64encode(userPass.encode()).decode()
        head = parse(f"GET / HTTP/1.1\r\nHost: a.localhost\r\nAuthorization: Basic {auth}\r\n\r\n".encode())
        return gate.check(VisitorRequest(head, ip, "http", b"a.localhost", "a", tunnel))

    assert answer("2001:db8::1", "alice:secret") is None
    for i in range(19):
        assert answer(f"2001:db8::{i + 2:x}", "alice:wrong").status == 401
    limited = answer("2001:db8::ffff", "alice:wrong")
    assert limited.status == 429 and any(name == "Retry-After" for name, _ in limited.headers)
    assert answer("2001:db8::ffff", "alice:secret") is None  # accepted before: cached
    assert answer("2001:db8:0:1::1", "alice:wrong").status == 401  # another /64
    clock.advance(3)
    assert answer("2001:db8::2", "alice:wrong").status == 401
