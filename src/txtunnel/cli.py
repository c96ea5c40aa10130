# -*- test-case-name: tests.test_contract -*-
"""
C{txtunnel}: the command people type.

    txtunnel http 8000 [--subdomain demo] [--relay ws://relay.example:8080]
    txtunnel tcp 22 [--remote-port 20022]
    txtunnel udp 53 [--remote-port 20053] [--udp-idle-timeout 60]
    txtunnel relay [relay options]
    txtunnel demo

Each runs in the foreground with short, readable log lines on stderr and
stops cleanly on Ctrl-C.  The same options work with C{twistd tunnelagent}
and C{twistd tunnelrelay}.
"""

from __future__ import annotations

import getopt
import sys
from typing import Any, TextIO

from twisted.logger import LogLevel
from twisted.python import usage

import txtunnel
from txtunnel.agent import tap as agentTap
from txtunnel.config import ConfigOptions
from txtunnel.logs import FORMATS, startLogging
from txtunnel.relay import tap as relayTap

__all__ = ["main"]


def interspersed(options: usage.Options, args: list[str]) -> list[str]:
    """
    Reorder C{args} so options come before positional arguments, as GNU
    getopt allows; Twisted's parser stops at the first positional one.
    """
    try:
        found, rest = getopt.gnu_getopt(args, options.shortOpt, options.longOpt)
    except getopt.GetoptError as e:
        raise usage.UsageError(str(e)) from None
    flat: list[str] = []
    for name, value in found:
        takesValue = (
            (name[2:] + "=") in options.longOpt if name.startswith("--") else (name[1] + ":") in options.shortOpt
        )
        flat.extend([name, value] if takesValue else [name])
    return flat + rest


def logFormat(text: str) -> str:
    if text not in FORMATS:
        raise usage.UsageError(f"--log-format must be one of {', '.join(FORMATS)}, not {text!r}")
    return text


#: Logging options every command takes too ('txtunnel http 8000 -v').
LOG_FLAGS: list[list[Any]] = [
    ["verbose", "v", "Log debug messages too."],
    ["quiet", "q", "Log warnings and errors only."],
]
LOG_PARAMETERS: list[list[Any]] = [
    ["log-format", None, None, "Log lines as text (for people) or json (one object per line).", logFormat]
]


def _agentCommand(kind: str) -> type[agentTap.Options]:
    class Command(agentTap.Options):
        optFlags = [
            *LOG_FLAGS,
            ["no-console", None, "Log plain lines even when standard output is a terminal (no live status screen)."],
        ]
        optParameters = LOG_PARAMETERS
        synopsis = "TARGET [options]"
        longdesc = f"Expose the local {kind.upper()} service at TARGET (PORT or HOST:PORT) through a relay."

        def parseOptions(self, options: Any = None) -> None:
            # People type the target first: 'txtunnel http 8000 --subdomain demo'.
            super().parseOptions(interspersed(self, sys.argv[1:] if options is None else options))

        def parseArgs(self, target: str) -> None:  # type: ignore[override]
            self[kind] = target

    Command.__name__ = f"{kind.upper()}Command"
    return Command


class RelayCommand(relayTap.Options):
    optFlags = LOG_FLAGS
    optParameters = LOG_PARAMETERS


class DemoOptions(usage.Options):
    optFlags = LOG_FLAGS
    synopsis = "[options]"
    opt_version = ConfigOptions.opt_version
    longdesc = (
        "Start a development relay, a small local web page and an agent that tunnels it, "
        "all in this process, and print the public URL."
    )
    optParameters = [["subdomain", "s", "demo", "Name of the demo tunnel."], *LOG_PARAMETERS]


class LoginOptions(usage.Options):
    """
    C{txtunnel login|logout|whoami}: which relay.
    """

    synopsis = "[--relay URL]"
    opt_version = ConfigOptions.opt_version
    optParameters = [
        [
            "relay",
            "r",
            None,
            f"URL of the relay (ws:// or wss://). [default: $TXTUNNEL_RELAY or {agentTap.DEFAULT_RELAY}]",
        ]
    ]

    def postOptions(self) -> None:
        import os

        self["relay"] = self["relay"] or os.environ.get("TXTUNNEL_RELAY") or agentTap.DEFAULT_RELAY
        from txtunnel.credentials import LoginError, relayBase

        try:
            relayBase(self["relay"])
        except LoginError as e:
            raise usage.UsageError(str(e)) from None


class LoginCommand(LoginOptions):
    longdesc = (
        "Log in to a relay with its device-code flow: approve the code in a browser (the relay's login "
        "provider), and the token is kept in $XDG_CONFIG_HOME/txtunnel/tokens.json for agents to use."
    )
    optFlags = [["no-browser", None, "Print the URL to open instead of opening a browser."]]


class ShareCommand(LoginOptions):
    synopsis = "(list NAME | add NAME ENTRY... | remove NAME ENTRY...) [--relay URL]"
    longdesc = (
        "Show or change who a running shared tunnel is shared with, at once and without a new URL. "
        "NAME is the tunnel's name on the relay (web in http://web.example.com/); ENTRY is an email or "
        "@domain. Only the tunnel's creator (logged in with 'txtunnel login' when the agent started) may."
    )

    def parseArgs(self, action: str = "", name: str = "", *entries: str) -> None:  # type: ignore[override]
        from txtunnel.allow import parseAllow

        if action not in ("list", "add", "remove") or not name:
            raise usage.UsageError("give list NAME, add NAME ENTRY... or remove NAME ENTRY...")
        if (action == "list") != (not entries):
            raise usage.UsageError("list takes no entries; add and remove take one or more")
        try:
            self["entries"] = parseAllow(list(entries))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["action"], self["name"] = action, name.lower()

    def parseOptions(self, options: Any = None) -> None:
        super().parseOptions(interspersed(self, sys.argv[1:] if options is None else options))


class Options(usage.Options):
    synopsis = "Usage: txtunnel [-v|-q] [--log-format text|json] COMMAND [options]"
    longdesc = "txtunnel: share local services through a relay. Run 'txtunnel COMMAND --help' for a command's options."
    subCommands = [
        ["http", None, _agentCommand("http"), "Expose a local HTTP service."],
        ["tcp", None, _agentCommand("tcp"), "Expose a local TCP service."],
        ["udp", None, _agentCommand("udp"), "Expose a local UDP service."],
        ["tls", None, _agentCommand("tls"), "Expose a local TLS service by passthrough (SNI routing)."],
        ["grpc", None, _agentCommand("grpc"), "Expose a local gRPC (cleartext HTTP/2) service."],
        ["websocket", None, _agentCommand("websocket"), "Expose a local WebSocket service (upgrades only)."],
        ["sse", None, _agentCommand("sse"), "Expose a local server-sent events service, with a heartbeat."],
        ["relay", None, RelayCommand, "Run a relay in the foreground."],
        ["demo", None, DemoOptions, "Run a relay, a demo page and an agent together."],
        ["login", None, LoginCommand, "Log in to a relay (device code in a browser)."],
        ["logout", None, LoginOptions, "Forget the login token for a relay."],
        ["whoami", None, LoginOptions, "Show who the stored login token for a relay says you are."],
        ["share", None, ShareCommand, "Show or change who a running shared tunnel is shared with."],
    ]
    optFlags = LOG_FLAGS
    optParameters = LOG_PARAMETERS

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        print(f"txtunnel {txtunnel.__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError(
                "a command is needed: http, tcp, udp, tls, grpc, websocket, sse, relay, demo, login, logout, whoami or share"
            )


def wantsConsole(command: str | None, sub: Any, format: str, out: Any) -> bool:
    """
    Whether to show the live status screen: an agent command, text logs,
    standard output a terminal, and no C{--no-console}.
    """
    if command not in agentTap.KINDS or format != "text" or sub.get("no-console"):
        return False
    isatty = getattr(out, "isatty", None)
    return bool(isatty is not None and isatty())


def logSettings(options: usage.Options) -> tuple[LogLevel, str]:
    """
    The log level and format from the options given before or after the
    command (the command's win).
    """
    sub: Any = options.subOptions or {}
    verbose = options["verbose"] or sub.get("verbose")
    # login, logout, whoami and share print their own lines.
    quiet = options["quiet"] or sub.get("quiet") or options.subCommand in ("login", "logout", "whoami", "share")
    level = LogLevel.debug if verbose else LogLevel.warn if quiet else LogLevel.info
    return level, sub.get("log-format") or options["log-format"] or "text"


def _runAgent(options: agentTap.Options, reactor: Any, console: Any = None) -> int:
    from txtunnel.agent.service import AgentService

    agent = agentTap.buildAgent(options, reactor)
    code = [0]

    def fatal(reason: str) -> None:
        code[0] = 1
        if reactor.running:
            reactor.callLater(0, reactor.stop)

    agent.fatalHooks.append(fatal)
    agent.ready.addErrback(lambda f: None)  # fatal() has logged why
    settings = {**agentTap.serviceSettings(options), **agentTap.observeSettings(options)}
    if console is not None:
        settings["accessLog"] = False  # the status screen lists the requests
    service = AgentService(agent, **settings)
    reactor.callWhenRunning(agentTap.reloadOnHangup, agent, options.configPath, reactor)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    if console is not None:
        from txtunnel.console import StatusScreen

        def inspector() -> str | None:
            return f"http://127.0.0.1:{service.inspectPort}/" if service.inspectPort else None

        screen = StatusScreen(agent, console, reactor, inspector)
        reactor.callWhenRunning(screen.start)
        reactor.addSystemEventTrigger("before", "shutdown", screen.stop)
    reactor.run()
    return code[0]


def _runRelay(options: relayTap.Options, reactor: Any) -> int:
    service: Any = relayTap.makeService(options, reactor)
    code = [0]
    service.ready.addErrback(lambda f: code.__setitem__(0, 1))
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return code[0]


def _stop(reactor: Any) -> None:
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # something else stopped it first, e.g. the relay failing to listen


def _runDemo(options: DemoOptions, reactor: Any) -> int:
    from twisted.internet.defer import inlineCallbacks
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.logger import Logger
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from txtunnel.agent.service import AgentService

    log = Logger(namespace="txtunnel.demo")

    class Page(Resource):
        isLeaf = True
        hits = 0

        def render_GET(self, request: Any) -> bytes:
            Page.hits += 1
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            forwarded = (request.getHeader(b"x-forwarded-for") or b"?").decode()
            return f"Hello from behind txtunnel! Visit #{Page.hits}, you came from {forwarded}.\n".encode()

    site = Site(Page())
    site.noisy = False
    relayOptions = relayTap.Options()
    relayOptions.parseOptions([])
    relayService: Any = relayTap.makeService(relayOptions, reactor)
    code = [0]

    @inlineCallbacks
    def start() -> Any:
        relayService.startService()
        try:
            yield relayService.ready
        except Exception:
            code[0] = 1
            _stop(reactor)
            return
        page = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        localPort = page.getHost().port
        log.info("demo page listening on http://127.0.0.1:{port}/", port=localPort)
        agentOptions = agentTap.Options()
        agentOptions.parseOptions(
            [
                "--relay",
                f"ws://127.0.0.1:{relayService.relay.httpPort}",
                "--http",
                str(localPort),
                "--subdomain",
                options["subdomain"],
            ]
        )
        agent = agentTap.buildAgent(agentOptions, reactor)
        agentService = AgentService(agent, inspect=agentTap.DEFAULT_INSPECT, inspectDefaulted=True)
        agentService.startService()
        reactor.addSystemEventTrigger("before", "shutdown", agentService.stopService)
        try:
            tunnels = yield agent.ready
        except Exception:
            code[0] = 1
            _stop(reactor)
            return
        for tunnel in tunnels:
            port = relayService.relay.httpPort
            host = f"{options['subdomain']}.{relayService.relay.domain}:{port}"
            log.info(
                "try it: curl {url}   (or: curl -H 'Host: {host}' http://127.0.0.1:{port}/)   Ctrl-C stops",
                url=tunnel.address,
                host=host,
                port=port,
            )

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", relayService.stopService)
    reactor.run()
    return code[0]


def _runLogin(command: str, options: Any, reactor: Any, out: TextIO) -> int:
    """
    C{login}, C{logout}, C{whoami}: messages on C{out}, status 1 on failure.
    """
    from twisted.internet.defer import ensureDeferred

    from txtunnel.credentials import LoginError, deviceLogin, forget, relayBase, share, tokensPath, whoami

    relay = options["relay"]
    if command == "logout":
        try:
            removed = forget(relay)
        except LoginError as e:
            print(f"txtunnel: {e}", file=out)
            return 1
        print(f"logged out of {relayBase(relay)}" if removed else f"not logged in to {relayBase(relay)}", file=out)
        return 0

    def show(start: dict[str, Any]) -> None:
        url = start["verification_uri_complete"]
        print(f"To log in, open {url}\nand approve the code {start['user_code']}.", file=out, flush=True)
        if not options["no-browser"]:
            import webbrowser

            webbrowser.open(url)

    async def run() -> int:
        try:
            if command == "login":
                entry = await deviceLogin(reactor, relay, show)
                print(f"logged in to {relayBase(relay)} as {entry['email']}; token in {tokensPath()}", file=out)
            elif command == "share":
                action = options["action"]
                answer = await share(
                    reactor,
                    relay,
                    options["name"],
                    options["entries"] if action == "add" else [],
                    options["entries"] if action == "remove" else [],
                )
                print(f"{answer['tunnel']} is shared with: {', '.join(answer['allow'])}", file=out)
            else:
                answer = await whoami(reactor, relay)
                others = [e for e in answer.get("emails", []) if e != answer["email"]]
                also = f" (also {', '.join(others)})" if others else ""
                print(f"{answer['email']}{also} on {relayBase(relay)}", file=out)
        except LoginError as e:
            print(f"txtunnel: {e}", file=out)
            return 1
        return 0

    code = [1]

    def start() -> None:
        d = ensureDeferred(run())
        d.addCallback(lambda c: code.__setitem__(0, c))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    return code[0]


def main(argv: list[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"txtunnel: {e}", file=sys.stderr)
        print(f"Run 'txtunnel {options.subCommand or ''} --help' for usage.".replace("  ", " "), file=sys.stderr)
        sys.exit(2)
    level, format = logSettings(options)
    command = options.subCommand
    sub: Any = options.subOptions
    console = None
    if wantsConsole(command, sub, format, sys.stdout):
        from rich.console import Console

        from txtunnel.console import ConsoleLog

        console = Console()
        startLogging(ConsoleLog(console), level, format)  # type: ignore[arg-type]
    else:
        startLogging(sys.stderr, level, format)
    from twisted.internet import reactor

    if command in agentTap.KINDS:
        sys.exit(_runAgent(sub, reactor, console))
    elif command == "relay":
        sys.exit(_runRelay(sub, reactor))
    elif command in ("login", "logout", "whoami", "share"):
        sys.exit(_runLogin(command, sub, reactor, sys.stdout))
    else:
        sys.exit(_runDemo(sub, reactor))


if __name__ == "__main__":
    main()
