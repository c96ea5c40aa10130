"""
Options, config files and environment variables for relay and agent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.python import usage

from txtunnel.agent import tap as agentTap
from txtunnel.relay import tap as relayTap
from txtunnel.relay.service import hashToken


def relayOptions(args: list[str], environ: dict[str, str] | None = None) -> relayTap.Options:
    options = relayTap.Options(environ=environ or {})
    options.parseOptions(args)
    return options


def agentOptions(args: list[str], environ: dict[str, str] | None = None) -> agentTap.Options:
    options = agentTap.Options(environ=environ or {})
    options.parseOptions(args)
    return options


def test_relay_defaults(tmp_path: Path) -> None:
    """
    With no options the relay is the contract's development relay.
    """
    options = relayOptions([])
    assert options["domain"] == "localhost"
    assert options["http"] == "tcp:8080:interface=127.0.0.1"
    assert options["https"] == ""
    assert options["tcp-ports"] == (20000, 20099)
    assert options["udp-ports"] == (20000, 20099)
    assert options["token"] == []
    assert {"http", "domain", "state-dir", "token"} <= options.defaulted


def test_relay_command_line() -> None:
    """
    Every contract option is accepted and coerced; --token repeats.
    """
    options = relayOptions(
        [
            "--domain",
            "Tunnels.Example.COM",
            "--http",
            "tcp:9000",
            "--tcp-ports",
            "30000-30010",
            "--udp-ports",
            "31000-31010",
            "--token",
            "first-token",
            "--token",
            "second-token",
            "--state-dir",
            "/tmp/x",
        ]
    )
    assert options["domain"] == "tunnels.example.com"
    assert options["tcp-ports"] == (30000, 30010)
    assert options["udp-ports"] == (31000, 31010)
    assert options["token"] == ["first-token", "second-token"]
    assert options["state-dir"] == "/tmp/x"
    assert "http" not in options.defaulted


@pytest.mark.parametrize(
    "args, words",
    [
        (["--tcp-ports", "9-2"], "--tcp-ports: '9-2' is not a port range"),
        (["--tcp-ports", "abc"], "--tcp-ports: 'abc' is not a port range"),
        (["--http", "nonsense:1"], "--http: 'nonsense:1' is not a server endpoint"),
        (["--domain", "bad domain"], "--domain: 'bad domain' is not a domain name"),
        (["--token", "short"], "--token: tokens must be at least 8 characters"),
        (["--http", "", "--https", ""], "nowhere to listen"),
        (["--nope"], "option --nope not recognized"),
    ],
)
def test_relay_bad_options(args: list[str], words: str) -> None:
    """
    Bad values are rejected with a message naming the option.
    """
    with pytest.raises(usage.UsageError) as e:
        relayOptions(args)
    assert words in str(e.value)


def test_relay_ini_and_environment(tmp_path: Path) -> None:
    """
    The command line beats TXTUNNEL_* variables, which beat the file.
    """
    ini = tmp_path / "relay.ini"
    ini.write_text(
        "[relay]\ndomain = file.example\nhttp = tcp:7000\ntcp-ports = 21000-21005\ntoken = aaaaaaaa, bbbbbbbb\n"
    )
    options = relayOptions(
        ["--config", str(ini), "--http", "tcp:7002"],
        {"TXTUNNEL_RELAY_HTTP": "tcp:7001", "TXTUNNEL_RELAY_DOMAIN": "env.example", "TXTUNNEL_HTTP": "ignored"},
    )
    assert options["http"] == "tcp:7002"
    assert options["domain"] == "env.example"
    assert options["tcp-ports"] == (21000, 21005)
    assert options["token"] == ["aaaaaaaa", "bbbbbbbb"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("[relay]\ncolour = blue\n", "relay.ini [relay] colour: unknown key"),
        ("[relay]\ntcp-ports = lots\n", "relay.ini [relay] tcp-ports: 'lots' is not a port range"),
        ("[relays]\ndomain = x\n", "relay.ini [relays]: unknown section"),
        ("domain = x\n", "relay.ini: not a valid INI file"),
    ],
)
def test_relay_ini_errors_name_file_section_key(tmp_path: Path, text: str, words: str) -> None:
    """
    Errors in a config file name the file, the section and the key.
    """
    ini = tmp_path / "relay.ini"
    ini.write_text(text)
    with pytest.raises(usage.UsageError) as e:
        relayOptions(["--config", str(ini)])
    assert words in str(e.value)
    assert str(tmp_path) in str(e.value)


def test_relay_missing_config_file(tmp_path: Path) -> None:
    """
    A config file that cannot be read is named in the error.
    """
    with pytest.raises(usage.UsageError, match="cannot read config file"):
        relayOptions(["--config", str(tmp_path / "missing.ini")])


def test_environment_error_names_variable() -> None:
    """
    A bad TXTUNNEL_* value is reported with the variable's name.
    """
    with pytest.raises(usage.UsageError, match="TXTUNNEL_RELAY_TCP_PORTS: 'x' is not a port range"):
        relayOptions([], {"TXTUNNEL_RELAY_TCP_PORTS": "x"})


def test_agent_http_defaults() -> None:
    """
    One --http tunnel, relay defaulting to ws://localhost:8080.
    """
    options = agentOptions(["--http", "8000"])
    assert options["relay"] == "ws://localhost:8080"
    assert options.tunnels == [
        {"name": "http", "type": "http", "target": ("127.0.0.1", 8000), "options": {"response-timeout": 120.0}}
    ]


def test_agent_tcp_with_host_and_port() -> None:
    """
    TARGET may be HOST:PORT or [IPv6]:PORT; --remote-port goes to the tunnel.
    """
    options = agentOptions(["--tcp", "[::1]:22", "--remote-port", "20022"])
    [tunnel] = options.tunnels
    assert tunnel["target"] == ("::1", 22)
    assert tunnel["options"]["remote-port"] == 20022


@pytest.mark.parametrize(
    "args, words",
    [
        ([], "nothing to tunnel"),
        (["--http", "80", "--tcp", "22"], "only one of --http and --tcp"),
        (["--http", "notaport"], "--http: 'notaport' is not a target"),
        (["--http", "99999"], "--http: 99999 is not a port number"),
        (["--http", "80", "--subdomain", "-bad-"], "--subdomain: '-bad-' is not a valid subdomain"),
        (["--http", "80", "--relay", "ftp://x"], "--relay: relay URL 'ftp://x' must start with ws:// or wss://"),
        (["--http", "80", "--response-timeout", "-1"], "--response-timeout: '-1' must not be negative"),
    ],
)
def test_agent_bad_options(args: list[str], words: str) -> None:
    """
    Bad agent options are rejected naming the option and what was expected.
    """
    with pytest.raises(usage.UsageError) as e:
        agentOptions(args)
    assert words in str(e.value)


def test_agent_ini_with_several_tunnels(tmp_path: Path) -> None:
    """
    [tunnel:NAME] sections give one agent several tunnels.
    """
    ini = tmp_path / "agent.ini"
    ini.write_text(
        "[agent]\nrelay = ws://relay.example:8080\ntoken = abcdefgh12\n\n"
        "[tunnel:web]\ntype = http\ntarget = 8000\nsubdomain = demo\nresponse-timeout = 5\n\n"
        "[tunnel:ssh]\ntype = tcp\ntarget = 127.0.0.1:22\nremote-port = 20022\n"
    )
    options = agentOptions(["--config", str(ini)])
    assert options["relay"] == "ws://relay.example:8080"
    assert options["token"] == "abcdefgh12"
    byName: dict[str, Any] = {t["name"]: t for t in options.tunnels}
    assert byName["web"]["type"] == "http"
    assert byName["web"]["options"]["subdomain"] == "demo"
    assert byName["web"]["options"]["response-timeout"] == 5.0
    assert byName["ssh"]["target"] == ("127.0.0.1", 22)
    assert byName["ssh"]["options"]["remote-port"] == 20022


@pytest.mark.parametrize(
    "text, words",
    [
        ("[tunnel:a]\ntype = gopher\ntarget = 70\n", "agent.ini [tunnel:a] type: expected one of grpc, http, sse, tcp"),
        ("[tunnel:a]\ntype = http\n", "agent.ini [tunnel:a] target: missing"),
        ("[tunnel:a]\ntype = http\ntarget = 80\nport = 3\n", "agent.ini [tunnel:a] port: unknown key"),
        ("[tunnel:a]\ntype = tcp\ntarget = 80\nremote-port = 0\n", "agent.ini [tunnel:a] remote-port: 0 is not a port"),
        ("[tunnel:a]\ntype = http\ntarget = x\n", "agent.ini [tunnel:a] target: 'x' is not a target"),
        ("[agent]\nrelay = ws://x\ncolour = 1\n", "agent.ini [agent] colour: unknown key"),
        ("[web]\n", "agent.ini [web]: unknown section"),
    ],
)
def test_agent_ini_errors(tmp_path: Path, text: str, words: str) -> None:
    """
    Errors in agent.ini name the file, section and key.
    """
    ini = tmp_path / "agent.ini"
    ini.write_text(text)
    with pytest.raises(usage.UsageError) as e:
        agentOptions(["--config", str(ini)])
    assert words in str(e.value)


def test_builtin_types_declare_their_own_keys() -> None:
    """
    The built-in forwarders declare their type-specific keys through the
    public C{settings} (nothing the core lists for them), and no built-in
    declares a key every tunnel has.
    """
    from txtunnel.plugins import forwarders, settingsOf

    known = forwarders()
    declared = {name: set(settingsOf(f, frozenset(agentTap.TUNNEL_KEYS))) for name, f in known.items()}
    assert declared["udp"] == {"udp-idle-timeout"}
    assert declared["http"] == {"sse-heartbeat", "verify-webhook"}
    assert declared["sse"] == {"sse-heartbeat"}
    assert declared["tls"] == {"tls-cert", "tls-key"}
    assert declared["tcp"] == declared["websocket"] == declared["grpc"] == set()
    keys = {key for keys in declared.values() for key in keys}
    assert not keys & set(agentTap.TUNNEL_KEYS)
    assert all(s.doc for f in known.values() for s in settingsOf(f).values())


@pytest.mark.parametrize(
    "text, words",
    [
        (
            "[tunnel:a]\ntype = websocket\ntarget = 80\nsse-heartbeat = 3\n",
            "agent.ini [tunnel:a] sse-heartbeat: only tunnels of type = http or sse have one",
        ),
        (
            "[tunnel:a]\ntype = sse\ntarget = 80\nverify-webhook = github:0123456789\n",
            "agent.ini [tunnel:a] verify-webhook: only tunnels of type = http have one",
        ),
        ("[tunnel:a]\ntype = sse\ntarget = 80\nsse-heartbeat = soon\n", "agent.ini [tunnel:a] sse-heartbeat: 'soon'"),
        (
            "[tunnel:a]\ntype = tcp\ntarget = 80\ncolour = 1\n",
            "agent.ini [tunnel:a] colour: unknown key; expected one of type, target, subdomain, remote-port,"
            " response-timeout, breaker-failures, breaker-cooldown, health-check, health-interval",
        ),
        (
            "[tunnel:a]\ntype = udp\ntarget = 80\ncolour = 1\n",
            "health-check, health-interval, udp-idle-timeout",
        ),
    ],
)
def test_keys_are_per_type(tmp_path: Path, text: str, words: str) -> None:
    """
    A key is taken only by the types that declare it; the error for any
    other names the types that have it, or lists the keys of this type.
    """
    ini = tmp_path / "agent.ini"
    ini.write_text(text)
    with pytest.raises(usage.UsageError) as e:
        agentOptions(["--config", str(ini)])
    assert words in str(e.value)


def test_agent_wide_defaults_of_type_settings(tmp_path: Path) -> None:
    """
    An agent-wide value (C{TXTUNNEL_SSE_HEARTBEAT}) is the default of the
    setting for the types that declare it and is not given to the others;
    a section's own value wins.
    """
    ini = tmp_path / "agent.ini"
    ini.write_text(
        "[tunnel:web]\ntype = http\ntarget = 80\n\n[tunnel:events]\ntype = sse\ntarget = 81\nsse-heartbeat = 2\n\n"
        "[tunnel:ws]\ntype = websocket\ntarget = 82\n"
    )
    options = agentOptions(["--config", str(ini)], {"TXTUNNEL_SSE_HEARTBEAT": "7"})
    byName = {t["name"]: t["options"] for t in options.tunnels}
    assert byName["web"]["sse-heartbeat"] == 7.0
    assert byName["events"]["sse-heartbeat"] == 2.0
    assert "sse-heartbeat" not in byName["ws"]


def test_agent_environment() -> None:
    """
    TXTUNNEL_RELAY, TXTUNNEL_TOKEN and TXTUNNEL_HTTP configure an agent.
    """
    options = agentOptions(
        [], {"TXTUNNEL_RELAY": "wss://r.example", "TXTUNNEL_TOKEN": "tok-12345", "TXTUNNEL_HTTP": "3000"}
    )
    assert options["relay"] == "wss://r.example"
    assert options["token"] == "tok-12345"
    assert options.tunnels[0]["target"] == ("127.0.0.1", 3000)


def test_tokens_kept_hashed() -> None:
    """
    The relay keeps only token hashes, and checks candidates against them.
    """
    from twisted.internet.testing import MemoryReactor

    from txtunnel.relay.service import Relay

    options = relayOptions(["--token", "correct-token"])
    relay = Relay(MemoryReactor(), dict(options), {})
    assert relay._tokens == [hashToken("correct-token")]
    assert b"correct-token" not in b"".join(relay._tokens)
    assert relay.checkToken("correct-token")
    assert not relay.checkToken("wrong-token")
    assert not relay.checkToken(None)
    open_ = Relay(MemoryReactor(), dict(relayOptions([])), {})
    assert open_.checkToken(None)


def test_relay_url_with_a_path_is_refused() -> None:
    """
    Agents always connect to /_txtunnel, so a relay URL with another path is
    an error rather than a link that can never open.
    """
    with pytest.raises(usage.UsageError, match="must not have a path"):
        agentOptions(["--http", "80", "--relay", "ws://relay.example/tunnels"])
    assert agentOptions(["--http", "80", "--relay", "ws://relay.example/_txtunnel"])["relay"]


def test_version_is_txtunnels(capsys: Any) -> None:
    """
    --version on the relay and agent options names txtunnel, not Twisted.
    """
    import txtunnel

    with pytest.raises(SystemExit):
        relayOptions(["--version"])
    assert capsys.readouterr().out.strip() == f"txtunnel {txtunnel.__version__}"


def test_agent_tls_option() -> None:
    """
    --tls TARGET makes one tls passthrough tunnel with the asked subdomain.
    """
    options = agentOptions(["--tls", "8443", "--subdomain", "secure"])
    [tunnel] = options.tunnels
    assert tunnel["type"] == "tls"
    assert tunnel["target"] == ("127.0.0.1", 8443)
    assert tunnel["options"]["subdomain"] == "secure"


def test_subdomain_without_a_tunnel_option_is_an_error(tmp_path: Path) -> None:
    """
    --subdomain given with only a config file would be silently ignored;
    it is an error that says where the setting belongs.
    """
    ini = tmp_path / "agent.ini"
    ini.write_text("[tunnel:web]\ntype = http\ntarget = 8000\n")
    with pytest.raises(usage.UsageError, match="--subdomain applies to the tunnel given with"):
        agentOptions(["--config", str(ini), "--subdomain", "demo"])
