"""The vault: envelope encryption, versions, rotation, tampering, wrong keys, damage."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from sidecar.vault.kek import CredentialProvider, KekError, KeyFileProvider
from sidecar.vault.open import kek_provider, open_vault
from sidecar.vault.store import (
    RecordUnreadable,
    SecretNotFound,
    Vault,
    VaultError,
    VaultUnavailable,
)
from soma_runtime.config import SomaConfig, parse_config


def make_config(tmp_path: Path, **vault: object) -> SomaConfig:
    return parse_config({"soma": {"state_dir": str(tmp_path / "state")}, "vault": vault})


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    return open_vault(make_config(tmp_path))


def reveal(vault: Vault, name: str) -> bytes:
    return vault.reveal(name, runtime="test", organ="test", op="test")


def test_round_trip_and_versions(vault: Vault) -> None:
    assert vault.set_secret("openai", b"sk-first") == 1
    assert vault.set_secret("openai", b"sk-second") == 2
    assert vault.set_secret("github", b"ghp-value") == 1
    assert reveal(vault, "openai") == b"sk-second"
    info = {s.name: s for s in vault.list_secrets()}
    assert info["openai"].versions == 2 and info["openai"].latest == 2
    assert vault.delete_secret("openai") == 2
    with pytest.raises(SecretNotFound, match="'openai'"):
        reveal(vault, "openai")
    with pytest.raises(SecretNotFound):
        vault.delete_secret("openai")
    assert reveal(vault, "github") == b"ghp-value"


def test_values_are_not_stored_in_the_clear(vault: Vault) -> None:
    vault.set_secret("openai", b"sk-plaintext-marker-123")
    vault.put_blob("ns", "doc", b"blob-plaintext-marker", {"m": "meta-marker"}, [1.0, 2.0])
    vault.close()
    raw = b"".join(p.read_bytes() for p in vault.path.parent.glob("vault.db*"))
    for marker in (b"sk-plaintext-marker-123", b"blob-plaintext-marker", b"meta-marker"):
        assert marker not in raw


def test_bad_names_and_values_are_refused(vault: Vault) -> None:
    for name in ("../x", "UPPER", "", "a" * 65, "a b", "openai\n"):
        with pytest.raises(VaultError, match="not a secret name"):
            vault.set_secret(name, b"v")
    with pytest.raises(VaultError, match="empty"):
        vault.set_secret("x", b"")
    with pytest.raises(VaultError, match="exceeds"):
        vault.set_secret("x", b"v" * (64 * 1024 + 1))


def test_every_use_is_audited_without_the_value(vault: Vault) -> None:
    vault.set_secret("openai", b"sk-audited-value")
    vault.reveal("openai", runtime="claims", organ="http", op="http.request")
    entries = vault.audit_log("openai")
    assert entries[0]["action"] == "use"
    assert (entries[0]["runtime"], entries[0]["organ"], entries[0]["op"]) == (
        "claims",
        "http",
        "http.request",
    )
    assert entries[1]["action"] == "set"
    assert "sk-audited-value" not in str(entries)


def test_files_are_private(tmp_path: Path, vault: Vault) -> None:
    vault.set_secret("x", b"value")
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in state.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_rotation_rewraps_every_data_key(tmp_path: Path, vault: Vault) -> None:
    for i in range(5):
        vault.set_secret(f"s{i}", f"value-{i}".encode())
    vault.put_blob("ns", "doc", b"data", {"a": 1}, None)
    old_id = vault.provider.current().kek_id
    old_key = (tmp_path / "state" / "kek").read_bytes()
    assert vault.rotate_kek() == 6
    assert vault.provider.current().kek_id != old_id
    assert (tmp_path / "state" / "kek").read_bytes() != old_key
    assert not (tmp_path / "state" / "kek.next").exists()
    reopened = open_vault(make_config(tmp_path))
    assert [reveal(reopened, f"s{i}") for i in range(5)] == [
        f"value-{i}".encode() for i in range(5)
    ]
    blob = reopened.get_blob("ns", "doc")
    assert blob is not None and blob.data == b"data"
    ids = {
        row[0]
        for row in sqlite3.connect(tmp_path / "state" / "vault.db").execute(
            "SELECT kek_id FROM secrets UNION SELECT kek_id FROM blobs"
        )
    }
    assert ids == {reopened.provider.current().kek_id}


def corrupt(path: Path, sql: str, *args: object) -> None:
    with sqlite3.connect(path) as db:
        db.execute(sql, args)


def test_tampered_and_truncated_ciphertexts_name_the_secret(tmp_path: Path, vault: Vault) -> None:
    vault.set_secret("good", b"fine")
    vault.set_secret("flipped", b"value")
    vault.set_secret("short", b"value")
    db = tmp_path / "state" / "vault.db"
    (ciphertext,) = (
        sqlite3.connect(db)
        .execute("SELECT ciphertext FROM secrets WHERE name = 'flipped'")
        .fetchone()
    )
    corrupt(
        db,
        "UPDATE secrets SET ciphertext = ? WHERE name = 'flipped'",
        ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]),
    )
    corrupt(db, "UPDATE secrets SET ciphertext = substr(ciphertext, 1, 10) WHERE name = 'short'")
    with pytest.raises(RecordUnreadable, match="secret 'flipped' version 1 cannot be decrypted"):
        reveal(vault, "flipped")
    with pytest.raises(RecordUnreadable, match=r"secret 'short' version 1.*truncated"):
        reveal(vault, "short")
    assert reveal(vault, "good") == b"fine"  # the others are unaffected
    assert vault.audit_log("flipped")[0]["action"] == "use-failed"


def test_a_ciphertext_moved_to_another_row_does_not_open(tmp_path: Path, vault: Vault) -> None:
    vault.set_secret("a", b"value-a")
    vault.set_secret("b", b"value-b")
    db = tmp_path / "state" / "vault.db"
    row = (
        sqlite3.connect(db)
        .execute("SELECT kek_id, wrapped_key, ciphertext FROM secrets WHERE name = 'a'")
        .fetchone()
    )
    corrupt(
        db, "UPDATE secrets SET kek_id = ?, wrapped_key = ?, ciphertext = ? WHERE name = 'b'", *row
    )
    with pytest.raises(RecordUnreadable, match="secret 'b'"):
        reveal(vault, "b")
    vault.set_secret("a", b"value-a2")  # the same row contents as another version fail too
    corrupt(
        db,
        "UPDATE secrets SET kek_id = ?, wrapped_key = ?, ciphertext = ? "
        "WHERE name = 'a' AND version = 2",
        *row,
    )
    with pytest.raises(RecordUnreadable, match="secret 'a' version 2"):
        reveal(vault, "a")


def test_a_wrong_kek_is_a_clear_error(tmp_path: Path, vault: Vault) -> None:
    vault.set_secret("openai", b"value")
    key = tmp_path / "state" / "kek"
    key.write_bytes(os.urandom(32))
    other = open_vault(make_config(tmp_path))
    with pytest.raises(
        RecordUnreadable,
        match=r"secret 'openai' version 1 was sealed under key-encryption key [0-9a-f]{16}",
    ):
        reveal(other, "openai")


def test_a_kek_file_others_can_read_is_refused(tmp_path: Path, vault: Vault) -> None:
    key = tmp_path / "state" / "kek"
    key.chmod(0o640)
    with pytest.raises(KekError, match="readable by others"):
        kek_provider(make_config(tmp_path))
    with pytest.raises(VaultUnavailable, match="readable by others"):
        open_vault(make_config(tmp_path))


def test_a_kek_file_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    key = tmp_path / "state" / "kek"
    key.write_bytes(b"short")
    key.chmod(0o600)
    with pytest.raises(KekError, match="does not hold a 32-byte key"):
        KeyFileProvider(key)


def test_a_corrupt_database_is_a_clear_error(tmp_path: Path, vault: Vault) -> None:
    vault.set_secret("x", b"value")
    vault.close()
    db = tmp_path / "state" / "vault.db"
    db.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    with pytest.raises(VaultUnavailable, match=r"vault\.db cannot be used"):
        open_vault(make_config(tmp_path))


def test_systemd_credential_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    (creds / "soma-kek").write_text(os.urandom(32).hex() + "\n")
    (creds / "soma-kek").chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = make_config(tmp_path)
    assert isinstance(kek_provider(config), CredentialProvider)  # "auto" prefers it
    vault = open_vault(config)
    vault.set_secret("x", b"value")
    assert not (tmp_path / "state" / "kek").exists()  # no key file was made
    # systemd rotates the credential; the old one stays readable as "<name>.previous"
    (creds / "soma-kek").rename(creds / "soma-kek.previous")
    (creds / "soma-kek").write_bytes(os.urandom(32))
    (creds / "soma-kek").chmod(0o400)
    rotated = open_vault(config)
    assert reveal(rotated, "x") == b"value"
    assert rotated.rotate_kek() == 1
    (creds / "soma-kek.previous").unlink()
    assert reveal(open_vault(config), "x") == b"value"
    with pytest.raises(KekError, match="no credential 'other'"):
        kek_provider(make_config(tmp_path, kek="systemd-credential", credential="other"))


def test_blobs(vault: Vault) -> None:
    assert vault.put_blob("claims", "doc-1", b"one", {"kind": "form"}, [1.0, 0.0]) == 1
    assert vault.put_blob("claims", "doc-1", b"uno", {"kind": "form"}, [1.0, 0.0]) == 2
    vault.put_blob("claims", "doc-2", b"two", {}, None)
    vault.put_blob("triage", "doc-1", b"other namespace", {}, None)
    blob = vault.get_blob("claims", "doc-1")
    assert blob is not None and (blob.data, blob.revision) == (b"uno", 2)
    assert [b.key for b in vault.list_blobs("claims").items] == ["doc-1", "doc-2"]
    assert [b.key for b in vault.list_blobs("claims", after="doc-1").items] == ["doc-2"]
    assert [b.key for b in vault.list_blobs("claims", prefix="doc-2").items] == ["doc-2"]
    assert [b.key for b in vault.blobs_with_embeddings("claims").items] == ["doc-1"]
    assert vault.delete_blob("claims", "doc-1") and not vault.delete_blob("claims", "doc-1")
    assert vault.get_blob("claims", "doc-1") is None
    triage = vault.get_blob("triage", "doc-1")
    assert triage is not None and triage.data == b"other namespace"


def test_a_running_sidecar_follows_a_rotation_done_by_another_process(tmp_path: Path) -> None:
    """`soma secrets rotate-kek` while the sidecar runs: the sidecar's open vault picks the new
    key up from disk, and a record it sealed under the old key just before still opens."""
    sidecar = open_vault(make_config(tmp_path), durable=False)
    sidecar.set_secret("api", b"value-1")
    old = sidecar.provider.current()
    cli = open_vault(make_config(tmp_path))
    cli.rotate_kek()
    assert reveal(sidecar, "api") == b"value-1"  # re-wrapped under a key it never loaded
    assert sidecar.provider.current().kek_id != old.kek_id
    sidecar.put_blob("ns", "after", b"sealed under the new key", {}, None)
    # a write that raced the rotation, sealed under the old key: found as "kek.previous"
    assert sidecar.provider.find(old.kek_id) is not None
    reopened = open_vault(make_config(tmp_path))
    blob = reopened.get_blob("ns", "after")
    assert blob is not None and blob.data == b"sealed under the new key"
    assert (tmp_path / "state" / "kek.previous").exists()
