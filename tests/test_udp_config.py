"""
Agent options for UDP tunnels: C{--udp TARGET}, C{--udp-idle-timeout},
C{[tunnel:NAME] type = udp} and the C{txtunnel udp} command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.python import usage

from txtunnel import cli
from txtunnel.agent import tap as agentTap


def agentOptions(args: list[str], environ: dict[str, str] | None = None) -> agentTap.Options:
    options = agentTap.Options(environ=environ or {})
    options.parseOptions(args)
    return options


def test_udp_option() -> None:
    """
    --udp TARGET makes one udp tunnel with the default idle timeout.
    """
    options = agentOptions(["--udp", "5353"])
    assert options.tunnels == [
        {
            "name": "udp",
            "type": "udp",
            "target": ("127.0.0.1", 5353),
            "options": {"response-timeout": 120.0, "udp-idle-timeout": 60.0},
        }
    ]


def test_udp_remote_port_and_idle_timeout() -> None:
    """
    --remote-port and --udp-idle-timeout go to the udp tunnel.
    """
    options = agentOptions(["--udp", "[::1]:53", "--remote-port", "20053", "--udp-idle-timeout", "2.5"])
    [tunnel] = options.tunnels
    assert tunnel["target"] == ("::1", 53)
    assert tunnel["options"]["remote-port"] == 20053
    assert tunnel["options"]["udp-idle-timeout"] == 2.5


def test_idle_timeout_not_given_to_other_tunnels() -> None:
    """
    Tunnels of other types keep exactly their options.
    """
    options = agentOptions(["--tcp", "22", "--udp-idle-timeout", "5"])
    assert options.tunnels[0]["options"] == {"response-timeout": 120.0}


def test_udp_from_environment() -> None:
    """
    TXTUNNEL_UDP and TXTUNNEL_UDP_IDLE_TIMEOUT configure a udp tunnel.
    """
    options = agentOptions([], {"TXTUNNEL_UDP": "127.0.0.1:9999", "TXTUNNEL_UDP_IDLE_TIMEOUT": "30"})
    [tunnel] = options.tunnels
    assert tunnel["type"] == "udp"
    assert tunnel["target"] == ("127.0.0.1", 9999)
    assert tunnel["options"]["udp-idle-timeout"] == 30.0


@pytest.mark.parametrize(
    "args, words",
    [
        (["--udp", "53", "--tcp", "22"], "give only one of --tcp and --udp"),
        (["--http", "80", "--tcp", "22", "--udp", "53"], "give only one of --http, --tcp and --udp"),
        (["--udp", "nope"], "--udp: 'nope' is not a target"),
        (["--udp", "70000"], "--udp: 70000 is not a port number"),
        (["--udp", "53", "--udp-idle-timeout", "0"], "--udp-idle-timeout: '0' must be more than 0"),
        (["--udp", "53", "--udp-idle-timeout", "-3"], "--udp-idle-timeout: '-3' must be more than 0"),
        (["--udp", "53", "--udp-idle-timeout", "soon"], "--udp-idle-timeout: 'soon' is not a number of seconds"),
        (["--udp", "53", "--udp-idle-timeout", "100000"], "at most 86400 seconds"),
        (["--udp", "53", "--remote-port", "0"], "--remote-port: 0 is not a port number"),
    ],
)
def test_bad_udp_options(args: list[str], words: str) -> None:
    """
    Bad UDP options are refused naming the option and what was expected.
    """
    with pytest.raises(usage.UsageError) as e:
        agentOptions(args)
    assert words in str(e.value)


def test_nothing_to_tunnel_mentions_udp() -> None:
    """
    The error for an agent with nothing to do lists --udp among the choices.
    """
    with pytest.raises(usage.UsageError, match="--udp or --tls TARGET"):
        agentOptions([])


def test_ini_udp_tunnel(tmp_path: Path) -> None:
    """
    [tunnel:NAME] type = udp, with its own idle timeout and remote port;
    [agent] udp-idle-timeout is the default for udp sections without one.
    """
    ini = tmp_path / "agent.ini"
    ini.write_text(
        "[agent]\nrelay = ws://relay.example:8080\nudp-idle-timeout = 45\n\n"
        "[tunnel:dns]\ntype = udp\ntarget = 127.0.0.1:53\nremote-port = 20053\nudp-idle-timeout = 10\n\n"
        "[tunnel:game]\ntype = udp\ntarget = 27015\n\n"
        "[tunnel:web]\ntype = http\ntarget = 8000\n"
    )
    options = agentOptions(["--config", str(ini)])
    byName: dict[str, Any] = {t["name"]: t for t in options.tunnels}
    assert byName["dns"] == {
        "name": "dns",
        "type": "udp",
        "target": ("127.0.0.1", 53),
        "options": {"response-timeout": 120.0, "udp-idle-timeout": 10.0, "remote-port": 20053},
    }
    assert byName["game"]["options"] == {"response-timeout": 120.0, "udp-idle-timeout": 45.0}
    assert byName["web"]["options"] == {"response-timeout": 120.0}


@pytest.mark.parametrize(
    "text, words",
    [
        ("[tunnel:a]\ntype = udp\ntarget = 53\nudp-idle-timeout = 0\n", "agent.ini [tunnel:a] udp-idle-timeout: '0'"),
        ("[tunnel:a]\ntype = udp\ntarget = x\n", "agent.ini [tunnel:a] target: 'x' is not a target"),
        ("[tunnel:a]\ntype = udp\ntarget = 53\nremote-port = 99999\n", "agent.ini [tunnel:a] remote-port: 99999"),
        (
            "[tunnel:a]\ntype = tcp\ntarget = 22\nudp-idle-timeout = 5\n",
            "agent.ini [tunnel:a] udp-idle-timeout: only tunnels of type = udp have one",
        ),
        ("[agent]\nudp-idle-timeout = never\n", "agent.ini [agent] udp-idle-timeout: 'never' is not a number"),
    ],
)
def test_ini_udp_errors(tmp_path: Path, text: str, words: str) -> None:
    """
    Errors in udp sections name the file, section and key.
    """
    ini = tmp_path / "agent.ini"
    ini.write_text(text)
    with pytest.raises(usage.UsageError) as e:
        agentOptions(["--config", str(ini)])
    assert words in str(e.value)


def test_unknown_type_lists_udp(tmp_path: Path) -> None:
    """
    An unknown tunnel type is refused with the known ones, udp among them.
    """
    ini = tmp_path / "agent.ini"
    ini.write_text("[tunnel:a]\ntype = gopher\ntarget = 70\n")
    with pytest.raises(usage.UsageError, match=r"type: expected one of [a-z, ]*\budp\b"):
        agentOptions(["--config", str(ini)])


def test_txtunnel_udp_command() -> None:
    """
    'txtunnel udp TARGET' takes the target first and options after it.
    """
    options = cli.Options()
    options.parseOptions(["udp", "5353", "--remote-port", "20053", "--udp-idle-timeout", "9"])
    assert options.subCommand == "udp"
    sub: Any = options.subOptions
    [tunnel] = sub.tunnels
    assert tunnel["type"] == "udp"
    assert tunnel["target"] == ("127.0.0.1", 5353)
    assert tunnel["options"]["remote-port"] == 20053
    assert tunnel["options"]["udp-idle-timeout"] == 9.0


def test_txtunnel_udp_help_lists_udp() -> None:
    """
    The top-level help names the udp command.
    """
    assert "udp" in str(cli.Options())
    commands: list[Any] = list(cli.Options.subCommands)
    assert any(command[0] == "udp" for command in commands)
