"""The vault's storage: SQLite (WAL, transactions) in the state directory.

Every write is one transaction, so a process killed at any point leaves each record as it
was or as it became, never neither. Secrets keep every version (reads take the latest);
a KEK rotation re-wraps every data key in one transaction. Errors name the record, never
its value.

Blobs: the associated data of each one binds every column a caller sees (namespace, key,
revision, size, time; metadata, embedding and data are inside the ciphertext), so none can
be altered on disk unnoticed. Each namespace also has a sealed manifest: the fingerprint of
every blob the vault last wrote there. A blob rolled back to an older copy, restored after
its deletion, or deleted behind the vault's back no longer matches it and is reported as
`RecordRolledBack`. What it cannot see is the whole namespace (rows and manifest together)
or the whole file put back to an earlier state: that needs an anchor outside the database.
One record that does not open never hides the others: listings report it beside them.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from sidecar.vault.envelope import SealError, open_part, rewrap, seal, unwrap_key
from sidecar.vault.kek import Kek, KekProvider
from soma_runtime import strict_json
from soma_runtime.unix import private_umask

MAX_SECRET_BYTES = 64 * 1024
SECRET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # fullmatch: "$" would allow "name\n"
SCHEMA_VERSION = 2
# A blob's header holds an input's metadata: never deeper than the deepest input the wire
# accepts (`max_input_depth` is at most 512), plus the header object itself.
_HEADER_DEPTH = 513

# The tables (as of schema version 1, plus the manifests of version 2); `_migrate` changes
# the tables of an earlier version that already exist.
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
CREATE TABLE IF NOT EXISTS manifests (
    namespace TEXT PRIMARY KEY,
    kek_id TEXT NOT NULL,
    wrapped_key BLOB NOT NULL,
    sealed BLOB NOT NULL
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
CREATE TABLE IF NOT EXISTS secrets_generation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n INTEGER NOT NULL
);
INSERT OR IGNORE INTO secrets_generation VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS secrets_insert AFTER INSERT ON secrets
    BEGIN UPDATE secrets_generation SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS secrets_update AFTER UPDATE ON secrets
    BEGIN UPDATE secrets_generation SET n = n + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS secrets_delete AFTER DELETE ON secrets
    BEGIN UPDATE secrets_generation SET n = n + 1 WHERE id = 1; END;
"""
# Every change to the secrets table, by any process (`soma secrets`, another sidecar, an older
# Soma once the database has the triggers), counts in `secrets_generation`: a process that
# caches decrypted secrets reads that one row to know its copies are still the stored values.
GENERATION_QUERY = "SELECT n FROM secrets_generation WHERE id = 1"


class VaultError(Exception):
    """A vault operation failed; the message names the record, never its value."""

    kind: ClassVar[str] = "VaultError"  # the error callers of the vault organ see


class VaultUnavailable(VaultError):
    """The vault cannot be opened: a corrupt database, or no usable key-encryption key."""


class SecretNotFound(VaultError):
    pass


class RecordUnreadable(VaultError):
    """One record does not open (tampered, truncated, sealed under an unknown KEK, or not
    strict JSON inside)."""

    kind = "RecordUnreadable"


class RecordRolledBack(RecordUnreadable):
    """A blob is not the one the vault last wrote under its key: an older copy, one
    restored after its deletion, or none where the vault wrote one."""

    kind = "RecordRolledBack"


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One use of a secret, as the audit table keeps it (never the value); `at` is when the
    use happened, not when the row was written."""

    secret: str
    action: str
    runtime: str | None
    organ: str
    op: str
    at: str = field(default_factory=lambda: _now())


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


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A blob a listing could not return, and why (`kind` is the error's)."""

    key: str
    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class BlobPage:
    """Blobs in key order; those that did not open are reported beside the others."""

    items: list[BlobInfo]
    unreadable: list[Unreadable]


@dataclass(frozen=True, slots=True)
class _Manifest:
    """A namespace's manifest as last verified: key -> fingerprint of its blob."""

    wrapped_key: bytes  # identifies the stored version: every seal wraps a fresh data key
    entries: dict[str, str]
    keys: list[str]  # sorted, for listings


_NO_MANIFEST = _Manifest(b"", {}, [])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _secret_aad(name: str, version: int) -> bytes:
    return f"soma/secret\0{name}\0{version}".encode()


def _blob_aad(aad: int, namespace: str, key: str, revision: int, size: int, updated: str) -> bytes:
    """Version 2 binds every column a caller sees; version 1 (blobs written before it, kept
    only while their KEK is missing at migration) bound the key and revision alone."""
    if aad == 1:
        return f"soma/blob\0{namespace}\0{key}\0{revision}".encode()
    return f"soma/blob/2\0{namespace}\0{key}\0{revision}\0{size}\0{updated}".encode()


def _removed(key: str) -> RecordRolledBack:
    return RecordRolledBack(f"blob {key!r} was removed outside the vault")


def _unreadable(key: str, exc: RecordUnreadable) -> Unreadable:
    return Unreadable(key, exc.kind, str(exc))


def _keys_in(keys: list[str], prefix: str, after: str, upper: str | None) -> Iterator[str]:
    """The sorted `keys` that start with `prefix`, after `after`, up to `upper` if given."""
    start = max(bisect.bisect_right(keys, after), bisect.bisect_left(keys, prefix))
    for index in range(start, len(keys)):
        key = keys[index]
        if not key.startswith(prefix) or (upper is not None and key > upper):
            return
        yield key


def _manifest_aad(namespace: str) -> bytes:
    return f"soma/blob-manifest\0{namespace}".encode()


def _fingerprint(header: bytes) -> str:
    """Names one write of a blob: its sealed header (random nonce, authenticated)."""
    return hashlib.sha256(header).hexdigest()[:32]


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
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise VaultUnavailable(
                    f"the vault database {path} has schema version {version}, newer than "
                    f"this Soma's {SCHEMA_VERSION}"
                )
            in_use = {
                row[0]
                for row in self._db.execute(
                    "SELECT kek_id FROM secrets UNION SELECT kek_id FROM blobs "
                    "UNION SELECT kek_id FROM manifests"
                )
            }
        except sqlite3.DatabaseError as exc:
            raise VaultUnavailable(f"the vault database {path} cannot be used: {exc}") from None
        provider.recover(in_use)
        self._manifests: dict[str, _Manifest] = {}
        if version < SCHEMA_VERSION:
            try:
                self._migrate()
            except sqlite3.Error as exc:  # a full disk, a lock held past the busy timeout
                raise VaultUnavailable(
                    f"the vault database {path} cannot be migrated: {exc}"
                ) from None
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

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: a manifest and the blobs it vouches for, as of one moment."""
        self._db.execute("BEGIN")
        try:
            yield self._db
        finally:
            if self._db.in_transaction:
                self._db.execute("COMMIT")

    def _migrate(self) -> None:
        """Bring the schema to `SCHEMA_VERSION` in one transaction: a crash leaves the old
        schema with every record as it was, and the next open starts again.

        Version 2 re-seals each blob with associated data that binds all its columns, and
        gives each namespace its manifest. A blob that does not open (its KEK missing, or
        tampered) keeps its old seal and opens as before once it can.
        """
        with self._transaction() as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version >= 2:  # another process migrated first
                return
            db.execute("ALTER TABLE blobs ADD COLUMN aad INTEGER NOT NULL DEFAULT 1")
            names = db.execute("SELECT namespace, key FROM blobs ORDER BY namespace").fetchall()
            entries: dict[str, dict[str, str]] = {}
            for namespace, key in names:
                header = self._reseal_v1(db, namespace, key)
                entries.setdefault(namespace, {})[key] = _fingerprint(header)
            for namespace, manifest in entries.items():
                self._seal_manifest(db, namespace, manifest)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _reseal_v1(self, db: sqlite3.Connection, namespace: str, key: str) -> bytes:
        """Re-seal one version-1 blob under version-2 associated data; its sealed header."""
        revision, size, updated, kek_id, wrapped, header, data = db.execute(
            "SELECT revision, size_bytes, updated_at, kek_id, wrapped_key, header, data "
            "FROM blobs WHERE namespace = ? AND key = ?",
            (namespace, key),
        ).fetchone()
        record = f"blob {key!r} of {namespace!r}"
        try:
            parts = self._open(
                record,
                kek_id,
                wrapped,
                _blob_aad(1, namespace, key, revision, size, updated),
                (0, header),
                (1, data),
            )
        except RecordUnreadable:
            return bytes(header)
        aad = _blob_aad(2, namespace, key, revision, size, updated)
        sealed = seal(self._kek(kek_id, record), aad, *parts)
        db.execute(
            "UPDATE blobs SET wrapped_key = ?, header = ?, data = ?, aad = 2 "
            "WHERE namespace = ? AND key = ?",
            (sealed.wrapped_key, sealed.parts[0], sealed.parts[1], namespace, key),
        )
        return sealed.parts[0]

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
        if not SECRET_NAME.fullmatch(name):
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
        try:
            _, value = self.open_secret(name)
        except RecordUnreadable:
            self.write_audit([AuditRow(name, "use-failed", runtime, organ, op)])
            raise
        self.write_audit([AuditRow(name, "use", runtime, organ, op)])
        return value

    def open_secret(self, name: str) -> tuple[int, bytes]:
        """The secrets generation and the latest version's value, read in one snapshot and
        not audited: the caller audits the use (see `AsyncVault.audit`)."""
        with self._snapshot() as db:
            (generation,) = db.execute(GENERATION_QUERY).fetchone()
            row = db.execute(
                "SELECT version, kek_id, wrapped_key, ciphertext FROM secrets WHERE name = ? "
                "ORDER BY version DESC LIMIT 1",
                (name,),
            ).fetchone()
        if row is None:
            raise SecretNotFound(f"secret {name!r} is not in the vault")
        version, kek_id, wrapped, ciphertext = row
        (value,) = self._open(
            f"secret {name!r} version {version}",
            kek_id,
            wrapped,
            _secret_aad(name, version),
            (0, ciphertext),
        )
        return generation, value

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
            blobs = db.execute(
                "SELECT namespace, key, revision, size_bytes, updated_at, aad, kek_id, "
                "wrapped_key FROM blobs"
            )
            for namespace, key, revision, size, updated, aad, kek_id, wrapped in blobs.fetchall():
                if kek_id == new.kek_id:
                    continue
                record = f"blob {key!r} of {namespace!r}"
                aad_bytes = _blob_aad(aad, namespace, key, revision, size, updated)
                db.execute(
                    "UPDATE blobs SET kek_id = ?, wrapped_key = ? WHERE namespace = ? AND key = ?",
                    (
                        new.kek_id,
                        self._rewrap(record, kek_id, new, wrapped, aad_bytes),
                        namespace,
                        key,
                    ),
                )
                count += 1
            # Manifests are re-wrapped too, but not counted: the count is of records.
            manifests = db.execute("SELECT namespace, kek_id, wrapped_key FROM manifests")
            for namespace, kek_id, wrapped in manifests.fetchall():
                if kek_id == new.kek_id:
                    continue
                record = f"the manifest of {namespace!r}"
                db.execute(
                    "UPDATE manifests SET kek_id = ?, wrapped_key = ? WHERE namespace = ?",
                    (
                        new.kek_id,
                        self._rewrap(record, kek_id, new, wrapped, _manifest_aad(namespace)),
                        namespace,
                    ),
                )
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
        try:
            header = json.dumps(
                {"metadata": metadata, "embedding": embedding},
                separators=(",", ":"),
                allow_nan=False,
            ).encode()
        except ValueError:
            raise VaultError(
                f"blob {key!r}: NaN and Infinity cannot be stored (not JSON)"
            ) from None
        with self._transaction() as db:
            row = db.execute(
                "SELECT revision FROM blobs WHERE namespace = ? AND key = ?", (namespace, key)
            ).fetchone()
            revision = (row[0] if row else 0) + 1
            updated = _now()
            sealed = seal(
                self.provider.current(),
                _blob_aad(2, namespace, key, revision, len(data), updated),
                header,
                data,
            )
            db.execute(
                "INSERT OR REPLACE INTO blobs (namespace, key, revision, size_bytes, updated_at, "
                "kek_id, wrapped_key, header, data, aad) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 2)",
                (
                    namespace,
                    key,
                    revision,
                    len(data),
                    updated,
                    sealed.kek_id,
                    sealed.wrapped_key,
                    sealed.parts[0],
                    sealed.parts[1],
                ),
            )
            entries = dict(self._manifest_to_update(db, namespace).entries)
            entries[key] = _fingerprint(sealed.parts[0])
            manifest = self._seal_manifest(db, namespace, entries)
        self._manifests[namespace] = manifest
        return revision

    def get_blob(self, namespace: str, key: str) -> Blob | None:
        """The blob under `key`, None if the vault never wrote one there (or deleted it);
        `RecordUnreadable` / `RecordRolledBack` when what is stored is not what it wrote."""
        with self._snapshot() as db:
            manifest = self._manifest(db, namespace)
            row = db.execute(
                "SELECT key, revision, size_bytes, updated_at, aad, kek_id, wrapped_key, header, "
                "data FROM blobs WHERE namespace = ? AND key = ?",
                (namespace, key),
            ).fetchone()
        if row is None:
            if key in manifest.entries:
                raise _removed(key)
            return None
        info, opened_data = self._open_blob(namespace, manifest, *row)
        return Blob(
            key,
            opened_data,
            info.metadata,
            info.embedding,
            info.size_bytes,
            info.updated_at,
            info.revision,
        )

    def delete_blob(self, namespace: str, key: str) -> bool:
        """Whether there was a blob to delete (or one the vault wrote and found missing)."""
        with self._transaction() as db:
            deleted = (
                db.execute(
                    "DELETE FROM blobs WHERE namespace = ? AND key = ?", (namespace, key)
                ).rowcount
                > 0
            )
            entries = dict(self._manifest_to_update(db, namespace).entries)
            listed = entries.pop(key, None) is not None
            manifest = self._seal_manifest(db, namespace, entries)
        self._manifests[namespace] = manifest
        return deleted or listed

    def list_blobs(
        self, namespace: str, prefix: str = "", after: str = "", limit: int = 100
    ) -> BlobPage:
        """Up to `limit` blobs whose key starts with `prefix`, in key order, after the key
        `after`; those that do not open (and those missing) are in `unreadable`."""
        with self._snapshot() as db:
            manifest, broken = self._manifest_for_listing(db, namespace)
            rows = db.execute(
                "SELECT key, revision, size_bytes, updated_at, aad, kek_id, wrapped_key, header "
                "FROM blobs WHERE namespace = ? AND key > ? AND substr(key, 1, ?) = ? "
                "ORDER BY key LIMIT ?",
                (namespace, after, len(prefix), prefix, limit),
            ).fetchall()
        # Keys the vault wrote whose rows are gone, up to the last row of a full page.
        found = {row[0] for row in rows}
        upper = rows[-1][0] if len(rows) == limit else None
        gone = (k for k in _keys_in(manifest.keys, prefix, after, upper) if k not in found)
        page: list[tuple[str, BlobInfo | Unreadable]] = [
            (key, _unreadable(key, _removed(key))) for key in itertools.islice(gone, limit)
        ]
        page += [(row[0], self._readable(namespace, manifest, broken, row)) for row in rows]
        chosen = [entry for _, entry in sorted(page, key=lambda pair: pair[0])[:limit]]
        return BlobPage(
            [e for e in chosen if isinstance(e, BlobInfo)],
            [e for e in chosen if isinstance(e, Unreadable)],
        )

    def blobs_with_embeddings(self, namespace: str) -> BlobPage:
        """Every blob of the namespace that has an embedding, and those that do not open."""
        with self._snapshot() as db:
            manifest, broken = self._manifest_for_listing(db, namespace)
            rows = db.execute(
                "SELECT key, revision, size_bytes, updated_at, aad, kek_id, wrapped_key, header "
                "FROM blobs WHERE namespace = ? ORDER BY key",
                (namespace,),
            ).fetchall()
        opened = [self._readable(namespace, manifest, broken, row) for row in rows]
        return BlobPage(
            [e for e in opened if isinstance(e, BlobInfo) and e.embedding],
            [e for e in opened if isinstance(e, Unreadable)],
        )

    def _readable(
        self,
        namespace: str,
        manifest: _Manifest,
        broken: RecordUnreadable | None,
        row: tuple[Any, ...],
    ) -> BlobInfo | Unreadable:
        """One listed row, opened, or the reason it does not open."""
        if broken is not None:
            return _unreadable(row[0], broken)
        try:
            return self._open_blob(namespace, manifest, *row)[0]
        except RecordUnreadable as exc:
            return _unreadable(row[0], exc)

    def _open_blob(
        self,
        namespace: str,
        manifest: _Manifest,
        key: str,
        revision: int,
        size: int,
        updated: str,
        aad: int,
        kek_id: str,
        wrapped: bytes,
        header: bytes,
        data: bytes | None = None,
    ) -> tuple[BlobInfo, bytes]:
        """The blob's fields (and its data, when given) once the manifest vouches for it and
        it opens; `RecordRolledBack` or `RecordUnreadable` otherwise."""
        record = f"blob {key!r}"
        expected = manifest.entries.get(key)
        if expected is None:
            raise RecordRolledBack(
                f"{record} is not one the vault wrote: restored after its deletion, or "
                "written outside the vault"
            )
        if expected != _fingerprint(header):
            raise RecordRolledBack(
                f"{record} revision {revision} is not the one the vault last wrote "
                "(an older copy, or another row's)"
            )
        parts = [(0, header)] if data is None else [(0, header), (1, data)]
        opened = self._open(
            record,
            kek_id,
            wrapped,
            _blob_aad(aad, namespace, key, revision, size, updated),
            *parts,
        )
        try:
            fields = strict_json.loads(opened[0], _HEADER_DEPTH)
            info = BlobInfo(key, size, updated, revision, fields["metadata"], fields["embedding"])
        except (strict_json.JsonError, TypeError, KeyError) as exc:
            reason = exc if isinstance(exc, strict_json.JsonError) else "is not a blob header"
            raise RecordUnreadable(f"{record}: its metadata {reason}") from None
        return info, opened[1] if data is not None else b""

    # -- manifests ----------------------------------------------------------------------------

    def _manifest(self, db: sqlite3.Connection, namespace: str) -> _Manifest:
        """The namespace's manifest, verified (kept in memory until it changes on disk);
        empty when there is none. `RecordUnreadable` when it does not open."""
        row = db.execute(
            "SELECT kek_id, wrapped_key FROM manifests WHERE namespace = ?", (namespace,)
        ).fetchone()
        if row is None:
            return _NO_MANIFEST
        kek_id, wrapped = row
        cached = self._manifests.get(namespace)
        if cached is not None and cached.wrapped_key == wrapped:
            return cached
        (sealed,) = db.execute(
            "SELECT sealed FROM manifests WHERE namespace = ?", (namespace,)
        ).fetchone()
        record = f"the manifest of namespace {namespace!r}"
        (opened,) = self._open(record, kek_id, wrapped, _manifest_aad(namespace), (0, sealed))
        try:
            entries = strict_json.loads(opened, 1)
        except strict_json.JsonError as exc:
            raise RecordUnreadable(f"{record} {exc}") from None
        if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
            raise RecordUnreadable(f"{record} is not a manifest")
        manifest = _Manifest(bytes(wrapped), entries, sorted(entries))
        self._manifests[namespace] = manifest
        return manifest

    def _manifest_for_listing(
        self, db: sqlite3.Connection, namespace: str
    ) -> tuple[_Manifest, RecordUnreadable | None]:
        """The manifest, or why it does not open: then each listed blob reports that."""
        try:
            return self._manifest(db, namespace), None
        except RecordUnreadable as exc:
            return _NO_MANIFEST, exc

    def _manifest_to_update(self, db: sqlite3.Connection, namespace: str) -> _Manifest:
        """The manifest a write starts from. One that does not open is started afresh: the
        blobs it vouched for are reported (never served) until each is written or deleted."""
        try:
            return self._manifest(db, namespace)
        except RecordUnreadable:
            return _NO_MANIFEST

    def _seal_manifest(
        self, db: sqlite3.Connection, namespace: str, entries: dict[str, str]
    ) -> _Manifest:
        """Seal and store the manifest (inside the caller's transaction); the caller keeps
        the result once the transaction committed."""
        plain = json.dumps(entries, separators=(",", ":"), sort_keys=True).encode()
        sealed = seal(self.provider.current(), _manifest_aad(namespace), plain)
        db.execute(
            "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?)",
            (namespace, sealed.kek_id, sealed.wrapped_key, sealed.parts[0]),
        )
        return _Manifest(sealed.wrapped_key, entries, sorted(entries))

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

    def write_audit(self, rows: list[AuditRow]) -> None:
        """Record uses in one transaction: all of them, or none (then the caller still has
        them to write again)."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO audit (at, secret, action, runtime, organ, op) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(r.at, r.secret, r.action, r.runtime, r.organ, r.op) for r in rows],
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
