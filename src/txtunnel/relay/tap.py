# -*- test-case-name: tests.test_config -*-
"""
C{twistd tunnelrelay}: options and service maker for the relay.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from txtunnel.config import ConfigOptions, positiveFloat, tokenList
from txtunnel.headerrules import headerAdds, headerNames
from txtunnel.iprules import networkList
from txtunnel.ratelimit import parseRate
from txtunnel.relay.policy import parseSize
from txtunnel.relay.ports import parseRange

__all__ = ["Options", "makeService"]

DEFAULT_HTTP = "tcp:8080:interface=127.0.0.1"


def endpointString(text: str) -> str:
    """
    Check that C{text} is a server endpoint string Twisted can parse.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    text = str(text).strip()
    if not text:
        return ""
    try:
        serverFromString(reactor, text)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{text!r} is not a server endpoint string like tcp:8080:interface=127.0.0.1 ({e})") from None
    return text


def passthroughEndpoint(text: str) -> str:
    """
    Check a C{--tls} endpoint: any server endpoint that does not itself
    terminate TLS (the point of passthrough is that the relay does not).
    """
    text = str(text).strip()
    if text.split(":", 1)[0].lower() in ("ssl", "txsni"):
        raise ValueError(
            f"{text!r} would terminate TLS on the relay; TLS passthrough needs a plain endpoint "
            "like tcp:8443:interface=127.0.0.1 (use --https for TLS the relay terminates)"
        )
    return endpointString(text)


def domainName(text: str) -> str:
    text = str(text).strip().lower().rstrip(".")
    labels = text.split(".")
    if not text or not all(label and len(label) <= 63 for label in labels) or len(text) > 253:
        raise ValueError(f"{text!r} is not a domain name")
    if not all(c.isalnum() or c in "-." for c in text):
        raise ValueError(f"{text!r} is not a domain name")
    return text


def directory(text: str) -> str:
    return os.path.abspath(os.path.expanduser(str(text)))


def defaultStateDir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "txtunnel")


def optionalFile(text: str) -> str | None:
    text = str(text).strip()
    return os.path.abspath(os.path.expanduser(text)) if text else None


def count(text: str) -> int:
    """
    A whole number, 0 or more (0 turns the limit off).
    """
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise ValueError(f"{text!r} must not be negative")
    return value


def interface(text: str) -> str:
    import ipaddress

    text = str(text).strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address to listen on") from None
    return text


class Options(ConfigOptions):
    """
    Options of C{twistd tunnelrelay}; every one can also come from
    C{--config} (section C{[relay]}) or C{TXTUNNEL_RELAY_<NAME>}.
    """

    synopsis = "[options]"
    longdesc = (
        "Run a txtunnel relay: public HTTP(S), TCP, UDP and TLS-passthrough listeners that hand visitors' "
        "traffic to connected agents. With no options it is a development relay for "
        "*.localhost on 127.0.0.1:8080."
    )
    section = "relay"
    envPrefix = "TXTUNNEL_RELAY_"
    multi = frozenset({"token", "ip-allow", "ip-deny", "add-header", "remove-header"})
    settings = (
        ("domain", "localhost", domainName),
        ("http", DEFAULT_HTTP, endpointString),
        ("https", "", endpointString),
        ("tls", "", passthroughEndpoint),
        ("tcp-ports", (20000, 20099), parseRange),
        ("udp-ports", (20000, 20099), parseRange),
        ("public-interface", "127.0.0.1", interface),
        ("state-dir", defaultStateDir(), directory),
        ("token", [], tokenList),
        ("keepalive", 10.0, positiveFloat),
        ("grace", 1800.0, positiveFloat),
        ("tokens-file", None, optionalFile),
        ("ip-allow", [], networkList),
        ("ip-deny", [], networkList),
        ("add-header", [], headerAdds),
        ("remove-header", [], headerNames),
        ("rate-per-ip", None, parseRate),
        ("rate-per-tunnel", None, parseRate),
        ("rate-total", None, parseRate),
        ("quota-per-ip", 0, parseSize),
        ("quota-per-tunnel", 0, parseSize),
        ("max-streams", 1000, count),
        ("max-tunnels-per-ip", 10, count),
        ("bind-rate", parseRate("5/m:3"), parseRate),
        ("header-timeout", 20.0, positiveFloat),
        ("idle-timeout", 60.0, positiveFloat),
    )
    optParameters = [
        ["config", "c", None, "INI file with a [relay] section (keys named like these options)."],
        ["domain", "d", None, "Domain tunnels are served under, as NAME.DOMAIN. [default: localhost]"],
        ["http", None, None, f"Endpoint for public HTTP and agents' links. [default: {DEFAULT_HTTP}]"],
        ["https", None, None, "Endpoint for public HTTPS, e.g. ssl:443:privateKey=key.pem:certKey=cert.pem."],
        [
            "tls",
            None,
            None,
            "Endpoint for TLS passthrough tunnels, routed by SNI and never decrypted, "
            "e.g. tcp:8443:interface=127.0.0.1. [default: off]",
        ],
        ["tcp-ports", None, None, "Range of public ports for TCP tunnels. [default: 20000-20099]"],
        ["udp-ports", None, None, "Range of public ports for UDP tunnels. [default: 20000-20099]"],
        ["public-interface", None, None, "Address the TCP/UDP tunnel ports listen on. [default: 127.0.0.1]"],
        ["state-dir", None, None, "Where the relay keeps its state. [default: $XDG_STATE_HOME/txtunnel]"],
        [
            "grace",
            None,
            None,
            "Seconds a disconnected agent's names and ports are kept for it to reconnect to; 0 frees "
            "them at once. [default: 1800]",
        ],
        ["keepalive", None, None, "Seconds between link pings; a link silent 2.5x this long is closed. [default: 10]"],
        [
            "tokens-file",
            None,
            None,
            "File of agent tokens, one a line (plain or sha256:HEX), each followed by the names and ports it "
            "reserves (http:NAME tls:NAME tcp:PORT udp:PORT).",
        ],
        ["rate-per-ip", None, None, "Requests each visitor address may make, e.g. 10/s or 600/m:100. [default: off]"],
        ["rate-per-tunnel", None, None, "Requests each HTTP tunnel may receive, e.g. 100/s. [default: off]"],
        ["rate-total", None, None, "Requests the whole relay accepts, e.g. 1000/s. [default: off]"],
        [
            "quota-per-ip",
            None,
            None,
            "Bytes each visitor address may move per calendar month, e.g. 10MiB. [default: off]",
        ],
        [
            "quota-per-tunnel",
            None,
            None,
            "Bytes each HTTP tunnel may move per calendar month, e.g. 1GiB. [default: off]",
        ],
        [
            "max-streams",
            None,
            None,
            "Visitor connections one agent's link may carry at once; 0 for no limit. [default: 1000]",
        ],
        ["max-tunnels-per-ip", None, None, "Tunnels the agents of one address may hold; 0 for no limit. [default: 10]"],
        [
            "bind-rate",
            None,
            None,
            "New tunnels one agent address may open, RATE/UNIT:BURST; off for none. [default: 5/m:3]",
        ],
        [
            "header-timeout",
            None,
            None,
            "Seconds a visitor may take to send a request head once begun (408 after); 0 for none. [default: 20]",
        ],
        [
            "idle-timeout",
            None,
            None,
            "Seconds a visitor connection may sit with no request and no response owed; 0 for none. [default: 60]",
        ],
    ]

    def opt_ip_allow(self, value: str) -> None:
        """
        Only these visitor addresses (IP or CIDR, IPv4 or IPv6; repeat or comma-separate) may reach any HTTP tunnel. [default: all]
        """
        self["ip-allow"].append(value)

    def opt_ip_deny(self, value: str) -> None:
        """
        Visitor addresses (IP or CIDR) refused with 403 on every HTTP tunnel; deny wins over allow.
        """
        self["ip-deny"].append(value)

    def opt_add_header(self, value: str) -> None:
        """
        'Name: value' added to every request a local service receives (a visitor's header of that name is replaced). Repeat for more.
        """
        self["add-header"].append(value)

    def opt_remove_header(self, value: str) -> None:
        """
        Header removed from every request before it reaches a local service. Repeat for more.
        """
        self["remove-header"].append(value)

    def opt_token(self, value: str) -> None:
        """
        A token agents must present (repeat for several; comma-separated in
        config and TXTUNNEL_RELAY_TOKEN). With none, any agent may connect.
        """
        self["token"].append(value)

    def postOptions(self) -> None:
        super().postOptions()
        if not self["http"] and not self["https"]:
            raise usage.UsageError("--http and --https are both empty: the relay would have nowhere to listen")


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the relay's service tree from parsed L{Options}.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from txtunnel.plugins import forwarders
    from txtunnel.relay.service import Relay, RelayService

    settings = dict(options)
    relay = Relay(reactor, settings, forwarders())
    return RelayService(
        relay,
        httpDefaulted="http" in options.defaulted,
        stateDirDefaulted="state-dir" in options.defaulted,
    )
