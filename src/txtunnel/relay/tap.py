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

from txtunnel.config import ConfigOptions, adminToken, boolean, optionalPath, positiveFloat, tokenList
from txtunnel.errors import ConfigError
from txtunnel.exitstatus import exitWithStatus
from txtunnel.headerrules import headerAdds, headerNames
from txtunnel.iprules import networkList
from txtunnel.ratelimit import parseRate
from txtunnel.relay.policy import parseSize
from txtunnel.relay.ports import parseRange

__all__ = ["Options", "makeService"]

DEFAULT_HTTP = "tcp:8080:interface=127.0.0.1"
DEFAULT_ADMIN = "tcp:9090:interface=127.0.0.1"


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


def fileList(text: str) -> list[str]:
    """
    Comma-separated paths of files that exist (the certificate options).
    """
    paths = [os.path.abspath(os.path.expanduser(p.strip())) for p in str(text).split(",") if p.strip()]
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"{path} is not a file")
    return paths


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


def linksOver(text: str) -> str:
    """
    C{https} (agents' links only over TLS: C{wss://}) or C{any}.
    """
    value = str(text).strip().lower()
    if value not in ("https", "any"):
        raise ValueError(f"{text!r} is not https or any")
    return value


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
    multi = frozenset(
        {"token", "https-cert", "https-key", "agent-ca", "ip-allow", "ip-deny", "add-header", "remove-header"}
    )
    settings = (
        ("domain", "localhost", domainName),
        ("http", DEFAULT_HTTP, endpointString),
        ("https", "", endpointString),
        ("https-cert", [], fileList),
        ("https-key", [], fileList),
        ("https-cert-dir", None, optionalPath),
        ("agent-ca", [], fileList),
        ("tls", "", passthroughEndpoint),
        ("tcp-ports", (20000, 20099), parseRange),
        ("udp-ports", (20000, 20099), parseRange),
        ("public-interface", "127.0.0.1", interface),
        ("state-dir", defaultStateDir(), directory),
        ("token", [], tokenList),
        ("keepalive", 10.0, positiveFloat),
        ("grace", 1800.0, positiveFloat),
        ("admin", DEFAULT_ADMIN, endpointString),
        ("admin-token", None, adminToken),
        ("access-log", True, boolean),
        ("tokens-file", None, optionalPath),
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
        ("drain-timeout", 30.0, positiveFloat),
        ("session-lifetime", 43200.0, sessionLifetime),
        ("links-over", "any", linksOver),
    )
    optParameters = [
        ["config", "c", None, "INI file with a [relay] section (keys named like these options)."],
        ["domain", "d", None, "Domain tunnels are served under, as NAME.DOMAIN. [default: localhost]"],
        ["http", None, None, f"Endpoint for public HTTP and agents' links. [default: {DEFAULT_HTTP}]"],
        [
            "https",
            None,
            None,
            "Endpoint for public HTTPS (and agents' wss:// links), e.g. tcp:443 with --https-cert, or "
            "ssl:443:privateKey=key.pem:certKey=cert.pem. With no certificate the relay makes a development "
            "CA in the state directory and serves certificates from it. [default: off]",
        ],
        [
            "https-cert-dir",
            None,
            None,
            "Directory of HTTPS certificates, chosen by SNI: NAME.pem files (key and chain) or certbot-style "
            "NAME/fullchain.pem + NAME/privkey.pem.",
        ],
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
            "Bytes each tunnel (HTTP, TCP, UDP or TLS) may move per calendar month, e.g. 1GiB. [default: off]",
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
        [
            "session-lifetime",
            None,
            None,
            "Seconds a visitor's login to a shared tunnel lasts. [default: 43200]",
        ],
        [
            "links-over",
            None,
            None,
            "https: agents may link only over TLS (wss://), a plain ws:// link gets 403; any: ws:// too. "
            "[default: any]",
        ],
        [
            "keepalive",
            None,
            None,
            "Seconds between link pings; a link silent 1.5x this long is closed (a dead link is noticed "
            "within 2x). [default: 10]",
        ],
        [
            "drain-timeout",
            None,
            None,
            "On shutdown (SIGTERM), seconds requests and streams in flight may take to finish; new ones "
            "are refused (503) meanwhile. [default: 30]",
        ],
        [
            "admin",
            None,
            None,
            "Endpoint for the admin site (/metrics, /health, /stats); empty turns it off. The default port moves "
            f"to the next free one if taken. [default: {DEFAULT_ADMIN}]",
        ],
        ["admin-token", None, None, "Bearer token /stats on the admin endpoint asks for. [default: none, /stats off]"],
    ]

    def opt_no_access_log(self) -> None:
        """
        Log no access line per request or connection (metrics still count them).
        """
        self["access-log"] = "no"

    def opt_ip_allow(self, value: str) -> None:
        """
        Only these visitor addresses (IP or CIDR, IPv4 or IPv6; repeat or comma-separate) may reach any tunnel. [default: all]
        """
        self["ip-allow"].append(value)

    def opt_ip_deny(self, value: str) -> None:
        """
        Visitor addresses (IP or CIDR) refused on every tunnel (403 for HTTP); deny wins over allow.
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

    def opt_https_cert(self, value: str) -> None:
        """
        PEM certificate chain (leaf first) for --https; repeat for several,
        chosen by SNI (the first is the default). The key is in the same
        file unless --https-key is given once per --https-cert.
        """
        self["https-cert"].append(value)

    def opt_agent_ca(self, value: str) -> None:
        """
        PEM file of a CA whose client certificates agents must present
        (over wss:// on --https) to connect; repeat for several. Agents
        give theirs with --cert/--key. [default: none needed]
        """
        self["agent-ca"].append(value)

    def opt_https_key(self, value: str) -> None:
        """
        PEM private key of the --https-cert in the same position.
        """
        self["https-key"].append(value)

    def postOptions(self) -> None:
        super().postOptions()
        if not self["http"] and not self["https"]:
            raise usage.UsageError("--http and --https are both empty: the relay would have nowhere to listen")
        try:
            self._loadCertificates()
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def _loadCertificates(self) -> None:
        """
        Read every HTTPS certificate now, so a bad file is a usage error
        naming it; C{https-endpoint} is the plain endpoint TLS wraps.
        """
        from txtunnel.certificates import loadServerCertificate, serverCertificatesFromDirectory
        from txtunnel.tlscontext import splitHTTPSEndpoint

        certs, keys = self["https-cert"], self["https-key"]
        if keys and len(keys) != len(certs):
            raise ValueError(
                f"{len(keys)} --https-key for {len(certs)} --https-cert: give one key per certificate, "
                "or none when each certificate file holds its key"
            )
        if not self["https"] and (certs or self["https-cert-dir"]):
            raise ValueError("--https-cert and --https-cert-dir need --https ENDPOINT to serve them on")
        found = []
        if self["https"]:
            endpoint, certFile, keyFile, chainFile = splitHTTPSEndpoint(self["https"])
            self["https-endpoint"] = endpoint
            if certFile is not None:
                found.append(loadServerCertificate(certFile, keyFile, chainFile))
        else:
            self["https-endpoint"] = ""
        for i, cert in enumerate(certs):
            found.append(loadServerCertificate(cert, keys[i] if keys else None))
        if self["https-cert-dir"]:
            found.extend(serverCertificatesFromDirectory(self["https-cert-dir"]))
        #: Certificates for the HTTPS listener; empty means a self-signed one.
        self["https-certificates"] = found
        from txtunnel.certificates import readCertificateAuthorities

        cas = [ca for path in self["agent-ca"] for ca in readCertificateAuthorities(path, "agent CA file")]
        if cas and not self["https"]:
            raise ValueError("--agent-ca needs --https: agents present client certificates over wss:// only")
        if (
            self["links-over"] == "https"
            and not self["https"]
            and not (self["http"] and splitHTTPSEndpoint(self["http"])[1])
        ):
            raise ValueError("--links-over https needs --https (or an ssl: --http): agents could not link at all")
        #: CAs agents' client certificates must chain to.
        self["agent-cas"] = cas


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the relay's service tree from parsed L{Options}.
    """
    underTwistd = reactor is None
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from txtunnel.plugins import forwarders
    from txtunnel.relay.service import Relay, RelayService

    settings = dict(options)
    settings["providers"] = dict(options.providers)
    relay = Relay(reactor, settings, forwarders())
    service = RelayService(
        relay,
        httpDefaulted="http" in options.defaulted,
        stateDirDefaulted="state-dir" in options.defaulted,
        adminDefaulted="admin" in options.defaulted,
    )
    if underTwistd:
        from txtunnel.logs import twistdLogObserver

        service.ready.addErrback(lambda f: exitWithStatus(1))
        service.logObserver = twistdLogObserver(options.parent)
    return service
