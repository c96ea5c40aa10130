# -*- test-case-name: tests.test_reconnect -*-
"""
What an agent's tunnels ask for to get their random addresses back, kept
in a file next to the agent key so that it survives a restart.

The relay holds a dropped agent's names and ports for its key during the
grace period, but a tunnel with a random name asks for I{a} name, not
I{its} name: without this file an agent restarted after C{kill -9} (or a
crash, or a reboot) would get a new random address and leave the old one
held for nothing.  With it, the restarted agent sends the same C{reclaim}
fields the relay's last C{bound} message gave, and the relay (which knows
the key) hands the address back.

The file is a cache, never a source of truth: the relay decides, an entry
that is refused is dropped, and a file that cannot be read or written
only costs the restart its old addresses (it is logged, not fatal).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.logger import Logger

__all__ = ["ReclaimFile", "reclaimPath"]

#: Fields of a C{reclaim} the agent keeps, and the type each must have.
FIELDS: dict[str, type] = {"name": str, "port": int}

#: Entries kept at most (one per relay, type and tunnel name).
MAX_ENTRIES = 256


def reclaimPath(keyPath: str) -> str:
    """
    The reclaim file belonging to the agent key at C{keyPath}.
    """
    return keyPath + ".reclaim"


def _valid(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict) or not value or len(value) > len(FIELDS):
        return None
    for k, v in value.items():
        kind = FIELDS.get(k)
        if kind is None or isinstance(v, bool) or not isinstance(v, kind):
            return None
        if isinstance(v, str) and not 0 < len(v) <= 253:
            return None
    return dict(value)


class ReclaimFile:
    """
    The C{reclaim} fields of an agent's random-address tunnels, by relay,
    tunnel type and tunnel name, in a JSON file private to its user.

    Agents that share a key file share this file too; each rewrites only
    its own entries (read, change, atomic replace), so they do not undo
    each other's.  Two such agents with a tunnel of the same name and
    type overwrite one entry; the one whose address it no longer names
    asks for it, is refused (the other holds it) and takes a new one.
    """

    log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path
        self._warned = False

    @staticmethod
    def entry(relay: str, kind: str, name: str) -> str:
        return f"{relay} {kind} {name}"

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            self._warn("cannot read {path} ({error}); random addresses are not kept across restarts", e)
            return {}
        tunnels = data.get("tunnels") if isinstance(data, dict) else None
        if not isinstance(tunnels, dict):
            self._warn("{path} is not an agent reclaim file ({error}); ignoring it", "no 'tunnels' object")
            return {}
        return {k: v for k, v in tunnels.items() if isinstance(k, str) and _valid(v) is not None}

    def _warn(self, message: str, error: Any) -> None:
        if not self._warned:
            self._warned = True
            self.log.warn(message, path=self.path, error=error)

    def load(self, relay: str, kind: str, name: str) -> dict[str, Any]:
        """
        What the tunnel C{name} of type C{kind} asked C{relay} for last
        time (C{{}} if nothing is known).
        """
        return _valid(self._read().get(self.entry(relay, kind, name))) or {}

    def save(self, relay: str, kind: str, name: str, reclaim: dict[str, Any]) -> None:
        """
        Keep C{reclaim} for the tunnel (an empty one forgets it).
        """
        tunnels = self._read()
        key = self.entry(relay, kind, name)
        value = _valid(reclaim)
        if tunnels.get(key) == value or (value is None and key not in tunnels):
            return
        if value is None:
            del tunnels[key]
        else:
            tunnels.pop(key, None)
            tunnels[key] = value
            while len(tunnels) > MAX_ENTRIES:
                del tunnels[next(iter(tunnels))]
        temporary = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "tunnels": tunnels}, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(temporary, self.path)
        except OSError as e:
            self._warn("cannot save {path} ({error}); random addresses are not kept across restarts", e)
            try:
                os.unlink(temporary)
            except OSError:
                pass
