"""The operator's secret operations (`soma secrets …` calls these; it does the I/O).

Each opens the vault the configuration describes, does one thing, and returns plain data.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict
from typing import Any

from sidecar.vault.kek import KekError
from sidecar.vault.open import VaultSetupError, open_vault
from sidecar.vault.store import VaultError
from soma_runtime.config import SomaConfig
from soma_runtime.unix import UnsafePath

# What an operator must fix before any secret command can work (exit 2) ...
SETUP_ERRORS = (KekError, UnsafePath, VaultSetupError)
# ... and what makes one command fail (exit 1). UnsafePath is an OSError: test it first.
FAILURES = (VaultError, sqlite3.Error, OSError)


def users_of(config: SomaConfig, secret: str) -> list[str]:
    """Who may have `secret` used on their behalf: runtimes, directly or through a gateway."""
    credentials = {c.name for c in config.credential if c.secret_name == secret}
    gateways = {g.name for g in config.gateway if g.credential in credentials}
    users = []
    for runtime in config.runtime:
        via = sorted(credentials & set(runtime.credentials)) + [
            f"gateway {g}" for g in sorted(gateways & set(runtime.gateways))
        ]
        if via:
            users.append(f"{runtime.name} ({', '.join(via)})")
    return users


def set_secret(config: SomaConfig, name: str, value: bytes) -> int:
    """Store a new version; its number."""
    return open_vault(config).set_secret(name, value)


def list_secrets(config: SomaConfig) -> list[dict[str, Any]]:
    """Every secret's name, versions, dates and users; never a value."""
    return [
        {**asdict(s), "used_by": users_of(config, s.name)}
        for s in open_vault(config).list_secrets()
    ]


def delete_secret(config: SomaConfig, name: str) -> int:
    """Delete every version; how many there were."""
    return open_vault(config).delete_secret(name)


def rotate_kek(config: SomaConfig) -> tuple[int, str]:
    """Re-wrap every data key under a new KEK: how many, and the new KEK's id."""
    vault = open_vault(config)
    count = vault.rotate_kek()
    return count, vault.provider.current().kek_id


def audit_log(config: SomaConfig, name: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` audit entries (of `name`, or of every secret), oldest first."""
    return list(reversed(open_vault(config).audit_log(name, limit)))
