# -*- test-case-name: tests.test_store -*-
"""
The relay's state store: an embedded SQLite implementation of L{IStore}.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from txtunnel.interfaces import IStore

__all__ = ["SQLiteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY (namespace, key)
);
"""


@implementer(IStore)
class SQLiteStore:
    """
    Claims kept in C{relay.sqlite3} in the state directory.

    SQLite calls here are short single-row statements on a local file, so
    they run on the reactor thread; the Deferred-returning interface leaves
    room for a networked store.
    """

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    @classmethod
    def inDirectory(cls, stateDir: str) -> SQLiteStore:
        return cls(os.path.join(stateDir, "relay.sqlite3"))

    def claim(self, namespace: str, key: str, owner: str) -> Deferred[bool]:
        db = self._db
        db.execute("INSERT OR IGNORE INTO claims VALUES (?, ?, ?)", (namespace, key, owner))
        row = db.execute("SELECT owner FROM claims WHERE namespace=? AND key=?", (namespace, key)).fetchone()
        return succeed(row is not None and row[0] == owner)

    def release(self, namespace: str, key: str, owner: str) -> Deferred[None]:
        self._db.execute("DELETE FROM claims WHERE namespace=? AND key=? AND owner=?", (namespace, key, owner))
        return succeed(None)

    def owner(self, namespace: str, key: str) -> Deferred[str | None]:
        row = self._db.execute("SELECT owner FROM claims WHERE namespace=? AND key=?", (namespace, key)).fetchone()
        return succeed(row[0] if row else None)

    def releaseAll(self, namespace: str) -> Deferred[None]:
        self._db.execute("DELETE FROM claims WHERE namespace=?", (namespace,))
        return succeed(None)

    def close(self) -> None:
        self._db.close()
