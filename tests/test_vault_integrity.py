"""What the vault notices on disk: a column altered, a blob rolled back, restored or removed
behind its back, a blob that is not strict JSON inside; each reported on its own, the
others unaffected. And the migration that brings older databases to all that."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from sidecar.vault.open import open_vault
from sidecar.vault.store import (
    SCHEMA_VERSION,
    RecordRolledBack,
    RecordUnreadable,
    Unreadable,
    Vault,
    VaultError,
)
from soma_runtime.config import SomaConfig, parse_config
from tests.fixtures.legacy_vault import write_v1_vault


def make_config(tmp_path: Path) -> SomaConfig:
    return parse_config({"soma": {"state_dir": str(tmp_path / "state")}})


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    return open_vault(make_config(tmp_path))


def sql(tmp_path: Path, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """What an attacker with write access to vault.db (and no KEK) can do."""
    with sqlite3.connect(tmp_path / "state" / "vault.db") as db:
        rows = db.execute(query, args).fetchall()
    db.close()
    return rows


def listed(vault: Vault, namespace: str = "ns") -> tuple[list[str], list[tuple[str, str]]]:
    page = vault.list_blobs(namespace)
    return [i.key for i in page.items], [(u.key, u.kind) for u in page.unreadable]


TAMPERING = {
    "size_bytes": "UPDATE blobs SET size_bytes = 999 WHERE key = 'doc'",
    "updated_at": "UPDATE blobs SET updated_at = '2000-01-01T00:00:00.000Z' WHERE key = 'doc'",
    "revision": "UPDATE blobs SET revision = 7 WHERE key = 'doc'",
}


@pytest.mark.parametrize("column", TAMPERING)
def test_every_column_a_caller_sees_is_bound_to_the_ciphertext(
    tmp_path: Path, vault: Vault, column: str
) -> None:
    vault.put_blob("ns", "doc", b"data", {"m": 1}, None)
    vault.put_blob("ns", "other", b"intact", {}, None)
    sql(tmp_path, TAMPERING[column])
    with pytest.raises(RecordUnreadable, match="blob 'doc' cannot be decrypted"):
        vault.get_blob("ns", "doc")
    assert listed(vault) == (["other"], [("doc", "RecordUnreadable")])
    other = vault.get_blob("ns", "other")
    assert other is not None and other.data == b"intact"


def test_a_blob_rolled_back_to_an_older_copy_is_reported(tmp_path: Path, vault: Vault) -> None:
    vault.put_blob("ns", "doc", b"first", {}, None)
    (old,) = sql(tmp_path, "SELECT * FROM blobs WHERE key = 'doc'")
    vault.put_blob("ns", "doc", b"second", {}, None)
    vault.put_blob("ns", "other", b"intact", {}, None)
    sql(tmp_path, "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", *old)
    message = "blob 'doc' revision 1 is not the one the vault last wrote"
    with pytest.raises(RecordRolledBack, match=message):
        vault.get_blob("ns", "doc")
    assert listed(vault) == (["other"], [("doc", "RecordRolledBack")])
    reopened = open_vault(make_config(tmp_path))  # the manifest is on disk, not only in memory
    with pytest.raises(RecordRolledBack, match=message):
        reopened.get_blob("ns", "doc")
    reopened.put_blob("ns", "doc", b"third", {}, None)  # a new write supersedes it
    blob = reopened.get_blob("ns", "doc")
    assert blob is not None and (blob.data, blob.revision) == (b"third", 2)


def test_a_blob_restored_after_its_deletion_or_removed_behind_the_vaults_back(
    tmp_path: Path, vault: Vault
) -> None:
    vault.put_blob("ns", "restored", b"deleted once", {}, None)
    (row,) = sql(tmp_path, "SELECT * FROM blobs WHERE key = 'restored'")
    assert vault.delete_blob("ns", "restored")
    sql(tmp_path, "INSERT INTO blobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", *row)
    vault.put_blob("ns", "removed", b"gone", {}, None)
    vault.put_blob("ns", "kept", b"intact", {}, None)
    sql(tmp_path, "DELETE FROM blobs WHERE key = 'removed'")
    with pytest.raises(RecordRolledBack, match="blob 'restored' is not one the vault wrote"):
        vault.get_blob("ns", "restored")
    with pytest.raises(RecordRolledBack, match="blob 'removed' was removed outside the vault"):
        vault.get_blob("ns", "removed")
    assert listed(vault) == (
        ["kept"],
        [("removed", "RecordRolledBack"), ("restored", "RecordRolledBack")],
    )
    page = vault.list_blobs("ns", limit=2)  # pages count reported blobs too, in key order
    assert [i.key for i in page.items] == ["kept"]
    assert [u.key for u in page.unreadable] == ["removed"]
    assert vault.delete_blob("ns", "removed") and vault.delete_blob("ns", "restored")
    assert listed(vault) == (["kept"], [])
    assert vault.get_blob("ns", "removed") is None


def test_what_the_manifest_cannot_see_a_whole_namespace_put_back(
    tmp_path: Path, vault: Vault
) -> None:
    """The documented limit: rows and manifest rolled back together are an earlier state
    the vault itself wrote; telling it from the present needs an anchor outside the file."""
    vault.put_blob("ns", "doc", b"first", {}, None)
    (row,) = sql(tmp_path, "SELECT * FROM blobs WHERE key = 'doc'")
    (manifest,) = sql(tmp_path, "SELECT * FROM manifests WHERE namespace = 'ns'")
    vault.put_blob("ns", "doc", b"second", {}, None)
    sql(tmp_path, "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", *row)
    sql(tmp_path, "INSERT OR REPLACE INTO manifests VALUES (?, ?, ?, ?)", *manifest)
    blob = open_vault(make_config(tmp_path)).get_blob("ns", "doc")
    assert blob is not None and blob.data == b"first"


def test_a_damaged_manifest_withholds_its_namespace_only(tmp_path: Path, vault: Vault) -> None:
    vault.put_blob("ns", "a", b"A", {}, None)
    vault.put_blob("ns", "b", b"B", {}, None)
    vault.put_blob("elsewhere", "c", b"C", {}, None)
    sql(tmp_path, "UPDATE manifests SET sealed = substr(sealed, 1, 20) WHERE namespace = 'ns'")
    reopened = open_vault(make_config(tmp_path))
    with pytest.raises(RecordUnreadable, match=r"the manifest of namespace 'ns' .*truncated"):
        reopened.get_blob("ns", "a")
    assert listed(reopened) == ([], [("a", "RecordUnreadable"), ("b", "RecordUnreadable")])
    assert listed(reopened, "elsewhere") == (["c"], [])
    # a write starts a new manifest; what the damaged one vouched for stays reported
    reopened.put_blob("ns", "a", b"A2", {}, None)
    assert listed(reopened) == (["a"], [("b", "RecordRolledBack")])


def test_rotation_rewraps_the_manifests(tmp_path: Path, vault: Vault) -> None:
    vault.put_blob("ns", "doc", b"data", {}, None)
    vault.rotate_kek()
    vault.rotate_kek()  # the first KEK is gone from disk entirely
    reopened = open_vault(make_config(tmp_path))
    blob = reopened.get_blob("ns", "doc")
    assert blob is not None and blob.data == b"data"
    current = reopened.provider.current().kek_id
    assert sql(tmp_path, "SELECT DISTINCT kek_id FROM manifests") == [(current,)]


LEGACY = {
    ("shared", "good"): ({"n": 1.5}, [1.0, 0.0], b"G"),
    ("shared", "nan"): ({"x": float("nan")}, None, b"N"),
    ("shared", "inf"): ({"x": [float("-inf")]}, None, b"I"),
    ("other", "k"): ({}, None, b"K"),
}


def test_an_older_vault_is_migrated_and_its_poisoned_blobs_reported_alone(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    write_v1_vault(state, LEGACY)
    vault = open_vault(make_config(tmp_path))
    assert sql(tmp_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert sql(tmp_path, "SELECT DISTINCT aad FROM blobs") == [(2,)]
    good = vault.get_blob("shared", "good")
    assert good is not None
    assert (good.data, good.metadata, good.embedding) == (b"G", {"n": 1.5}, [1.0, 0.0])
    assert (good.size_bytes, good.updated_at) == (1, "2026-01-02T03:04:05.000Z")
    for key in ("nan", "inf"):
        with pytest.raises(RecordUnreadable, match=f"blob '{key}': its metadata is not valid JSON"):
            vault.get_blob("shared", key)
    page = vault.list_blobs("shared")
    assert [i.key for i in page.items] == ["good"]
    assert [u.key for u in page.unreadable] == ["inf", "nan"]
    assert isinstance(page.unreadable[0], Unreadable)
    assert "NaN, Infinity and -Infinity" in page.unreadable[0].message
    assert [i.key for i in vault.blobs_with_embeddings("shared").items] == ["good"]
    other = vault.get_blob("other", "k")
    assert other is not None and other.data == b"K"
    # migrated blobs are bound to all their columns from now on
    sql(tmp_path, "UPDATE blobs SET updated_at = 'yesterday' WHERE key = 'good'")
    with pytest.raises(RecordUnreadable, match="blob 'good' cannot be decrypted"):
        vault.get_blob("shared", "good")


def test_a_blob_whose_kek_is_missing_at_migration_opens_once_the_key_is_back(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    write_v1_vault(state, {("ns", "doc"): ({"a": 1}, None, b"data")})
    (state / "kek").rename(tmp_path / "old-kek")
    (state / "kek").write_bytes(os.urandom(32))
    (state / "kek").chmod(0o600)
    vault = open_vault(make_config(tmp_path))  # migrates what it can open: nothing here
    with pytest.raises(RecordUnreadable, match="was sealed under key-encryption key"):
        vault.get_blob("ns", "doc")
    (tmp_path / "old-kek").rename(state / "kek.previous")
    blob = open_vault(make_config(tmp_path)).get_blob("ns", "doc")
    assert blob is not None and (blob.data, blob.metadata) == (b"data", {"a": 1})
    assert sql(tmp_path, "SELECT aad FROM blobs") == [(1,)]  # still its old seal


def test_non_finite_numbers_are_never_stored(vault: Vault) -> None:
    for metadata, embedding in [({"x": float("nan")}, None), ({}, [float("inf"), 1.0])]:
        with pytest.raises(VaultError, match="NaN and Infinity cannot be stored"):
            vault.put_blob("ns", "doc", b"", metadata, embedding)
    assert vault.get_blob("ns", "doc") is None
