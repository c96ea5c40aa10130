# -*- test-case-name: tests.test_config -*-
"""
Options from three places: the command line, C{TXTUNNEL_*} environment
variables (C{TXTUNNEL_RELAY_*} for the relay) and an INI file, in that order of precedence, then the built-in
defaults.

Every value is checked by one coercer per key, and a bad one is reported
with where it came from (C{relay.ini [relay] http}, C{TXTUNNEL_HTTP},
C{--http}) and what was expected.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.python import usage

from txtunnel.errors import ConfigError

__all__ = [
    "ConfigOptions",
    "adminToken",
    "boolean",
    "optionalFile",
    "parseTarget",
    "positiveFloat",
    "portNumber",
    "readINI",
    "tokenList",
]

Coercer = Callable[[str], Any]


def parseTarget(text: str) -> tuple[str, int]:
    """
    C{"8000"}, C{"host:8000"} or C{"[::1]:8000"} to C{(host, port)}.
    """
    text = text.strip()
    if text.isdigit():
        host, portText = "127.0.0.1", text
    elif text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not a target like 8000, HOST:8000 or [::1]:8000")
        portText = rest[1:]
    else:
        host, sep, portText = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not a target like 8000, HOST:8000 or [::1]:8000")
    return host, portNumber(portText)


def portNumber(text: str) -> int:
    try:
        port = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{port} is not a port number between 1 and 65535")
    return port


def positiveFloat(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{text!r} must not be negative")
    return value


def _absolute(text: str) -> str | None:
    text = str(text).strip()
    return os.path.abspath(os.path.expanduser(text)) if text else None


def optionalPath(text: str) -> str | None:
    """
    The absolute path of an existing file or directory, or C{None} for an
    empty value.
    """
    path = _absolute(text)
    if path is not None and not os.path.exists(path):
        raise ValueError(f"{path} does not exist")
    return path


def optionalFile(text: str) -> str | None:
    """
    The absolute path of an existing file, or C{None} for an empty value.
    """
    path = _absolute(text)
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    return path


def boolean(text: Any) -> bool:
    """
    C{true}/C{false} (also yes/no, on/off, 1/0) from a config file or
    environment variable.
    """
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not true or false")


def tokenList(text: str) -> list[str]:
    tokens = [t.strip() for t in str(text).split(",") if t.strip()]
    for token in tokens:
        if len(token) < 8:
            raise ValueError("tokens must be at least 8 characters long")
    return tokens


def adminToken(text: str) -> str | None:
    """
    The admin endpoint's token, or C{None} for none (C{/stats} refused).
    """
    token = str(text).strip()
    if not token:
        return None
    if len(token) < 8:
        raise ValueError("the admin token must be at least 8 characters long")
    return token


def readINI(path: str) -> configparser.ConfigParser:
    """
    Read an INI file, turning every failure into a L{ConfigError} that names
    the file.
    """
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00none")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a valid INI file: {e}") from None
    return parser


class ConfigOptions(usage.Options):
    """
    Base for the relay's and the agent's options.

    Subclasses list their settings in C{settings}: C{(key, default,
    coercer)}.  The matching C{optParameters} have a default of C{None} so
    that a value given on the command line can be told from one that was
    not.
    """

    section = ""
    #: Environment variables are this prefix and the key, upper-cased with
    #: C{_} for C{-}: the relay's and the agent's must not share names, since
    #: both often run in one shell (C{--http} is an endpoint for one and a
    #: target for the other).
    envPrefix = "TXTUNNEL_"
    settings: tuple[tuple[str, Any, Coercer], ...] = ()
    #: Keys that collect several values (given more than once).
    multi: frozenset[str] = frozenset()

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self.defaulted: set[str] = set()
        for key in self.multi:
            self[key] = []

    def opt_version(self) -> None:
        """
        Print txtunnel's version and exit.
        """
        import txtunnel

        print(f"txtunnel {txtunnel.__version__}")
        raise SystemExit(0)

    def envName(self, key: str) -> str:
        return self.envPrefix + key.upper().replace("-", "_")

    @property
    def configPath(self) -> str | None:
        return self.get("config") or self.environ.get(self.envName("config"))

    def _coerce(self, key: str, raw: Any, where: str) -> Any:
        coercer = dict((k, c) for k, _, c in self.settings)[key]
        try:
            return coercer(raw)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None

    def loadSettings(self) -> configparser.ConfigParser | None:
        """
        Fill in every setting from the command line, the environment, the
        config file or the default, coercing each.

        @return: the parsed config file, if one was given, for subclasses
            that read more sections from it.
        """
        parser = None
        path = self.configPath
        fileValues: dict[str, str] = {}
        if path:
            parser = readINI(path)
            known = {k for k, _, _ in self.settings}
            if parser.has_section(self.section):
                for key, value in parser.items(self.section):
                    if key not in known:
                        raise ConfigError(
                            f"{path} [{self.section}] {key}: unknown key; expected one of {', '.join(sorted(known))}"
                        )
                    fileValues[key] = value
            self.checkSections(parser, path)
        for key, default, _ in self.settings:
            envName = self.envName(key)
            if key in self.multi:
                given = self[key]
                if given:
                    self[key] = [v for raw in given for v in self._coerce(key, raw, f"--{key}")]
                elif envName in self.environ:
                    self[key] = self._coerce(key, self.environ[envName], envName)
                elif key in fileValues:
                    self[key] = self._coerce(key, fileValues[key], f"{path} [{self.section}] {key}")
                else:
                    self[key] = list(default)
                    self.defaulted.add(key)
                continue
            if self.get(key) is not None:
                self[key] = self._coerce(key, self[key], f"--{key}")
            elif envName in self.environ:
                self[key] = self._coerce(key, self.environ[envName], envName)
            elif key in fileValues:
                self[key] = self._coerce(key, fileValues[key], f"{path} [{self.section}] {key}")
            else:
                self[key] = default
                self.defaulted.add(key)
        return parser

    def checkSections(self, parser: configparser.ConfigParser, path: str) -> None:
        for name in parser.sections():
            if name != self.section:
                raise ConfigError(f"{path} [{name}]: unknown section; expected [{self.section}]")

    def postOptions(self) -> None:
        try:
            self.loadSettings()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
