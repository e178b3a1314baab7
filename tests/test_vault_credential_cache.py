"""The sidecar's cache of decrypted credentials: served while the vault's secrets are
unchanged, revoked at once when any process changes them, per runtime, bounded."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar import credentials
from sidecar.credentials import CredentialBroker, CredentialDenied
from sidecar.vault.async_vault import AsyncVault
from sidecar.vault.open import open_vault
from sidecar.vault.store import SecretNotFound
from soma_runtime.config import load_config
from tests.helpers import run_soma, set_secret, write_config

CONFIG = """
[soma]
state_dir = "{state}"

[[credential]]
name = "api"
hosts = ["api.example.com"]
"""
ALLOWED = frozenset({"api"})


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = write_config(tmp_path / "soma.toml", CONFIG.format(state=tmp_path / "state"))
    set_secret(path, "api", "sk-first-0123456789")
    return path


async def open_broker(config_path: Path, cache_s: float) -> tuple[CredentialBroker, AsyncVault]:
    config = load_config(config_path)
    vault = AsyncVault(lambda: open_vault(config, durable=False))
    return CredentialBroker(config.credential, vault, cache_s=cache_s), vault


@pytest.fixture
async def broker(config_path: Path) -> AsyncIterator[CredentialBroker]:
    broker, vault = await open_broker(config_path, 300.0)  # never expires within a test
    yield broker
    await vault.close()


async def use(broker: CredentialBroker, runtime: str = "agent") -> str:
    found = await broker.resolve(["api"], runtime=runtime, allowed=ALLOWED, organ="t", op="t")
    return found["api"].reveal()


async def test_a_cached_credential_is_served_again_and_every_use_audited(
    broker: CredentialBroker, config_path: Path
) -> None:
    assert [await use(broker) for _ in range(3)] == ["sk-first-0123456789"] * 3
    assert broker.cache_hits == 2
    await broker._vault.close()  # flushes the audit queue
    audit = run_soma("secrets", "audit", "api", "--config", str(config_path))
    assert audit.stdout.count('"action": "use"') == 3, audit.stdout


async def test_a_secret_set_by_another_process_is_served_at_once(
    broker: CredentialBroker, config_path: Path
) -> None:
    assert await use(broker) == "sk-first-0123456789"
    set_secret(config_path, "api", "sk-second-0123456789")  # `soma secrets set`
    assert await use(broker) == "sk-second-0123456789"
    assert broker.cache_hits == 0


async def test_a_deleted_secret_is_never_served_from_the_cache(
    broker: CredentialBroker, config_path: Path
) -> None:
    assert await use(broker) == "sk-first-0123456789"
    deleted = run_soma("secrets", "delete", "api", "--config", str(config_path))
    assert deleted.returncode == 0, deleted.stderr
    with pytest.raises(SecretNotFound):
        await use(broker)
    with pytest.raises(SecretNotFound):
        await use(broker)


async def test_a_kek_rotation_revokes_the_cached_copies(
    broker: CredentialBroker, config_path: Path
) -> None:
    await use(broker)
    rotated = run_soma("secrets", "rotate-kek", "--config", str(config_path))
    assert rotated.returncode == 0, rotated.stderr
    assert await use(broker) == "sk-first-0123456789"
    assert broker.cache_hits == 0  # decrypted again, under the new key


async def test_access_is_checked_at_every_use_and_copies_are_per_runtime(
    broker: CredentialBroker,
) -> None:
    await use(broker, "agent")
    with pytest.raises(CredentialDenied):
        await broker.resolve(["api"], runtime="other", allowed=frozenset(), organ="t", op="t")
    assert await use(broker, "other") == "sk-first-0123456789"
    assert broker.cache_hits == 0  # "other" never shares the copy "agent" got
    await use(broker, "agent")
    assert broker.cache_hits == 1


async def test_zero_seconds_disables_the_cache(config_path: Path) -> None:
    broker, vault = await open_broker(config_path, 0.0)
    try:
        for _ in range(3):
            await use(broker)
        assert broker.cache_hits == 0 and broker.cache_size == 0
    finally:
        await vault.close()


async def test_a_copy_expires(config_path: Path) -> None:
    broker, vault = await open_broker(config_path, 0.2)
    try:
        await use(broker)
        expiry = time.monotonic() + 0.2  # later than the copy's own
        uses = 1
        while time.monotonic() <= expiry:  # the condition is the clock itself
            await use(broker)
            uses += 1
        await use(broker)
        uses += 1
        assert broker.cache_hits >= 1
        assert uses - broker.cache_hits == 2  # decrypted once more, after the expiry
    finally:
        await vault.close()


async def test_the_cache_is_bounded(
    broker: CredentialBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(credentials, "MAX_CACHED", 8)
    for index in range(20):
        await use(broker, f"runtime-{index}")
    assert broker.cache_size == 8
    await use(broker, "runtime-19")  # the newest are kept
    assert broker.cache_hits == 1
