# -*- test-case-name: tests.test_store -*-
"""
The relay's state store: an embedded SQLite implementation of L{IStore}.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from txtunnel.interfaces import IStore

__all__ = ["SQLiteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS claims (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    owner TEXT NOT NULL,
    expires REAL,
    PRIMARY KEY (namespace, key)
);
CREATE TABLE IF NOT EXISTS usage (
    period TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (period, kind, key)
);
CREATE TABLE IF NOT EXISTS emails (
    email TEXT PRIMARY KEY,
    identity TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS emails_identity ON emails (identity);
CREATE TABLE IF NOT EXISTS tickets (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    expires REAL NOT NULL,
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

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self._now = clock
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        columns = [row[1] for row in self._db.execute("PRAGMA table_info(claims)")]
        if "expires" not in columns:  # a state dir from before grace periods
            self._db.execute("ALTER TABLE claims ADD COLUMN expires REAL")

    @classmethod
    def inDirectory(cls, stateDir: str, clock: Callable[[], float] = time.time) -> SQLiteStore:
        return cls(os.path.join(stateDir, "relay.sqlite3"), clock)

    def claim(self, namespace: str, key: str, owner: str) -> Deferred[bool]:
        db = self._db
        db.execute(
            "DELETE FROM claims WHERE namespace=? AND key=? AND expires IS NOT NULL AND expires <= ?",
            (namespace, key, self._now()),
        )
        db.execute("INSERT OR IGNORE INTO claims VALUES (?, ?, ?, NULL)", (namespace, key, owner))
        row = db.execute("SELECT owner FROM claims WHERE namespace=? AND key=?", (namespace, key)).fetchone()
        mine = row is not None and row[0] == owner
        if mine:
            db.execute("UPDATE claims SET expires=NULL WHERE namespace=? AND key=?", (namespace, key))
        return succeed(mine)

    def hold(self, namespace: str, key: str, owner: str, until: float) -> Deferred[None]:
        self._db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?)", (namespace, key, owner, until))
        return succeed(None)

    def holdAll(self, until: float) -> Deferred[None]:
        db = self._db
        db.execute("DELETE FROM claims WHERE expires IS NOT NULL AND expires <= ?", (self._now(),))
        db.execute("UPDATE claims SET expires=? WHERE expires IS NULL", (until,))
        return succeed(None)

    def heldClaims(self) -> dict[tuple[str, str], float]:
        """
        Every claim held for an agent that is away, with when its hold ends
        (read once at start-up, to tell visitors the agent is coming back).
        """
        rows = self._db.execute(
            "SELECT namespace, key, expires FROM claims WHERE expires IS NOT NULL AND expires > ?", (self._now(),)
        )
        return {(namespace, key): expires for namespace, key, expires in rows}

    def release(self, namespace: str, key: str, owner: str) -> Deferred[None]:
        self._db.execute("DELETE FROM claims WHERE namespace=? AND key=? AND owner=?", (namespace, key, owner))
        return succeed(None)

    def owner(self, namespace: str, key: str) -> Deferred[str | None]:
        row = self._db.execute(
            "SELECT owner FROM claims WHERE namespace=? AND key=? AND (expires IS NULL OR expires > ?)",
            (namespace, key, self._now()),
        ).fetchone()
        return succeed(row[0] if row else None)

    def releaseAll(self, namespace: str) -> Deferred[None]:
        self._db.execute("DELETE FROM claims WHERE namespace=?", (namespace,))
        return succeed(None)

    def usage(self, period: str, kind: str, key: str) -> Deferred[int]:
        """
        Bytes counted for C{key} (a visitor IP, a tunnel name; C{kind} says
        which) in C{period} (a calendar month, C{"2026-11"}).
        """
        row = self._db.execute(
            "SELECT bytes FROM usage WHERE period=? AND kind=? AND key=?", (period, kind, key)
        ).fetchone()
        return succeed(int(row[0]) if row else 0)

    def addUsage(self, counts: dict[tuple[str, str, str], int]) -> Deferred[None]:
        """
        Add byte counts, keyed by C{(period, kind, key)}, in one transaction.
        """
        db = self._db
        with db:
            db.execute("BEGIN")
            for (period, kind, key), n in counts.items():
                db.execute(
                    "INSERT INTO usage VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (period, kind, key) DO UPDATE SET bytes = bytes + excluded.bytes",
                    (period, kind, key, n),
                )
        return succeed(None)

    def pruneUsage(self, before: str) -> Deferred[None]:
        """
        Forget the counts of periods before C{before}.
        """
        self._db.execute("DELETE FROM usage WHERE period < ?", (before,))
        return succeed(None)

    # -- identities: sets of verified emails

    def identify(self, emails: Iterable[str]) -> Deferred[str]:
        """
        The identity that C{emails} (verified together, by one login)
        belong to: a new one if none is known, else the one they share --
        and when they belong to several, those merge into one (an email
        proven by two logins joins them).
        """
        found = sorted({e.lower() for e in emails})
        if not found:
            raise ValueError("an identity needs at least one verified email")
        db = self._db
        marks = ",".join("?" * len(found))
        known = {row[0] for row in db.execute(f"SELECT identity FROM emails WHERE email IN ({marks})", found)}
        identity = min(known) if known else uuid.uuid4().hex
        db.execute("BEGIN")
        try:
            for other in known - {identity}:
                db.execute("UPDATE emails SET identity=? WHERE identity=?", (identity, other))
            for email in found:
                db.execute("INSERT OR REPLACE INTO emails VALUES (?, ?)", (email, identity))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return succeed(identity)

    def emailsOf(self, email: str) -> Deferred[list[str]]:
        """
        Every verified email of the identity C{email} belongs to (just
        C{email} if it is not known).
        """
        rows = self._db.execute(
            "SELECT email FROM emails WHERE identity=(SELECT identity FROM emails WHERE email=?) ORDER BY email",
            (email.lower(),),
        ).fetchall()
        return succeed([row[0] for row in rows] or [email.lower()])

    # -- tickets: short-lived, single-use values (login hand-offs, device codes)

    def putTicket(self, namespace: str, key: str, value: dict[str, Any], expires: float) -> Deferred[None]:
        db = self._db
        db.execute("DELETE FROM tickets WHERE expires <= ?", (self._now(),))
        db.execute("INSERT OR REPLACE INTO tickets VALUES (?, ?, ?, ?)", (namespace, key, json.dumps(value), expires))
        return succeed(None)

    def getTicket(self, namespace: str, key: str) -> Deferred[dict[str, Any] | None]:
        """
        The unexpired value under C{key}, left in place.
        """
        row = self._db.execute(
            "SELECT value FROM tickets WHERE namespace=? AND key=? AND expires > ?", (namespace, key, self._now())
        ).fetchone()
        return succeed(json.loads(row[0]) if row else None)

    def takeTicket(self, namespace: str, key: str) -> Deferred[dict[str, Any] | None]:
        """
        The unexpired value under C{key}, removed: a second take gets
        C{None}, so a ticket is good once.
        """
        db = self._db
        row = db.execute("SELECT value, expires FROM tickets WHERE namespace=? AND key=?", (namespace, key)).fetchone()
        if row is None:
            return succeed(None)
        db.execute("DELETE FROM tickets WHERE namespace=? AND key=?", (namespace, key))
        return succeed(json.loads(row[0]) if row[1] > self._now() else None)

    def close(self) -> None:
        self._db.close()
