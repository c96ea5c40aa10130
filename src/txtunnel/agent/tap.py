# -*- test-case-name: tests.test_config -*-
"""
C{twistd tunnelagent}: options and service maker for the agent.
"""

from __future__ import annotations

import configparser
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from txtunnel.config import ConfigOptions, parseTarget, portNumber, positiveFloat
from txtunnel.errors import ConfigError
from txtunnel.names import checkName
from txtunnel.wslink import relayEndpointString

__all__ = ["Options", "makeService"]

DEFAULT_RELAY = "ws://localhost:8080"

#: Keys a [tunnel:NAME] section may have.
TUNNEL_KEYS = (
    "type",
    "target",
    "subdomain",
    "remote-port",
    "response-timeout",
    "udp-idle-timeout",
    "sse-heartbeat",
    "allow",
    "verify-webhook",
)

#: The tunnel kinds that have their own command-line option (--http TARGET, ...).
KINDS = ("http", "tcp", "udp", "tls")


def relayURL(text: str) -> str:
    text = str(text).strip()
    relayEndpointString(text)
    return text


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
    Seconds a UDP flow may stay silent: more than 0 (a flow must be able to
    end, or its socket would be held for ever) and at most a day.
    """
    from txtunnel.forwarders.udp import MAX_IDLE_TIMEOUT

    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= MAX_IDLE_TIMEOUT:
        raise ValueError(f"{text!r} must be more than 0 and at most {MAX_IDLE_TIMEOUT:g} seconds")
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

    synopsis = "[options] (--http TARGET | --tcp TARGET | --udp TARGET | --tls TARGET | --config agent.ini)"
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
        ("subdomain", None, subdomain),
        ("remote-port", None, remotePort),
        ("response-timeout", 120.0, positiveFloat),
        ("sse-heartbeat", 15.0, positiveFloat),
        ("udp-idle-timeout", 60.0, idleTimeout),
        ("keepalive", 10.0, positiveFloat),
        ("key-file", None, optionalText),
        ("allow", None, allowList),
        ("verify-webhook", None, webhookVerifier),
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
        ["subdomain", "s", None, "Name to ask for: the tunnel is served at NAME.<relay domain>. [default: random]"],
        ["remote-port", "p", None, "Public port to ask for, for a TCP or UDP tunnel. [default: any free one]"],
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
            "after a reconnect, and the same --subdomain/--remote-port after a restart. "
            "[default: $XDG_STATE_HOME/txtunnel/agent.key]",
        ],
        ["keepalive", None, None, "Seconds between link pings; a link silent 2.5x this long is dropped. [default: 10]"],
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

    def __init__(self, environ: Any = None) -> None:
        super().__init__(environ)
        #: Tunnel specs: dicts with name, type, target and options.
        self.tunnels: list[dict[str, Any]] = []

    def checkSections(self, parser: configparser.ConfigParser, path: str) -> None:
        for name in parser.sections():
            if name != self.section and not name.startswith("tunnel:"):
                raise ConfigError(f"{path} [{name}]: unknown section; expected [agent] or [tunnel:NAME]")

    def postOptions(self) -> None:
        try:
            parser = self.loadSettings()
            self._collectTunnels(parser)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

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
        if not given:
            for key in ("subdomain", "remote-port", "allow", "verify-webhook"):
                if self[key] and key not in self.defaulted:
                    raise ConfigError(
                        f"--{key} applies to the tunnel given with --http, --tcp, --udp or --tls; "
                        f"in a config file put '{key} = ...' in its [tunnel:NAME] section"
                    )
        if given:
            kind = given[0]
            options = dict(common)
            if self["subdomain"]:
                options["subdomain"] = self["subdomain"]
            if self["remote-port"]:
                options["remote-port"] = self["remote-port"]
            if kind == "udp":
                options["udp-idle-timeout"] = self["udp-idle-timeout"]
            if kind == "http" and "sse-heartbeat" not in self.defaulted:
                options["sse-heartbeat"] = self["sse-heartbeat"]
            if self["allow"]:
                if kind != "http":
                    raise ConfigError(f"--allow applies to HTTP tunnels (visitors log in with a browser), not --{kind}")
                options["allow"] = self["allow"]
            if self["verify-webhook"]:
                if kind != "http":
                    raise ConfigError(f"--verify-webhook applies to HTTP tunnels, not --{kind}")
                options["verify-webhook"] = self["verify-webhook"]
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
                for key in values:
                    if key not in TUNNEL_KEYS:
                        raise ConfigError(f"{where} {key}: unknown key; expected one of {', '.join(TUNNEL_KEYS)}")
                kind = values.get("type", "").strip()
                if kind not in known:
                    raise ConfigError(f"{where} type: expected one of {', '.join(sorted(known))}, got {kind!r}")
                if "target" not in values:
                    raise ConfigError(f"{where} target: missing; expected PORT or HOST:PORT")
                options = dict(common)
                if kind == "udp":
                    options["udp-idle-timeout"] = self["udp-idle-timeout"]
                elif "udp-idle-timeout" in values:
                    raise ConfigError(f"{where} udp-idle-timeout: only tunnels of type = udp have one")
                if kind == "http" and "sse-heartbeat" not in self.defaulted:
                    options["sse-heartbeat"] = self["sse-heartbeat"]
                elif kind != "http" and "sse-heartbeat" in values:
                    raise ConfigError(f"{where} sse-heartbeat: only tunnels of type = http have one")
                for key in ("allow", "verify-webhook"):
                    if kind != "http" and key in values:
                        raise ConfigError(f"{where} {key}: only tunnels of type = http have one")
                for key, coerce in (
                    ("subdomain", subdomain),
                    ("remote-port", remotePort),
                    ("response-timeout", positiveFloat),
                    ("udp-idle-timeout", idleTimeout),
                    ("sse-heartbeat", positiveFloat),
                    ("allow", allowList),
                    ("verify-webhook", webhookVerifier),
                ):
                    if key in values:
                        try:
                            options[key] = coerce(values[key])
                        except ValueError as e:
                            raise ConfigError(f"{where} {key}: {e}") from None
                try:
                    address = parseTarget(values["target"])
                except ValueError as e:
                    raise ConfigError(f"{where} target: {e}") from None
                self.tunnels.append({"name": name, "type": kind, "target": address, "options": options})
        if not self.tunnels:
            raise ConfigError(
                "nothing to tunnel: give --http, --tcp, --udp or --tls TARGET, or [tunnel:NAME] sections in --config"
            )
        names = [t["name"] for t in self.tunnels]
        if len(set(names)) != len(names):
            raise ConfigError(f"two tunnels share a name: {', '.join(sorted(names))}")


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
    agent = Agent(reactor, options["relay"], options["token"], tunnels, key=loadAgentKey(options["key-file"]))
    from txtunnel.credentials import LoginError, tokenFor

    try:
        agent.identity = tokenFor(options["relay"])
    except LoginError:
        agent.identity = None
    return agent


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

    from txtunnel.relay.tap import defaultStateDir

    if path is None:
        path = os.path.join(defaultStateDir(), "agent.key")
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
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    from txtunnel.agent.service import AgentService

    agent = buildAgent(options, reactor)
    reactor.callWhenRunning(reloadOnHangup, agent, options.configPath, reactor)
    agent.fatalHooks.append(lambda reason: reactor.callLater(0, reactor.stop) if reactor.running else None)
    agent.ready.addErrback(lambda f: None)  # fatal() has logged why
    return AgentService(agent, keepalive=options["keepalive"])
