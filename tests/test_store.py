"""
Unit tests for L{txtunnel.store.SQLiteStore}, the relay's embedded claim store.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from txtunnel.interfaces import IStore
from txtunnel.store import SQLiteStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore.inDirectory(str(tmp_path / "state"))
    yield s
    s.close()


def test_providesIStore(store: SQLiteStore) -> None:
    """
    The store provides the L{IStore} interface the relay depends on.
    """
    verifyObject(IStore, store)


def test_inDirectoryCreatesDatabase(tmp_path: Path) -> None:
    """
    C{inDirectory} creates missing directories and C{relay.sqlite3} in them.
    """
    stateDir = tmp_path / "a" / "b"
    store = SQLiteStore.inDirectory(str(stateDir))
    try:
        assert os.path.exists(stateDir / "relay.sqlite3")
        assert store.path == str(stateDir / "relay.sqlite3")
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_claimAndOwner(store: SQLiteStore) -> None:
    """
    A free key can be claimed; its owner is then known; claiming it again
    by the same owner succeeds (it is idempotent).
    """
    assert await store.owner("http", "demo") is None
    assert await store.claim("http", "demo", "agent-a") is True
    assert await store.owner("http", "demo") == "agent-a"
    assert await store.claim("http", "demo", "agent-a") is True


@pytest_twisted.ensureDeferred
async def test_secondOwnerRefused(store: SQLiteStore) -> None:
    """
    A key held by one owner cannot be claimed by another, and the failed
    claim does not change who holds it.
    """
    assert await store.claim("http", "demo", "agent-a") is True
    assert await store.claim("http", "demo", "agent-b") is False
    assert await store.owner("http", "demo") == "agent-a"


@pytest_twisted.ensureDeferred
async def test_releaseOnlyByOwner(store: SQLiteStore) -> None:
    """
    Releasing a key someone else holds does nothing; the holder's release
    frees it for others.
    """
    await store.claim("tcp", "20005", "agent-a")
    await store.release("tcp", "20005", "agent-b")
    assert await store.owner("tcp", "20005") == "agent-a"
    await store.release("tcp", "20005", "agent-a")
    assert await store.owner("tcp", "20005") is None
    assert await store.claim("tcp", "20005", "agent-b") is True
    await store.release("tcp", "unknown", "agent-b")


@pytest_twisted.ensureDeferred
async def test_namespacesAreSeparate(store: SQLiteStore) -> None:
    """
    The same key in two namespaces is two claims.
    """
    assert await store.claim("http", "x", "a") is True
    assert await store.claim("tcp", "x", "b") is True
    assert await store.owner("http", "x") == "a"
    assert await store.owner("tcp", "x") == "b"


@pytest_twisted.ensureDeferred
async def test_releaseAll(store: SQLiteStore) -> None:
    """
    C{releaseAll} drops every claim in one namespace and no other.
    """
    for key in ("a", "b", "c"):
        await store.claim("http", key, "owner-" + key)
    await store.claim("tcp", "20000", "owner-a")
    await store.releaseAll("http")
    for key in ("a", "b", "c"):
        assert await store.owner("http", key) is None
    assert await store.owner("tcp", "20000") == "owner-a"
    assert await store.claim("http", "a", "someone-else") is True


@pytest_twisted.ensureDeferred
async def test_persistsAcrossReopen(tmp_path: Path) -> None:
    """
    Claims are on disk: a store reopened on the same directory sees them
    and still refuses them to other owners.
    """
    stateDir = str(tmp_path / "state")
    first = SQLiteStore.inDirectory(stateDir)
    await first.claim("http", "demo", "agent-a")
    await first.claim("http", "gone", "agent-a")
    await first.release("http", "gone", "agent-a")
    first.close()
    second = SQLiteStore.inDirectory(stateDir)
    try:
        assert await second.owner("http", "demo") == "agent-a"
        assert await second.claim("http", "demo", "agent-b") is False
        assert await second.owner("http", "gone") is None
    finally:
        second.close()


@pytest_twisted.ensureDeferred
async def test_keysAreNotPatterns(store: SQLiteStore) -> None:
    """
    Keys and owners are compared exactly: SQL wildcards and quotes are data.
    """
    assert await store.claim("http", "%", "o'wner") is True
    assert await store.owner("http", "%") == "o'wner"
    assert await store.owner("http", "anything") is None
    assert await store.claim("http", "_", "x") is True
    await store.release("http", "%", "%")
    assert await store.owner("http", "%") == "o'wner"


def test_inMemory() -> None:
    """
    C{":memory:"} works for tests and throwaway relays.
    """
    store = SQLiteStore(":memory:")
    results: list[object] = []
    store.claim("http", "a", "b").addCallback(results.append)
    store.owner("http", "a").addCallback(results.append)
    assert results == [True, "b"]
    store.close()
