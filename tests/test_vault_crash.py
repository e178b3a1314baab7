"""Crash safety: SIGKILL a real process at many points of `set`, `rotate-kek` and the schema
migration; afterwards every secret and blob still opens, as its old or its new version,
never neither."""

from __future__ import annotations

import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from sidecar.vault.open import open_vault
from sidecar.vault.store import Vault
from soma_runtime.config import parse_config
from tests.fixtures.legacy_vault import write_v1_vault
from tests.fixtures.vault_worker import SECRETS
from tests.helpers import REPO, child_env, run_soma, set_secret


def vault_at(state: Path) -> Vault:
    return open_vault(parse_config({"soma": {"state_dir": str(state)}}))


class Worker:
    def __init__(self, mode: str, state: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fixtures.vault_worker", mode, str(state)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=child_env(),
            text=True,
        )

    def wait_for(self, operations: int) -> None:
        assert self.proc.stdout is not None
        for _ in range(operations):
            if not self.proc.stdout.readline():
                raise AssertionError(f"the worker died: {self.proc.stderr.read()}")  # type: ignore[union-attr]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        assert self.proc.returncode == -signal.SIGKILL


def reveal(vault: Vault, name: str) -> str:
    return vault.reveal(name, runtime="test", organ="test", op="check").decode()


def test_sigkill_during_set_never_loses_a_secret(tmp_path: Path) -> None:
    state = tmp_path / "state"
    vault = vault_at(state)
    for j in range(SECRETS):
        vault.set_secret(f"s{j}", b"v0")
    vault.close()
    rng = random.Random(1)
    for round_ in range(15):
        worker = Worker("set", state)
        worker.wait_for(rng.randint(1, 30))
        time.sleep(rng.uniform(0, 0.01))  # the kill lands at an arbitrary point of a set
        worker.kill()
        vault = vault_at(state)
        for j in range(SECRETS):
            value = reveal(vault, f"s{j}")
            match = re.fullmatch(r"v(\d+)", value)
            assert match, (round_, j, value)
            n = int(match.group(1))
            assert n == 0 or n % SECRETS == j
        vault.close()


def test_sigkill_during_rotate_kek_never_loses_a_secret(tmp_path: Path) -> None:
    state = tmp_path / "state"
    vault = vault_at(state)
    for j in range(150):
        vault.set_secret(f"secret-{j}", f"value-{j}".encode())
    for j in range(30):
        vault.put_blob("ns", f"blob-{j}", f"data-{j}".encode(), {"j": j}, [float(j), 1.0])
    vault.close()
    rng = random.Random(2)
    started = time.monotonic()
    worker = Worker("rotate", state)
    worker.wait_for(3)
    per_rotation = (time.monotonic() - started) / 3
    worker.kill()
    key_files = set()
    for _round in range(12):
        worker = Worker("rotate", state)
        worker.wait_for(rng.randint(0, 2))
        time.sleep(rng.uniform(0, per_rotation))  # anywhere inside a rotation
        worker.kill()
        key_files.add(tuple(sorted(p.name for p in state.glob("kek*"))))
        vault = vault_at(state)  # finishes a rotation the kill interrupted after its commit
        for j in range(150):
            assert reveal(vault, f"secret-{j}") == f"value-{j}"
        for j in range(30):
            blob = vault.get_blob("ns", f"blob-{j}")
            assert blob is not None and blob.data == f"data-{j}".encode()
        vault.close()
    assert any("kek.next" not in names for names in key_files)  # some kills between rotations
    assert any("kek.next" in names for names in key_files)  # ...and some inside one


def test_rotate_kek_command(tmp_path: Path) -> None:
    config = tmp_path / "soma.toml"
    config.write_text('[soma]\nstate_dir = "state"\n')
    set_secret(config, "api", "sk-rotate-me")
    rotate = run_soma("secrets", "rotate-kek", "--config", str(config))
    assert rotate.returncode == 0, rotate.stderr
    assert re.match(
        r"re-wrapped 1 data key\(s\) under key-encryption key [0-9a-f]{16}", rotate.stdout
    )
    assert reveal(vault_at(tmp_path / "state"), "api") == "sk-rotate-me"


MIGRATE = (
    "import sys; from sidecar.vault.open import open_vault; "
    "from soma_runtime.config import parse_config; "
    "config = parse_config({'soma': {'state_dir': sys.argv[1]}}); "
    "print('migrating', flush=True); open_vault(config)"
)


def test_sigkill_during_the_schema_migration_never_loses_a_blob(tmp_path: Path) -> None:
    """A version-1 vault is re-sealed and given manifests in one transaction: killed at any
    point, every blob still opens (migrated or not), and the next open finishes the job."""
    pristine = tmp_path / "pristine"
    blobs = {("ns", f"blob-{j}"): ({"j": j}, None, bytes([j]) * 30_000) for j in range(200)}
    write_v1_vault(pristine, blobs)
    rng = random.Random(3)
    started = time.monotonic()
    vault_at(shutil.copytree(pristine, tmp_path / "timing")).close()
    duration = time.monotonic() - started
    outcomes = set()
    for round_ in range(8):
        state = shutil.copytree(pristine, tmp_path / f"round-{round_}")
        worker = subprocess.Popen(
            [sys.executable, "-c", MIGRATE, str(state)],
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=child_env(),
            text=True,
        )
        assert worker.stdout is not None and worker.stdout.readline() == "migrating\n"
        time.sleep(rng.uniform(0, duration))  # the kill lands anywhere in the migration
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        with sqlite3.connect(state / "vault.db") as db:
            outcomes.add(db.execute("PRAGMA user_version").fetchone()[0])
        db.close()
        vault = vault_at(state)
        for (namespace, key), (metadata, _, data) in blobs.items():
            blob = vault.get_blob(namespace, key)
            assert blob is not None and (blob.metadata, blob.data) == (metadata, data), key
        vault.close()
    assert 1 in outcomes  # some kills landed before the migration committed
