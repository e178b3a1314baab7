"""API keys of bridge instances: shown once, stored as a SHA-256 digest in the state
directory's `bridge-keys.db`, scoped to one instance, expiring, revocable.

A key is `soma_<id>_<secret>` with a 256-bit secret, so a fast digest is enough (nothing to
brute-force) and the id (not secret) names the key in logs and listings. The running sidecar
looks keys up through a cache whose entries live `CACHE_S` seconds: a revoke made by the CLI
in another process takes effect within that time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soma_runtime.unix import ensure_private_dir, private_umask

KEYS_FILE = "bridge-keys.db"
CACHE_S = 0.5
_CACHE_MAX = 1024
_KEY_SHAPE = re.compile(r"soma_([0-9a-f]{16})_([0-9a-f]{64})")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS bridge_keys (
    id TEXT PRIMARY KEY,
    bridge TEXT NOT NULL,
    label TEXT NOT NULL,
    digest BLOB NOT NULL,
    created REAL NOT NULL,
    expires REAL,
    revoked REAL
)
"""


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: str
    bridge: str
    label: str
    created: float
    expires: float | None
    revoked: float | None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyStore:
    """The key table; every method opens its own short connection (the CLI and the sidecar
    are different processes)."""

    def __init__(self, state_dir: Path, clock: Any = time.time) -> None:
        self._state_dir = state_dir
        self.path = state_dir / KEYS_FILE
        self._clock = clock
        self._reader: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        ensure_private_dir(self._state_dir)
        with private_umask():
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(_SCHEMA)
        return db

    def create(
        self, bridge: str, label: str = "", expires_days: float | None = None
    ) -> tuple[KeyInfo, str]:
        """A new key for `bridge`: its record and the key itself (shown once, never stored)."""
        key_id, secret = secrets.token_hex(8), secrets.token_hex(32)
        key = f"soma_{key_id}_{secret}"
        now = self._clock()
        expires = now + expires_days * 86400.0 if expires_days is not None else None
        info = KeyInfo(key_id, bridge, label, now, expires, None)
        with closing(self._connect()) as db:
            db.execute(
                "INSERT INTO bridge_keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (key_id, bridge, label, _digest(key), now, expires),
            )
        return info, key

    def list(self, bridge: str | None = None) -> list[KeyInfo]:
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT id, bridge, label, created, expires, revoked FROM bridge_keys"
                " WHERE ?1 IS NULL OR bridge = ?1 ORDER BY created, id",
                (bridge,),
            ).fetchall()
        return [KeyInfo(*row) for row in rows]

    def revoke(self, key_id: str) -> bool:
        """Revoke a key by id; False when there is no such key (or it was revoked already)."""
        with closing(self._connect()) as db:
            cursor = db.execute(
                "UPDATE bridge_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (self._clock(), key_id),
            )
        return cursor.rowcount == 1

    def lookup(self, key: str) -> tuple[str, str] | None:
        """`(key id, bridge)` of a valid (known, unexpired, unrevoked) key, else None."""
        match = _KEY_SHAPE.fullmatch(key)
        if match is None:
            return None
        if self._reader is None:  # the sidecar's lookups share one connection
            self._reader = self._connect()
        row = self._reader.execute(
            "SELECT bridge, digest, expires, revoked FROM bridge_keys WHERE id = ?", (match[1],)
        ).fetchone()
        if row is None:
            return None
        bridge, digest, expires, revoked = row
        if not hmac.compare_digest(digest, _digest(key)) or revoked is not None:
            return None
        if expires is not None and expires <= self._clock():
            return None
        return match[1], bridge

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


# The `key` label of requests no API key was recognised for, and of OAuth-token requests.
UNKNOWN_KEY = "unknown"
OAUTH = "oauth"


@dataclass(slots=True)
class KeyCounts:
    """Requests per `(bridge, key id)`: let through (`calls`) and refused (`rejections`).

    Only a key that authenticated gets its own entry (the operator creates those, so they are
    few); every request refused before a key was recognised counts under `UNKNOWN_KEY`, so a
    client sending random keys cannot grow the table (or the metrics series).
    """

    calls: dict[tuple[str, str], int] = field(default_factory=dict)
    rejections: dict[tuple[str, str], int] = field(default_factory=dict)

    def call(self, bridge: str, key: str) -> None:
        self.calls[bridge, key] = self.calls.get((bridge, key), 0) + 1

    def rejection(self, bridge: str, key: str = UNKNOWN_KEY) -> None:
        self.rejections[bridge, key] = self.rejections.get((bridge, key), 0) + 1


class KeyCache:
    """`KeyStore.lookup` with answers remembered for `CACHE_S` seconds (bounded), and the
    requests counted per key."""

    def __init__(
        self, store: KeyStore, clock: Any = time.monotonic, counts: KeyCounts | None = None
    ) -> None:
        self._store = store
        self._clock = clock
        self.counts = counts if counts is not None else KeyCounts()
        self._cache: OrderedDict[bytes, tuple[float, tuple[str, str] | None]] = OrderedDict()

    def lookup(self, key: str) -> tuple[str, str] | None:
        digest = _digest(key)
        now = self._clock()
        cached = self._cache.pop(digest, None)
        if cached is not None and cached[0] > now:
            self._cache[digest] = cached
            return cached[1]
        found = self._store.lookup(key)
        self._cache[digest] = (now + CACHE_S, found)
        while len(self._cache) > _CACHE_MAX:
            self._cache.popitem(last=False)
        return found
