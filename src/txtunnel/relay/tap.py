# -*- test-case-name: tests.test_config -*-
"""
C{twistd tunnelrelay}: options and service maker for the relay.
"""

from __future__ import annotations

import configparser
import os
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from txtunnel.config import ConfigOptions, positiveFloat, tokenList
from txtunnel.errors import ConfigError
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


def sessionLifetime(text: str) -> float:
    value = positiveFloat(text)
    if not 60 <= value <= 90 * 86400:
        raise ValueError(f"{text!r} must be between 60 seconds and 90 days")
    return value


#: Keys a [provider:NAME] section may have.
PROVIDER_KEYS = ("type", "issuer", "client-id", "client-secret", "scopes", "label", "audience", "api-url")


def providerSection(section: str, values: dict[str, str], path: str, environ: Any) -> dict[str, str]:
    """
    Check one C{[provider:NAME]} section: an OpenID Connect provider found
    by its C{issuer} (or full discovery URL), with the relay's C{client-id}
    and C{client-secret} there (the secret may instead come from
    C{TXTUNNEL_RELAY_PROVIDER_<NAME>_CLIENT_SECRET}).
    """
    from urllib.parse import urlsplit

    name = section.split(":", 1)[1]
    where = f"{path} [{section}]"
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ConfigError(f"{where}: a provider name is letters, digits, '-' and '_'")
    for key in values:
        if key not in PROVIDER_KEYS:
            raise ConfigError(f"{where} {key}: unknown key; expected one of {', '.join(PROVIDER_KEYS)}")
    checked = {k: v.strip() for k, v in values.items()}
    kind = checked.setdefault("type", "oidc")
    if kind not in ("oidc", "github"):
        raise ConfigError(f"{where} type: expected oidc or github, got {kind!r}")
    if kind == "github":
        checked.setdefault("issuer", "https://github.com")
        checked.setdefault("api-url", "https://api.github.com")
        for key in ("scopes", "audience"):
            if key in checked:
                raise ConfigError(f"{where} {key}: only OpenID Connect providers have one")
    elif "api-url" in checked:
        raise ConfigError(f"{where} api-url: only type = github has one")
    envSecret = "TXTUNNEL_RELAY_PROVIDER_" + name.upper().replace("-", "_") + "_CLIENT_SECRET"
    if envSecret in environ:
        checked["client-secret"] = environ[envSecret].strip()
    for key in ("issuer", "client-id", "client-secret"):
        if not checked.get(key):
            raise ConfigError(f"{where} {key}: missing")
    for key in ("issuer", "api-url"):
        if key in checked:
            url = urlsplit(checked[key])
            if url.scheme not in ("https", "http") or not url.netloc:
                raise ConfigError(f"{where} {key}: expected the provider's https:// URL, got {checked[key]!r}")
    if "openid" not in checked.get("scopes", "openid email").split():
        raise ConfigError(f"{where} scopes: must include openid")
    return checked


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
    multi = frozenset({"token"})
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
        ("session-lifetime", 43200.0, sessionLifetime),
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
            "session-lifetime",
            None,
            None,
            "Seconds a visitor's login to a shared tunnel lasts. [default: 43200]",
        ],
    ]

    def __init__(self, environ: Any = None) -> None:
        super().__init__(environ)
        #: Login providers from [provider:NAME] sections, by name.
        self.providers: dict[str, dict[str, str]] = {}

    def checkSections(self, parser: configparser.ConfigParser, path: str) -> None:
        for name in parser.sections():
            if name == self.section:
                continue
            if not name.startswith("provider:"):
                raise ConfigError(f"{path} [{name}]: unknown section; expected [relay] or [provider:NAME]")
            self.providers[name.split(":", 1)[1]] = providerSection(name, dict(parser.items(name)), path, self.environ)

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
    settings["providers"] = dict(options.providers)
    relay = Relay(reactor, settings, forwarders())
    return RelayService(
        relay,
        httpDefaulted="http" in options.defaulted,
        stateDirDefaulted="state-dir" in options.defaulted,
    )
