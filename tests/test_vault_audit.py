"""Audit rows written in batches: every use lands, a stop writes what waits, a failing write
is reported and retried without stopping uses, and a full queue refuses uses (never rows)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
import structlog

from sidecar.credentials import CredentialBroker
from sidecar.vault.async_vault import AsyncVault
from sidecar.vault.audit import AuditQueue, AuditUnavailable
from sidecar.vault.open import VAULT_FILE, open_vault
from sidecar.vault.store import AuditRow
from soma_runtime.config import CredentialSection, SomaConfig, parse_config

SECRET = "sk-audited-0123456789"


@pytest.fixture
def config(tmp_path: Path) -> SomaConfig:
    config = parse_config(
        {
            "soma": {"state_dir": str(tmp_path / "state")},
            "credential": [{"name": "api", "hosts": ["api.example.com"]}],
        }
    )
    open_vault(config).set_secret("api", SECRET.encode())
    return config


def uses(config: SomaConfig) -> int:
    """The `use` rows in the vault, read by another connection."""
    with sqlite3.connect(config.state_dir / VAULT_FILE) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM audit WHERE action = 'use'").fetchone()
    return int(count)


async def until(predicate: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def broker_of(config: SomaConfig, vault: AsyncVault, cache_s: float = 5.0) -> CredentialBroker:
    settings: list[CredentialSection] = config.credential
    return CredentialBroker(settings, vault, cache_s=cache_s)


async def test_every_use_lands_in_the_audit_table(config: SomaConfig) -> None:
    vault = AsyncVault(lambda: open_vault(config, durable=False))
    broker = broker_of(config, vault)
    try:
        await asyncio.gather(
            *(
                broker.resolve(
                    ["api"], runtime=f"r{i % 3}", allowed=frozenset({"api"}), organ="g", op="m"
                )
                for i in range(200)
            )
        )
        await until(lambda: vault.audit_queue.pending == 0, "the queue written")
        assert uses(config) == 200
    finally:
        await vault.close()
    assert uses(config) == 200  # and no more


async def test_a_stop_writes_every_queued_row(config: SomaConfig) -> None:
    vault = open_vault(config, durable=False)
    loop = asyncio.get_running_loop()

    async def write(rows: list[AuditRow]) -> None:
        await loop.run_in_executor(None, vault.write_audit, rows)

    queue = AuditQueue(write, flush_s=3600.0)  # only the stop writes
    for i in range(50):
        await queue.record(AuditRow("api", "use", f"r{i}", "g", "m"))
    assert queue.pending == 50 and uses(config) == 0
    await queue.close()
    assert uses(config) == 50
    with pytest.raises(AuditUnavailable):  # nothing is taken that could not be written
        await queue.record(AuditRow("api", "use", "late", "g", "m"))


async def test_a_failing_audit_write_is_reported_and_retried(config: SomaConfig) -> None:
    vault = AsyncVault(lambda: open_vault(config, durable=False))
    broker = broker_of(config, vault)
    allowed = frozenset({"api"})
    try:
        await broker.resolve(["api"], runtime="r", allowed=allowed, organ="g", op="m")
        await until(lambda: uses(config) == 1, "the first row")
        with sqlite3.connect(config.state_dir / VAULT_FILE) as db:
            db.execute("ALTER TABLE audit RENAME TO audit_away")  # every INSERT now fails
        with structlog.testing.capture_logs() as logs:
            for _ in range(5):  # uses go on meanwhile
                found = await broker.resolve(
                    ["api"], runtime="r", allowed=allowed, organ="g", op="m"
                )
                assert found["api"].reveal() == SECRET
            await until(lambda: vault.audit_queue.failures >= 1, "a failed write")
        failed = [e for e in logs if e["event"] == "audit_write_failed"]
        assert failed and failed[0]["log_level"] == "error" and failed[0]["rows"] >= 1
        assert SECRET not in str(logs)
        with sqlite3.connect(config.state_dir / VAULT_FILE) as db:
            db.execute("ALTER TABLE audit_away RENAME TO audit")
        await until(lambda: uses(config) == 6, "the kept rows written on a retry")
    finally:
        await vault.close()
    assert uses(config) == 6


async def test_a_full_queue_refuses_uses_and_keeps_every_row(config: SomaConfig) -> None:
    written: list[AuditRow] = []
    broken = True

    async def write(rows: list[AuditRow]) -> None:
        if broken:  # as the real vault fails: see the test above
            raise AuditUnavailable("the disk is full")
        written.extend(rows)

    queue = AuditQueue(write, max_pending=3, flush_s=0.001, full_wait_s=0.2)
    rows = [AuditRow("api", "use", f"r{i}", "g", "m") for i in range(4)]
    for row in rows[:3]:
        await queue.record(row)
    with pytest.raises(AuditUnavailable):
        await queue.record(rows[3])
    assert queue.pending == 3
    broken = False
    waiting = asyncio.create_task(queue.record(rows[3]))  # waits for room, then goes in
    await until(lambda: waiting.done(), "room in the queue")
    await queue.close()
    assert written == rows
