"""The vault for asyncio code: every database call runs on one dedicated thread.

One thread keeps SQLite's connection single-threaded and the event loop free. The vault is
opened by the first call that needs it; if it cannot be opened (a corrupt database, no key),
that call and later ones raise the reason (each retries the open, so a repaired vault is
picked up), and everything that does not need the vault keeps working.

Uses of secrets are audited through a queue written in batches (see sidecar.vault.audit),
flushed by `close`. `generation` reads, on the event loop's own thread, the counter every
change to the secrets table increments: a few microseconds, so a cache of decrypted secrets
can ask it on every hit.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from sidecar.vault.audit import AuditQueue
from sidecar.vault.kek import KekError
from sidecar.vault.store import GENERATION_QUERY, AuditRow, Vault, VaultUnavailable

log = structlog.get_logger(component="vault")
T = TypeVar("T")


class AsyncVault:
    def __init__(self, opener: Callable[[], Vault]) -> None:
        self._opener = opener
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vault")
        self._vault: Vault | None = None
        self._reader: sqlite3.Connection | None = None  # the event loop's, for `generation`
        self._audit = AuditQueue(self._write_audit)

    def _on_thread(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        if self._vault is None:
            try:
                self._vault = self._opener()
            except VaultUnavailable as exc:
                log.error("vault_unavailable", reason=str(exc))
                raise
        try:
            return fn(self._vault, *args, **kwargs)
        except sqlite3.Error as exc:  # "database is locked" after the busy timeout, a full disk
            raise VaultUnavailable(f"the vault database {self._vault.path}: {exc}") from None
        except KekError as exc:  # a key file that went missing or bad while running
            raise VaultUnavailable(str(exc)) from None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(vault, *args, **kwargs)` on the vault's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._on_thread, fn, args, kwargs)

    async def audit(self, row: AuditRow) -> None:
        """Record a use (written within milliseconds); `AuditUnavailable` when uses cannot
        be recorded."""
        await self._audit.record(row)

    async def _write_audit(self, rows: list[AuditRow]) -> None:
        await self.run(Vault.write_audit, rows)

    @property
    def audit_queue(self) -> AuditQueue:
        return self._audit

    def generation(self) -> int | None:
        """The secrets generation as committed now; None when the vault is not open yet or
        cannot be read (a caller then treats its cached secrets as stale)."""
        if self._vault is None:
            return None
        try:
            if self._reader is None:
                # A short busy timeout: this blocks the event loop, and None is a safe answer.
                self._reader = sqlite3.connect(
                    self._vault.path, isolation_level=None, timeout=0.05, check_same_thread=False
                )
            row = self._reader.execute(GENERATION_QUERY).fetchone()
        except sqlite3.Error:
            return None
        return None if row is None else int(row[0])

    async def close(self) -> None:
        await self._audit.close()
        if self._reader is not None:
            self._reader.close()
        vault, self._vault = self._vault, None
        if vault is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, vault.close)
        self._executor.shutdown(wait=True)
