"""The vault's storage: SQLite (WAL, transactions) in the state directory.

Every write is one transaction, so a process killed at any point leaves each record as it
was or as it became, never neither. Secrets keep every version (reads take the latest);
a KEK rotation re-wraps every data key in one transaction. Errors name the record, never
its value.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar.vault.envelope import SealError, open_part, rewrap, seal, unwrap_key
from sidecar.vault.kek import Kek, KekProvider
from soma_runtime.unix import private_umask

MAX_SECRET_BYTES = 64 * 1024
SECRET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    kek_id TEXT NOT NULL,
    wrapped_key BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS blobs (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    revision INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    updated_at TEXT NOT NULL,
    kek_id TEXT NOT NULL,
    wrapped_key BLOB NOT NULL,
    header BLOB NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (namespace, key)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    secret TEXT NOT NULL,
    action TEXT NOT NULL,
    runtime TEXT,
    organ TEXT,
    op TEXT
);
"""


class VaultError(Exception):
    """A vault operation failed; the message names the record, never its value."""


class VaultUnavailable(VaultError):
    """The vault cannot be opened: a corrupt database, or no usable key-encryption key."""


class SecretNotFound(VaultError):
    pass


class RecordUnreadable(VaultError):
    """One record does not open (tampered, truncated, or sealed under an unknown KEK)."""


@dataclass(frozen=True, slots=True)
class SecretInfo:
    name: str
    versions: int
    latest: int
    created_at: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class Blob:
    key: str
    data: bytes
    metadata: dict[str, Any]
    embedding: list[float] | None
    size_bytes: int
    updated_at: str
    revision: int


@dataclass(frozen=True, slots=True)
class BlobInfo:
    key: str
    size_bytes: int
    updated_at: str
    revision: int
    metadata: dict[str, Any] = field(default_factory=dict)
    embedding: list[float] | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _secret_aad(name: str, version: int) -> bytes:
    return f"soma/secret\0{name}\0{version}".encode()


def _blob_aad(namespace: str, key: str, revision: int) -> bytes:
    return f"soma/blob\0{namespace}\0{key}\0{revision}".encode()


class Vault:
    """One open vault database. Not thread-safe: the sidecar drives it from one thread."""

    def __init__(self, path: Path, provider: KekProvider, *, durable: bool = True) -> None:
        """`durable`: fsync every commit (synchronous=FULL). Without it (the sidecar's blobs
        and audit records), WAL still survives any process crash, and only a power loss can
        lose the last commits."""
        self.path = path
        self.provider = provider
        try:
            with private_umask():
                self._db = sqlite3.connect(
                    path, isolation_level=None, timeout=30.0, check_same_thread=False
                )
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            in_use = {
                row[0]
                for row in self._db.execute(
                    "SELECT kek_id FROM secrets UNION SELECT kek_id FROM blobs"
                )
            }
        except sqlite3.DatabaseError as exc:
            raise VaultUnavailable(f"the vault database {path} cannot be used: {exc}") from None
        provider.recover(in_use)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                path.with_name(path.name + suffix).chmod(0o600)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise VaultUnavailable(f"the vault database {self.path}: {exc}") from None
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _kek(self, kek_id: str, record: str) -> Kek:
        kek = self.provider.find(kek_id)
        if kek is None:
            raise RecordUnreadable(
                f"{record} was sealed under key-encryption key {kek_id}, which "
                f"{self.provider.description} does not hold"
            )
        return kek

    def _open(
        self, record: str, kek_id: str, wrapped: bytes, aad: bytes, *parts: tuple[int, bytes]
    ) -> list[bytes]:
        try:
            dek = unwrap_key(self._kek(kek_id, record), wrapped, aad)
            return [open_part(dek, ciphertext, aad, index) for index, ciphertext in parts]
        except SealError as exc:
            raise RecordUnreadable(f"{record} cannot be decrypted: {exc}") from None

    # -- secrets ----------------------------------------------------------------------------

    def set_secret(self, name: str, value: bytes) -> int:
        """Store a new version; returns its number."""
        if not SECRET_NAME.match(name):
            raise VaultError(f"{name!r} is not a secret name ([a-z0-9][a-z0-9_-]*, at most 64)")
        if not value:
            raise VaultError(f"secret {name!r}: the value is empty")
        if len(value) > MAX_SECRET_BYTES:
            raise VaultError(f"secret {name!r}: the value exceeds {MAX_SECRET_BYTES} bytes")
        with self._transaction() as db:
            latest: int
            (latest,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) FROM secrets WHERE name = ?", (name,)
            ).fetchone()
            version = latest + 1
            sealed = seal(self.provider.current(), _secret_aad(name, version), value)
            db.execute(
                "INSERT INTO secrets VALUES (?, ?, ?, ?, ?, ?)",
                (name, version, _now(), sealed.kek_id, sealed.wrapped_key, sealed.parts[0]),
            )
            self._audit(db, name, "set", runtime=None, organ="cli", op=f"version {version}")
        return version

    def reveal(self, name: str, *, runtime: str | None, organ: str, op: str) -> bytes:
        """The latest version's value; the use is audited (never the value)."""
        row = self._db.execute(
            "SELECT version, kek_id, wrapped_key, ciphertext FROM secrets WHERE name = ? "
            "ORDER BY version DESC LIMIT 1",
            (name,),
        ).fetchone()
        if row is None:
            raise SecretNotFound(f"secret {name!r} is not in the vault")
        version, kek_id, wrapped, ciphertext = row
        try:
            (value,) = self._open(
                f"secret {name!r} version {version}",
                kek_id,
                wrapped,
                _secret_aad(name, version),
                (0, ciphertext),
            )
        except RecordUnreadable:
            with self._transaction() as db:
                self._audit(db, name, "use-failed", runtime=runtime, organ=organ, op=op)
            raise
        with self._transaction() as db:
            self._audit(db, name, "use", runtime=runtime, organ=organ, op=op)
        return value

    def list_secrets(self) -> list[SecretInfo]:
        rows = self._db.execute(
            "SELECT name, COUNT(*), MAX(version), MIN(created_at), MAX(created_at) "
            "FROM secrets GROUP BY name ORDER BY name"
        ).fetchall()
        return [SecretInfo(*row) for row in rows]

    def delete_secret(self, name: str) -> int:
        """Delete every version; the number deleted (`SecretNotFound` when none)."""
        with self._transaction() as db:
            deleted: int = db.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount
            if deleted == 0:
                raise SecretNotFound(f"secret {name!r} is not in the vault")
            self._audit(db, name, "delete", runtime=None, organ="cli", op=f"{deleted} versions")
        return deleted

    # -- key rotation -------------------------------------------------------------------------

    def rotate_kek(self) -> int:
        """Re-wrap every data key under a new KEK in one transaction; the rows re-wrapped."""
        with self.provider.rotating():
            return self._rotate()

    def _rotate(self) -> int:
        new = self.provider.stage_rotation()
        count = 0
        with self._transaction() as db:
            secrets = db.execute(
                "SELECT name, version, kek_id, wrapped_key FROM secrets"
            ).fetchall()
            for name, version, kek_id, wrapped in secrets:
                if kek_id == new.kek_id:
                    continue
                record = f"secret {name!r} version {version}"
                db.execute(
                    "UPDATE secrets SET kek_id = ?, wrapped_key = ? WHERE name = ? AND version = ?",
                    (
                        new.kek_id,
                        self._rewrap(record, kek_id, new, wrapped, _secret_aad(name, version)),
                        name,
                        version,
                    ),
                )
                count += 1
            blobs = db.execute("SELECT namespace, key, revision, kek_id, wrapped_key FROM blobs")
            for namespace, key, revision, kek_id, wrapped in blobs.fetchall():
                if kek_id == new.kek_id:
                    continue
                record = f"blob {key!r} of {namespace!r}"
                db.execute(
                    "UPDATE blobs SET kek_id = ?, wrapped_key = ? WHERE namespace = ? AND key = ?",
                    (
                        new.kek_id,
                        self._rewrap(
                            record, kek_id, new, wrapped, _blob_aad(namespace, key, revision)
                        ),
                        namespace,
                        key,
                    ),
                )
                count += 1
            self._audit(db, "*", "rotate-kek", runtime=None, organ="cli", op=f"{count} keys")
        self.provider.complete_rotation(new)
        return count

    def _rewrap(self, record: str, kek_id: str, new: Kek, wrapped: bytes, aad: bytes) -> bytes:
        try:
            return rewrap(self._kek(kek_id, record), new, wrapped, aad)
        except SealError as exc:
            raise RecordUnreadable(f"{record} cannot be re-wrapped: {exc}") from None

    # -- blobs ------------------------------------------------------------------------------

    def put_blob(
        self,
        namespace: str,
        key: str,
        data: bytes,
        metadata: dict[str, Any],
        embedding: list[float] | None,
    ) -> int:
        """Store (or replace) a blob; returns its revision."""
        header = json.dumps(
            {"metadata": metadata, "embedding": embedding}, separators=(",", ":")
        ).encode()
        with self._transaction() as db:
            row = db.execute(
                "SELECT revision FROM blobs WHERE namespace = ? AND key = ?", (namespace, key)
            ).fetchone()
            revision = (row[0] if row else 0) + 1
            sealed = seal(
                self.provider.current(), _blob_aad(namespace, key, revision), header, data
            )
            db.execute(
                "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    namespace,
                    key,
                    revision,
                    len(data),
                    _now(),
                    sealed.kek_id,
                    sealed.wrapped_key,
                    sealed.parts[0],
                    sealed.parts[1],
                ),
            )
        return revision

    def get_blob(self, namespace: str, key: str) -> Blob | None:
        row = self._db.execute(
            "SELECT revision, size_bytes, updated_at, kek_id, wrapped_key, header, data "
            "FROM blobs WHERE namespace = ? AND key = ?",
            (namespace, key),
        ).fetchone()
        if row is None:
            return None
        revision, size, updated, kek_id, wrapped, header, data = row
        opened_header, opened_data = self._open(
            f"blob {key!r}",
            kek_id,
            wrapped,
            _blob_aad(namespace, key, revision),
            (0, header),
            (1, data),
        )
        fields = json.loads(opened_header)
        return Blob(
            key, opened_data, fields["metadata"], fields["embedding"], size, updated, revision
        )

    def delete_blob(self, namespace: str, key: str) -> bool:
        with self._transaction() as db:
            return (
                db.execute(
                    "DELETE FROM blobs WHERE namespace = ? AND key = ?", (namespace, key)
                ).rowcount
                > 0
            )

    def list_blobs(
        self, namespace: str, prefix: str = "", after: str = "", limit: int = 100
    ) -> list[BlobInfo]:
        """Blobs whose key starts with `prefix`, in key order, after the key `after`."""
        rows = self._db.execute(
            "SELECT key, revision, size_bytes, updated_at, kek_id, wrapped_key, header "
            "FROM blobs WHERE namespace = ? AND key > ? AND substr(key, 1, ?) = ? "
            "ORDER BY key LIMIT ?",
            (namespace, after, len(prefix), prefix, limit),
        ).fetchall()
        return [self._info(namespace, *row) for row in rows]

    def blobs_with_embeddings(self, namespace: str) -> list[BlobInfo]:
        rows = self._db.execute(
            "SELECT key, revision, size_bytes, updated_at, kek_id, wrapped_key, header "
            "FROM blobs WHERE namespace = ? ORDER BY key",
            (namespace,),
        ).fetchall()
        return [info for info in (self._info(namespace, *row) for row in rows) if info.embedding]

    def _info(
        self,
        namespace: str,
        key: str,
        revision: int,
        size: int,
        updated: str,
        kek_id: str,
        wrapped: bytes,
        header: bytes,
    ) -> BlobInfo:
        (opened,) = self._open(
            f"blob {key!r}", kek_id, wrapped, _blob_aad(namespace, key, revision), (0, header)
        )
        fields = json.loads(opened)
        return BlobInfo(key, size, updated, revision, fields["metadata"], fields["embedding"])

    # -- audit ------------------------------------------------------------------------------

    def _audit(
        self,
        db: sqlite3.Connection,
        secret: str,
        action: str,
        *,
        runtime: str | None,
        organ: str,
        op: str,
    ) -> None:
        db.execute(
            "INSERT INTO audit (at, secret, action, runtime, organ, op) VALUES (?, ?, ?, ?, ?, ?)",
            (_now(), secret, action, runtime, organ, op),
        )

    def audit_log(self, secret: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        query = "SELECT at, secret, action, runtime, organ, op FROM audit"
        args: tuple[Any, ...] = ()
        if secret is not None:
            query += " WHERE secret = ?"
            args = (secret,)
        rows = self._db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        keys = ("at", "secret", "action", "runtime", "organ", "op")
        return [dict(zip(keys, row, strict=True)) for row in rows]
