# -*- test-case-name: tests.test_config -*-
"""
C{twistd tunnelagent}: options and service maker for the agent.
"""

from __future__ import annotations

import configparser
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from txtunnel.basicauth import hashCredentials
from txtunnel.config import ConfigOptions, adminToken, boolean, optionalFile, parseTarget, portNumber, positiveFloat
from txtunnel.errors import ConfigError
from txtunnel.exitstatus import exitWithStatus
from txtunnel.headerrules import headerAdds, headerNames
from txtunnel.iprules import networkList
from txtunnel.names import checkName
from txtunnel.ratelimit import parseRate
from txtunnel.wslink import relayEndpointString

__all__ = ["Options", "makeService"]

DEFAULT_RELAY = "ws://localhost:8080"
DEFAULT_ADMIN = "tcp:4041:interface=127.0.0.1"
DEFAULT_INSPECT = "tcp:4040:interface=127.0.0.1"

#: Visitor policy settings of an HTTP tunnel, enforced by the relay (see
#: docs/security.rst), and the response header rules the agent applies.
POLICY_KEYS = (
    "basic-auth",
    "ip-allow",
    "ip-deny",
    "add-header",
    "remove-header",
    "add-response-header",
    "remove-response-header",
    "rate-per-ip",
    "rate",
    "quota",
)
#: Keys every [tunnel:NAME] section may have, whatever its type; a type's
#: own keys are the settings its forwarder declares (L{txtunnel.plugins.Setting}).
TUNNEL_KEYS = (
    "type",
    "target",
    "subdomain",
    "remote-port",
    "response-timeout",
    "client-ca",
    "pool",
    "breaker-failures",
    "breaker-cooldown",
    "health-check",
    "health-interval",
    *POLICY_KEYS,
    "allow",
)
#: Of those, the ones the relay enforces for C{http} tunnels only.
HTTP_ONLY_KEYS = frozenset({"client-ca", "pool", *POLICY_KEYS, "allow"})
#: Options of the agent that give a value, for the one tunnel of the command
#: line or as the default of [tunnel:NAME] sections, to the forwarder
#: setting of the same name (of the built-in udp, http, sse and tls).
TYPE_OPTIONS = frozenset({"udp-idle-timeout", "sse-heartbeat", "tls-cert", "tls-key", "verify-webhook"})

#: The tunnel kinds that have their own command-line option (--http TARGET, ...).
KINDS = ("http", "tcp", "udp", "tls", "grpc", "websocket", "sse")


def endpoint(text: str) -> str:
    from txtunnel.relay.tap import endpointString

    return endpointString(text)


def relayURL(text: str) -> str:
    text = str(text).strip()
    relayEndpointString(text)
    return text


def clientCA(text: str) -> str | None:
    """
    The CA certificates in a PEM file, as PEM text for the bind request:
    only the certificates, so a key that shares the file never leaves.
    """
    from cryptography.hazmat.primitives.serialization import Encoding

    from txtunnel.certificates import CertificateError, readCertificateAuthorities

    path = optionalFile(text)
    if path is None:
        return None
    try:
        cas = readCertificateAuthorities(path)
    except CertificateError as e:
        raise ValueError(str(e)) from None
    return "".join(ca.public_bytes(Encoding.PEM).decode("ascii") for ca in cas)


def optionalText(text: str) -> str | None:
    text = str(text).strip()
    return text or None


def target(text: str) -> str:
    parseTarget(text)
    return str(text).strip()


def optionalTarget(text: str) -> str | None:
    return target(text) if str(text).strip() else None


def subdomain(text: str) -> str | None:
    return checkName(str(text).strip()) if str(text).strip() else None


def remotePort(text: str) -> int | None:
    return portNumber(text) if str(text).strip() else None


def idleTimeout(text: str) -> float:
    """
    C{--udp-idle-timeout}: the C{udp} forwarder's own setting, imported
    only when given so that C{--help} stays quick.
    """
    from txtunnel.forwarders.udp import parseIdleTimeout

    return parseIdleTimeout(text)


def basicAuthList(text: str) -> list[str]:
    """
    C{user:pass} entries (one per value, or comma/newline-separated in a
    config file), checked and hashed at once: the plain password is never
    kept or sent.
    """
    items = [i.strip() for i in str(text).replace("\n", ",").split(",") if i.strip()]
    return [hashCredentials(item) for item in items]


def rateText(text: str) -> str:
    rate = parseRate(text)
    return str(rate) if rate else ""


def sizeText(text: str) -> int:
    from txtunnel.relay.policy import parseSize

    return parseSize(text)


#: How each policy setting is checked, and whether it is a list.
POLICY_COERCERS: dict[str, Any] = {
    "basic-auth": basicAuthList,
    "ip-allow": networkList,
    "ip-deny": networkList,
    "add-header": headerAdds,
    "remove-header": headerNames,
    "add-response-header": headerAdds,
    "remove-response-header": headerNames,
    "rate-per-ip": rateText,
    "rate": rateText,
    "quota": sizeText,
}


def poolKey(text: str) -> str | None:
    """
    A pool key is a shared secret: long enough not to be guessed.
    """
    from txtunnel.relay.pool import MAX_POOL_KEY, MIN_POOL_KEY

    text = str(text).strip()
    if not text:
        return None
    if not MIN_POOL_KEY <= len(text) <= MAX_POOL_KEY:
        raise ValueError(f"a pool key must be {MIN_POOL_KEY} to {MAX_POOL_KEY} characters (it is a shared secret)")
    return text


def healthCheck(text: str) -> tuple[str, str] | None:
    from txtunnel.agent.breaker import parseHealthCheck

    return parseHealthCheck(text)


def moreThanZero(text: str) -> float:
    value = positiveFloat(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be more than 0")
    return value


def attemptCount(text: str) -> int:
    """
    Attempts in a row before giving up: a whole number, 0 for never.
    """
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number (0 for no limit)") from None
    if value < 0:
        raise ValueError(f"{text!r} must not be negative (0 for no limit)")
    return value


def fraction(text: str) -> float:
    value = positiveFloat(text)
    if value > 1:
        raise ValueError(f"{text!r} must be a fraction between 0 and 1")
    return value


def allowList(text: str) -> list[str] | None:
    """
    C{--allow}: emails and C{@domain}s, comma-separated; the tunnel is then
    shared with them only (visitors log in at the relay).
    """
    from txtunnel.allow import parseAllow

    entries = parseAllow(text)
    if not entries:
        raise ValueError("an allow-list needs at least one email address or @domain")
    return entries


def webhookVerifier(text: str) -> Any:
    """
    C{--verify-webhook KIND:SECRET}: only requests signed that way reach
    the local service.
    """
    from txtunnel.webhooks import parseVerifier

    return parseVerifier(text) if str(text).strip() else None


def _oneOf(options: list[str]) -> str:
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " and " + options[-1]


class Options(ConfigOptions):
    """
    Options of C{twistd tunnelagent} and C{txtunnel http|tcp|udp}; every one can
    also come from C{--config} (section C{[agent]}) or C{TXTUNNEL_<NAME>}.
    Several tunnels go in C{[tunnel:NAME]} sections.
    """

    synopsis = (
        "[options] (--http TARGET | --tcp TARGET | --udp TARGET | --tls TARGET | --grpc TARGET"
        " | --websocket TARGET | --sse TARGET | --config agent.ini)"
    )
    longdesc = (
        "Run a txtunnel agent: connect to a relay and expose local services through it. "
        "TARGET is PORT or HOST:PORT of the local service."
    )
    section = "agent"
    settings = (
        ("relay", DEFAULT_RELAY, relayURL),
        ("token", None, optionalText),
        ("http", None, optionalTarget),
        ("tcp", None, optionalTarget),
        ("udp", None, optionalTarget),
        ("tls", None, optionalTarget),
        ("grpc", None, optionalTarget),
        ("websocket", None, optionalTarget),
        ("sse", None, optionalTarget),
        ("subdomain", None, subdomain),
        ("remote-port", None, remotePort),
        ("response-timeout", 120.0, positiveFloat),
        ("sse-heartbeat", 15.0, positiveFloat),
        ("udp-idle-timeout", 60.0, idleTimeout),
        ("keepalive", 10.0, positiveFloat),
        ("key-file", None, optionalText),
        ("ca", None, optionalFile),
        ("insecure", False, boolean),
        ("cert", None, optionalFile),
        ("client-ca", None, clientCA),
        ("key", None, optionalFile),
        ("tls-cert", None, optionalFile),
        ("tls-key", None, optionalFile),
        ("admin", DEFAULT_ADMIN, endpoint),
        ("admin-token", None, adminToken),
        ("inspect", DEFAULT_INSPECT, endpoint),
        ("access-log", True, boolean),
        ("reconnect-initial", 0.5, moreThanZero),
        ("reconnect-max", 30.0, moreThanZero),
        ("reconnect-attempts", 0, attemptCount),
        ("reconnect-jitter", 0.2, fraction),
        ("drain-timeout", 30.0, positiveFloat),
        ("pool", None, poolKey),
        ("breaker-failures", 5, attemptCount),
        ("breaker-cooldown", 10.0, moreThanZero),
        ("health-check", None, healthCheck),
        ("health-interval", 10.0, moreThanZero),
        ("basic-auth", [], basicAuthList),
        ("ip-allow", [], networkList),
        ("ip-deny", [], networkList),
        ("add-header", [], headerAdds),
        ("remove-header", [], headerNames),
        ("add-response-header", [], headerAdds),
        ("remove-response-header", [], headerNames),
        ("rate-per-ip", "", rateText),
        ("rate", "", rateText),
        ("quota", 0, sizeText),
        ("allow", None, allowList),
        ("verify-webhook", None, webhookVerifier),
    )
    multi = frozenset(
        {
            "basic-auth",
            "ip-allow",
            "ip-deny",
            "add-header",
            "remove-header",
            "add-response-header",
            "remove-response-header",
        }
    )
    optParameters = [
        ["config", "c", None, "INI file with an [agent] section and [tunnel:NAME] sections."],
        ["relay", "r", None, f"URL of the relay (ws:// or wss://). [default: {DEFAULT_RELAY}]"],
        ["token", "t", None, "Token the relay asks for, if it asks for one."],
        ["http", None, None, "Expose the HTTP service at TARGET (PORT or HOST:PORT)."],
        ["tcp", None, None, "Expose the TCP service at TARGET (PORT or HOST:PORT)."],
        ["udp", None, None, "Expose the UDP service at TARGET (PORT or HOST:PORT)."],
        [
            "tls",
            None,
            None,
            "Expose the TLS service at TARGET by passthrough: routed by SNI at NAME.<domain> on the relay's "
            "--tls port, never decrypted.",
        ],
        [
            "grpc",
            None,
            None,
            "Expose the gRPC (or other cleartext HTTP/2) service at TARGET: every request reaches it over HTTP/2.",
        ],
        [
            "websocket",
            None,
            None,
            "Expose the WebSocket service at TARGET: only WebSocket upgrades reach it (an --http tunnel "
            "carries them too, beside plain requests).",
        ],
        [
            "sse",
            None,
            None,
            "Expose the server-sent events (text/event-stream) service at TARGET, with the --sse-heartbeat "
            "(an --http tunnel carries event streams too).",
        ],
        [
            "tls-cert",
            None,
            None,
            "For a --tls tunnel: the agent ends the visitors' TLS itself with this certificate chain "
            "(PEM, leaf first) and speaks plain TCP to the local service; the relay still sees only ciphertext.",
        ],
        ["tls-key", None, None, "The private key (PEM) of --tls-cert. [default: in the --tls-cert file]"],
        ["subdomain", "s", None, "Name to ask for: the tunnel is served at NAME.<relay domain>. [default: random]"],
        ["remote-port", "p", None, "Public port to ask for, for a TCP or UDP tunnel. [default: any free one]"],
        [
            "pool",
            None,
            None,
            "Serve the --subdomain together with the other agents given the same KEY (a shared secret of "
            "16+ characters): the relay spreads visitors over them. HTTP tunnels only.",
        ],
        [
            "response-timeout",
            None,
            None,
            "Seconds the local HTTP service may take to start answering; 0 for none. [default: 120]",
        ],
        [
            "sse-heartbeat",
            None,
            None,
            "Seconds an event stream (text/event-stream) may be idle before a comment line is sent "
            "between events to keep it open; 0 for none. [default: 15]",
        ],
        [
            "udp-idle-timeout",
            None,
            None,
            "Seconds a UDP flow may be silent before it is closed and its socket freed. [default: 60]",
        ],
        [
            "key-file",
            None,
            None,
            "File with this agent's secret key (made if missing): the relay gives the same addresses back "
            "after a reconnect and after a restart (random ones via FILE.reclaim beside it). "
            "[default: $XDG_STATE_HOME/txtunnel/agent.key]",
        ],
        [
            "keepalive",
            None,
            None,
            "Seconds between link pings; a link silent 1.5x this long is dropped (a dead link is noticed "
            "within 2x). [default: 10]",
        ],
        ["reconnect-initial", None, None, "Seconds before the first reconnect attempt. [default: 0.5]"],
        [
            "reconnect-max",
            None,
            None,
            "Longest wait between reconnect attempts; the wait doubles up to this. [default: 30]",
        ],
        [
            "reconnect-attempts",
            None,
            None,
            "Failed attempts in a row after which the agent gives up; 0 retries for ever. [default: 0]",
        ],
        [
            "reconnect-jitter",
            None,
            None,
            "Spread of each wait as a fraction (0.2 = +-20%), so agents do not all return at once. [default: 0.2]",
        ],
        [
            "breaker-failures",
            None,
            None,
            "Failures in a row to reach the local service after which visitors get 503 at once for "
            "--breaker-cooldown seconds (circuit breaker); 0 turns it off. [default: 5]",
        ],
        [
            "breaker-cooldown",
            None,
            None,
            "Seconds an open circuit answers 503 before one request is let through to test the service. [default: 10]",
        ],
        [
            "health-check",
            None,
            None,
            "Check the local service every --health-interval seconds: 'tcp' (connect) or 'http:/PATH' "
            "(GET, any status below 500 is healthy); results open and close the circuit breaker. [default: off]",
        ],
        ["health-interval", None, None, "Seconds between health checks. [default: 10]"],
        [
            "drain-timeout",
            None,
            None,
            "On shutdown (SIGTERM, Ctrl-C), seconds open streams may take to finish before the link is "
            "closed. [default: 30]",
        ],
        [
            "ca",
            None,
            None,
            "PEM file of the CA(s) a wss:// relay's certificate must chain to, for a relay with a private CA "
            "or a development one. [default: the system's trusted CAs]",
        ],
        [
            "cert",
            None,
            None,
            "PEM client certificate (and its key, unless --key is given) to present to a wss:// relay that "
            "requires one (its --agent-ca).",
        ],
        ["key", None, None, "PEM private key of --cert."],
        [
            "client-ca",
            None,
            None,
            "PEM file of the CA(s) whose client certificates visitors must present to reach this HTTP "
            "tunnel (over https:// on the relay; others get 403). [default: none needed]",
        ],
        [
            "admin",
            None,
            None,
            "Endpoint for the agent's admin site (/metrics, /health, /stats); empty turns it off. The default "
            f"port moves to the next free one if taken. [default: {DEFAULT_ADMIN}]",
        ],
        ["admin-token", None, None, "Bearer token /stats on the admin endpoint asks for. [default: none, /stats off]"],
        [
            "inspect",
            None,
            None,
            "Endpoint for the traffic inspector (web page and JSON API of the HTTP requests through this agent); "
            f"empty turns it off. The default port moves to the next free one if taken. [default: {DEFAULT_INSPECT}]",
        ],
        [
            "rate-per-ip",
            None,
            None,
            "Requests each visitor address may make to an HTTP tunnel, e.g. 10/s. [default: off]",
        ],
        ["rate", None, None, "Requests an HTTP tunnel accepts in all, e.g. 100/s or 600/m:50. [default: off]"],
        ["quota", None, None, "Bytes an HTTP tunnel may move per calendar month, e.g. 10MiB. [default: off]"],
        [
            "allow",
            None,
            None,
            "Share an HTTP tunnel only with these visitors, after they log in at the relay: emails and "
            "@domains, comma-separated, e.g. alice@example.com,@company.com. [default: anyone]",
        ],
        [
            "verify-webhook",
            None,
            None,
            "Pass only webhook requests signed with SECRET by KIND's scheme (github, stripe, slack or hmac), "
            "as KIND:SECRET; others get 401. Better given as TXTUNNEL_VERIFY_WEBHOOK than on the command line.",
        ],
    ]

    def opt_insecure(self) -> None:
        """
        Do not verify a wss:// relay's certificate or host name. For
        development only: anyone on the path can pose as the relay.
        """
        self["insecure"] = "true"

    def opt_no_access_log(self) -> None:
        """
        Log no line per HTTP request on the agent (the relay still logs its own).
        """
        self["access-log"] = "no"

    def opt_no_inspect(self) -> None:
        """
        Turn the traffic inspector off (the same as --inspect "").
        """
        self["inspect"] = ""

    def opt_basic_auth(self, value: str) -> None:
        """
        USER:PASSWORD visitors of an HTTP tunnel must give (401 until they do); repeat for several users. Only a salted hash is sent to the relay.
        """
        self["basic-auth"].append(value)

    def opt_ip_allow(self, value: str) -> None:
        """
        Only these visitor addresses (IP or CIDR, IPv4 or IPv6) may reach an HTTP tunnel; repeat or comma-separate.
        """
        self["ip-allow"].append(value)

    def opt_ip_deny(self, value: str) -> None:
        """
        Visitor addresses (IP or CIDR) refused with 403; deny wins over allow. Repeat or comma-separate.
        """
        self["ip-deny"].append(value)

    def opt_add_header(self, value: str) -> None:
        """
        'Name: value' added to each request the local service receives (replacing any the visitor sent).
        """
        self["add-header"].append(value)

    def opt_remove_header(self, value: str) -> None:
        """
        Header removed from each request before the local service sees it.
        """
        self["remove-header"].append(value)

    def opt_add_response_header(self, value: str) -> None:
        """
        'Name: value' added to each response the visitor receives (replacing any the service sent).
        """
        self["add-response-header"].append(value)

    def opt_remove_response_header(self, value: str) -> None:
        """
        Header removed from each response before the visitor sees it.
        """
        self["remove-response-header"].append(value)

    def __init__(self, environ: Any = None) -> None:
        super().__init__(environ)
        #: Tunnel specs: dicts with name, type, target and options.
        self.tunnels: list[dict[str, Any]] = []

    def checkSections(self, parser: configparser.ConfigParser, path: str) -> None:
        for name in parser.sections():
            if name != self.section and not name.startswith("tunnel:"):
                raise ConfigError(f"{path} [{name}]: unknown section; expected [agent] or [tunnel:NAME]")

    def postOptions(self) -> None:
        from txtunnel.certificates import CertificateError
        from txtunnel.tlscontext import linkClientTLS

        try:
            parser = self.loadSettings()
            self._collectTunnels(parser)
            #: TLS settings of the link, read now so a bad file is a usage error.
            self["link-tls"] = linkClientTLS(
                self["relay"], ca=self["ca"], insecure=self["insecure"], cert=self["cert"], key=self["key"]
            )
        except (ConfigError, CertificateError) as e:
            raise usage.UsageError(str(e)) from None
        if self["reconnect-initial"] > self["reconnect-max"]:
            raise usage.UsageError(
                f"--reconnect-initial ({self['reconnect-initial']:g}) must not exceed "
                f"--reconnect-max ({self['reconnect-max']:g})"
            )

    def _collectTunnels(self, parser: configparser.ConfigParser | None) -> None:
        from txtunnel.plugins import forwarders

        known = forwarders()
        given = [kind for kind in KINDS if self[kind]]
        if len(given) > 1:
            raise ConfigError(
                f"give only one of {_oneOf(['--' + kind for kind in given])}; "
                "put several tunnels in [tunnel:NAME] sections"
            )
        common = {"response-timeout": self["response-timeout"]}
        # Resilience settings only when given: the tunnels fall back to the
        # same defaults.
        for key in ("breaker-failures", "breaker-cooldown", "health-check", "health-interval"):
            if key not in self.defaulted:
                common[key] = self[key]
        if not given:
            for key in ("subdomain", "remote-port", "client-ca", "allow", "verify-webhook", "tls-cert", "tls-key"):
                if self[key] and key not in self.defaulted:
                    raise ConfigError(
                        f"--{key} applies to the tunnel given with --http, --tcp, --udp or --tls; "
                        f"in a config file put '{key} = ...' in its [tunnel:NAME] section"
                    )
        commonPolicy = {key: self[key] for key in POLICY_KEYS if self[key]}
        if given:
            kind = given[0]
            options = dict(common)
            if commonPolicy:
                if kind != "http":
                    raise ConfigError(
                        f"--{next(iter(commonPolicy))} applies to HTTP tunnels; --{kind} tunnels have no visitor policy"
                    )
                options["policy"] = commonPolicy
            if self["subdomain"]:
                options["subdomain"] = self["subdomain"]
            if self["remote-port"]:
                options["remote-port"] = self["remote-port"]
            if self["pool"]:
                options["pool"] = self["pool"]
            if self["client-ca"]:
                if kind != "http":
                    raise ConfigError("--client-ca applies to --http tunnels (the relay checks it on its HTTPS edge)")
                options["client-ca"] = self["client-ca"]
            if self["allow"]:
                if kind != "http":
                    raise ConfigError(f"--allow applies to HTTP tunnels (visitors log in with a browser), not --{kind}")
                options["allow"] = self["allow"]
            if self["verify-webhook"] and kind != "http":
                raise ConfigError(f"--verify-webhook applies to HTTP tunnels, not --{kind}")
            if (self["tls-cert"] or self["tls-key"]) and kind != "tls":
                flag = "--tls-cert" if self["tls-cert"] else "--tls-key"
                raise ConfigError(f"{flag} applies to --tls tunnels (the agent ends their TLS), not --{kind}")
            forwarder = known[kind]
            self._typeSettings(forwarder, settingsOf(forwarder, f"--{kind}"), {}, options, lambda key: f"--{key}")
            self.tunnels.append(
                {"name": self["subdomain"] or kind, "type": kind, "target": parseTarget(self[kind]), "options": options}
            )
        if parser is not None:
            path = self.configPath
            for section in parser.sections():
                if not section.startswith("tunnel:"):
                    continue
                name = section.split(":", 1)[1]
                where = f"{path} [{section}]"
                values = dict(parser.items(section))
                kind = values.get("type", "").strip()
                if kind not in known:
                    raise ConfigError(f"{where} type: expected one of {', '.join(sorted(known))}, got {kind!r}")
                forwarder = known[kind]
                declared = settingsOf(forwarder, f"{where} type: {kind}")
                for key in values:
                    if key not in TUNNEL_KEYS and key not in declared:
                        raise ConfigError(f"{where} {key}: {_notAKey(known, kind, key, declared)}")
                if "target" not in values:
                    raise ConfigError(f"{where} target: missing; expected PORT or HOST:PORT")
                options = dict(common)
                for key in ("client-ca", "allow"):
                    if kind != "http" and key in values:
                        raise ConfigError(f"{where} {key}: only tunnels of type = http have one")
                for key, coerce in (
                    ("subdomain", subdomain),
                    ("remote-port", remotePort),
                    ("response-timeout", positiveFloat),
                    ("client-ca", clientCA),
                    ("pool", poolKey),
                    ("breaker-failures", attemptCount),
                    ("breaker-cooldown", moreThanZero),
                    ("health-check", healthCheck),
                    ("health-interval", moreThanZero),
                    ("allow", allowList),
                ):
                    if key in values:
                        try:
                            options[key] = coerce(values[key])
                        except ValueError as e:
                            raise ConfigError(f"{where} {key}: {e}") from None
                self._typeSettings(forwarder, declared, values, options, _keyIn(where))
                policy = dict(commonPolicy) if kind == "http" else {}
                for key in POLICY_KEYS:
                    if key not in values:
                        continue
                    if kind != "http":
                        raise ConfigError(f"{where} {key}: only tunnels of type = http have visitor policy")
                    try:
                        policy[key] = POLICY_COERCERS[key](values[key])
                    except ValueError as e:
                        raise ConfigError(f"{where} {key}: {e}") from None
                policy = {k: v for k, v in policy.items() if v}
                if policy:
                    options["policy"] = policy
                try:
                    address = parseTarget(values["target"])
                except ValueError as e:
                    raise ConfigError(f"{where} target: {e}") from None
                self.tunnels.append({"name": name, "type": kind, "target": address, "options": options})
        for spec in self.tunnels:
            if spec["options"].get("pool"):
                if spec["type"] != "http":
                    raise ConfigError(f"tunnel {spec['name']!r}: only http tunnels can be pooled (--pool)")
                if not spec["options"].get("subdomain"):
                    raise ConfigError(
                        f"tunnel {spec['name']!r}: a pooled tunnel needs a --subdomain, the name its agents share"
                    )
        if not self.tunnels:
            raise ConfigError(
                "nothing to tunnel: give --http, --tcp, --udp or --tls TARGET, or [tunnel:NAME] sections in --config"
            )
        names = [t["name"] for t in self.tunnels]
        if len(set(names)) != len(names):
            raise ConfigError(f"two tunnels share a name: {', '.join(sorted(names))}")

    def _typeSettings(
        self,
        forwarder: Any,
        declared: dict[str, Any],
        values: dict[str, str],
        options: dict[str, Any],
        where: Callable[[str], str],
    ) -> None:
        """
        Put the settings C{forwarder} declares into a tunnel's C{options}:
        each from the tunnel's section (C{values}), else from the agent's
        option of that name (L{TYPE_OPTIONS}: command line, environment or
        C{[agent]}) when given, else its default unless that is C{None}; then
        the forwarder's optional C{checkSettings}.  C{where(key)} says where
        a key was given, for errors.
        """
        for key, setting in declared.items():
            if key in values:
                try:
                    options[key] = setting.coerce(values[key])
                except ValueError as e:
                    raise ConfigError(f"{where(key)}: {e}") from None
            elif key in TYPE_OPTIONS and key not in self.defaulted and self[key] is not None:
                options[key] = self[key]
            elif setting.default is not None:
                options[key] = setting.default
        check = getattr(forwarder, "checkSettings", None)
        if check is not None:
            try:
                check(options, where)
            except ValueError as e:
                raise ConfigError(str(e)) from None


def settingsOf(forwarder: Any, where: str) -> dict[str, Any]:
    """
    The settings C{forwarder} declares, by key (L{txtunnel.plugins.settingsOf}),
    or a L{ConfigError} at C{where} when the plugin cannot be loaded or its
    declaration is wrong.
    """
    from txtunnel.plugins import settingsOf as declared

    try:
        return declared(forwarder, frozenset(TUNNEL_KEYS))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    except Exception as e:  # an import error in a plugin's implementation, say
        raise ConfigError(f"{where}: the forwarder cannot be loaded: {e!r}") from None


def _keyIn(where: str) -> Callable[[str], str]:
    """
    How a key of the section at C{where} is named in errors.
    """
    return lambda key: f"{where} {key}"


def _notAKey(known: dict[str, Any], kind: str, key: str, declared: dict[str, Any]) -> str:
    """
    Why C{key} is refused for a tunnel of type C{kind}: the types that have
    it, or else the keys this type has.
    """
    from txtunnel.plugins import settingsOf as declaredBy

    owners = []
    for other in sorted(known):
        try:
            if key in declaredBy(known[other], frozenset(TUNNEL_KEYS)):
                owners.append(other)
        except Exception:  # noqa: S112 - a broken plugin has no say in another type's error
            continue
    if owners:
        return f"only tunnels of type = {' or '.join(owners)} have one"
    shared = TUNNEL_KEYS if kind == "http" else tuple(k for k in TUNNEL_KEYS if k not in HTTP_ONLY_KEYS)
    return f"unknown key; expected one of {', '.join((*shared, *declared))}"


def reloadAllowLists(agent: Any, path: str) -> list[str]:
    """
    Read the C{allow} keys of the C{[tunnel:NAME]} sections in C{path}
    again and send every changed list to the relay (what C{SIGHUP} does):
    a shared tunnel's visitors change without a new URL.  Other keys are
    not reloaded.

    @return: the names of the tunnels whose list changed.
    @raise ConfigError: for an unreadable file or a bad list; nothing is
        changed then.
    """
    from txtunnel.config import readINI

    parser = readINI(path)
    wanted: dict[str, list[str] | None] = {}
    for section in parser.sections():
        if section.startswith("tunnel:"):
            raw = parser.get(section, "allow", fallback=None)
            try:
                wanted[section.split(":", 1)[1]] = allowList(raw) if raw is not None else None
            except ValueError as e:
                raise ConfigError(f"{path} [{section}] allow: {e}") from None
    changed = []
    for tunnel in agent.tunnels:
        if tunnel.name not in wanted or not tunnel.options.get("allow"):
            continue
        new = wanted[tunnel.name]
        if not new:
            raise ConfigError(
                f"{path} [tunnel:{tunnel.name}] allow: a shared tunnel stays shared; restart the agent to open it"
            )
        if new != tunnel.options.get("allow"):
            tunnel.options["allow"] = new
            changed.append(tunnel.name)
            if agent.session is not None:
                agent.session.update(tunnel)
    return changed


def reloadOnHangup(agent: Any, path: str | None, reactor: Any) -> None:
    """
    Reload allow-lists from C{path} when the process gets C{SIGHUP}.
    """
    import signal

    from twisted.logger import Logger

    if path is None or not hasattr(signal, "SIGHUP"):
        return
    log = Logger()

    def reload() -> None:
        try:
            changed = reloadAllowLists(agent, path)
        except ConfigError as e:
            log.error("not reloaded: {error}", error=str(e))
            return
        log.info("reloaded {path}: allow-lists changed for {tunnels}", path=path, tunnels=", ".join(changed) or "none")

    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(reload))


def buildAgent(options: Options, reactor: Any) -> Any:
    from txtunnel.agent.service import Agent, AgentTunnel
    from txtunnel.plugins import forwarders

    known = forwarders()
    tunnels = [
        AgentTunnel(t["name"], t["type"], t["target"], t["options"], known[t["type"]], reactor) for t in options.tunnels
    ]
    from txtunnel.agent.reclaim import ReclaimFile, reclaimPath

    keyPath = agentKeyPath(options["key-file"])
    key = loadAgentKey(keyPath)
    # A key for this run only cannot get anything back on the next one.
    reclaims = ReclaimFile(reclaimPath(keyPath)) if key is not None else None
    agent = Agent(reactor, options["relay"], options["token"], tunnels, key=key, reclaims=reclaims)
    agent.linkTLS = options.get("link-tls")
    from txtunnel.credentials import LoginError, tokenFor

    relayURL = options["relay"]

    def identity() -> str | None:
        try:
            return tokenFor(relayURL)
        except LoginError:
            return None

    agent.identitySource = identity
    agent.identity = identity()
    return agent


def serviceSettings(options: Options) -> dict[str, Any]:
    """
    The keyword arguments of L{txtunnel.agent.service.AgentService} that
    come from the options (link keepalive, reconnect backoff, drain).
    """
    from txtunnel.agent.states import Backoff

    return {
        "keepalive": options["keepalive"],
        "backoff": Backoff(
            initial=options["reconnect-initial"],
            maximum=options["reconnect-max"],
            jitter=options["reconnect-jitter"],
            attempts=options["reconnect-attempts"],
        ),
        "drainTimeout": options["drain-timeout"],
    }


def agentKeyPath(path: str | None) -> str:
    """
    The agent key file: C{path}, or C{agent.key} in the user's state directory.
    """
    import os

    from txtunnel.relay.tap import defaultStateDir

    return path if path is not None else os.path.join(defaultStateDir(), "agent.key")


def loadAgentKey(path: str | None) -> str | None:
    """
    Read the agent's key from C{path} (default in the user's state
    directory), making one (mode 0600) if there is none.  When the file
    cannot be used the agent runs with a key of its own for this process,
    and says so.
    """
    import os
    import secrets

    from twisted.logger import Logger

    path = agentKeyPath(path)
    try:
        with open(path, encoding="ascii") as f:
            key = f.read().strip()
        if 16 <= len(key) <= 256:
            return key
        Logger().warn("{path} does not hold an agent key; using a new one for this run", path=path)
        return None
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        Logger().warn("cannot read the agent key {path} ({error}); using a new one for this run", path=path, error=e)
        return None
    key = secrets.token_urlsafe(32)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(key + "\n")
    except FileExistsError:
        return loadAgentKey(path)
    except OSError as e:
        Logger().warn("cannot save the agent key to {path} ({error}); using one for this run only", path=path, error=e)
    return key


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the agent's service tree from parsed L{Options}.  When the agent
    gives up (bad token, every tunnel refused) the reactor is stopped.
    """
    underTwistd = reactor is None
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from txtunnel.agent.service import AgentService

    agent = buildAgent(options, reactor)
    reactor.callWhenRunning(reloadOnHangup, agent, options.configPath, reactor)
    agent.fatalHooks.append(lambda reason: reactor.callLater(0, reactor.stop) if reactor.running else None)
    if underTwistd:
        agent.fatalHooks.append(lambda reason: exitWithStatus(1))
    agent.ready.addErrback(lambda f: None)  # fatal() has logged why
    service = AgentService(agent, **serviceSettings(options), **observeSettings(options))
    if underTwistd:
        from txtunnel.logs import twistdLogObserver

        service.logObserver = twistdLogObserver(options.parent)
    return service


def observeSettings(options: Options) -> dict[str, Any]:
    """
    The admin and inspector settings of L{AgentService}, from the options.
    """
    return {
        "admin": options["admin"],
        "adminToken": options["admin-token"],
        "adminDefaulted": "admin" in options.defaulted,
        "inspect": options["inspect"],
        "inspectDefaulted": "inspect" in options.defaulted,
        "accessLog": options["access-log"],
    }
