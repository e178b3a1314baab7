"""Audit rows written in batches: a use of a secret is queued, and many queued rows go in one
transaction on the vault's thread, instead of a transaction (and a thread hop) per use.

A batch is written when `BATCH_ROWS` rows wait, or `FLUSH_S` after the first of them, and on
close. A batch that fails (a full disk, a locked or damaged database) is reported and kept, in
order, to be written with the next one. The queue is bounded: when `MAX_PENDING` rows wait,
a use waits for room (backpressure) and, if none comes within `FULL_WAIT_S`, is refused with
`AuditUnavailable`: a use the vault cannot record does not happen, and no recorded use is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from sidecar.vault.store import AuditRow, VaultError

log = structlog.get_logger(component="vault")

BATCH_ROWS = 256
FLUSH_S = 0.005
MAX_PENDING = 8192
FULL_WAIT_S = 5.0


class AuditUnavailable(VaultError):
    """Uses cannot be recorded: the audit queue is full and its writes keep failing."""


class AuditQueue:
    def __init__(
        self,
        write: Callable[[list[AuditRow]], Awaitable[None]],
        *,
        max_pending: int = MAX_PENDING,
        flush_s: float = FLUSH_S,
        full_wait_s: float = FULL_WAIT_S,
    ) -> None:
        self._write = write
        self._max_pending = max_pending
        self._flush_s = flush_s
        self._full_wait_s = full_wait_s
        self._pending: list[AuditRow] = []
        self._room = asyncio.Condition()
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # a full batch waits, or the queue closes
        self._closed = False
        self.failures = 0  # batches that could not be written (each one logged)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def record(self, row: AuditRow) -> None:
        """Queue `row`; waits while the queue is full, `AuditUnavailable` if it stays full."""
        if self._closed:
            raise AuditUnavailable("the vault is closing: the use is refused")
        if len(self._pending) >= self._max_pending:
            async with self._room:
                try:
                    await asyncio.wait_for(
                        self._room.wait_for(lambda: len(self._pending) < self._max_pending),
                        self._full_wait_s,
                    )
                except TimeoutError:
                    raise AuditUnavailable(
                        f"{len(self._pending)} audit records wait to be written and the vault "
                        "does not take them: the use is refused"
                    ) from None
        self._pending.append(row)
        if len(self._pending) >= BATCH_ROWS:
            self._wake.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await self._pause(self._flush_s)  # rows queued meanwhile share the transaction
        while self._pending and not self._closed:
            if not await self._flush_once():
                await self._pause(max(self._flush_s, 0.1))  # then try the same rows again

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if a full batch waits or the queue closes."""
        if len(self._pending) < BATCH_ROWS:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), seconds)
        if not self._closed:
            self._wake.clear()

    async def _flush_once(self) -> bool:
        """Write what waits, up to `BATCH_ROWS` rows; whether it went in."""
        batch = self._pending[:BATCH_ROWS]
        try:
            await self._write(batch)
        except (VaultError, OSError) as exc:
            self.failures += 1
            log.error(
                "audit_write_failed", rows=len(batch), waiting=len(self._pending), error=str(exc)
            )
            return False
        del self._pending[: len(batch)]
        async with self._room:
            self._room.notify_all()
        return True

    async def close(self) -> None:
        """Write every queued row (one attempt per batch; what still fails is logged with its
        count: nothing else could keep it)."""
        self._closed = True
        self._wake.set()
        if self._flusher is not None:
            await self._flusher  # not cancelled: a write under way must know it went in
        while self._pending:
            if not await self._flush_once():
                log.error("audit_rows_not_written", rows=len(self._pending))
                self._pending.clear()
