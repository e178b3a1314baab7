"""Idempotency keys: a repeated key gets the first call's result instead of a second call.

Under MCP 2026-07-28 a client re-sends a request whose stream broke, so a non-idempotent tool
could run twice. A call carrying an idempotency key runs once per (caller, function, key)
within `window_s`; a repeat waits for the first call if it is still running. The same key with
other arguments is refused (`IdempotencyConflict`): it is a client bug, and answering with
the first result would hide it.

Memory is bounded per caller (entries and result bytes) and in all. An entry is never
forgotten inside its window, nor while its call runs: forgetting one would let its retry run
the call again. When a caller has no room left, its new key is refused (`IdempotencyBusy`,
with the seconds until its oldest entry expires), so one caller's flood of keys costs only
that caller.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
MiB = 1024 * 1024


class IdempotencyConflict(Exception):
    """The key was used before with other arguments."""


class IdempotencyBusy(Exception):
    """No room to remember another key for this caller (or at all) within the window."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__("too many idempotency keys are remembered for this caller; retry later")
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class _Entry(Generic[T]):
    owner: Hashable
    key: Hashable
    fingerprint: str
    future: asyncio.Future[T]
    expires: float
    size: int = 0


@dataclass(slots=True)
class _Entries(Generic[T]):
    """Entries in the order they expire, and their results' bytes."""

    by_key: OrderedDict[Hashable, _Entry[T]] = field(default_factory=OrderedDict)
    bytes: int = 0


class ReplayCache(Generic[T]):
    def __init__(
        self,
        size_of: Callable[[T], int],
        *,
        window_s: float = 600.0,
        max_entries_per_owner: int = 1024,
        max_bytes_per_owner: int = 16 * MiB,
        max_entries: int = 8192,
        max_bytes: int = 64 * MiB,
        clock: Any = time.monotonic,
    ) -> None:
        self._size_of = size_of
        self._window = window_s
        self._owner_bounds = (max_entries_per_owner, max_bytes_per_owner)
        self._bounds = (max_entries, max_bytes)
        self._clock = clock
        self._all: _Entries[T] = _Entries()  # keyed by (owner, key)
        self._owners: dict[Hashable, _Entries[T]] = {}

    async def run(
        self, owner: Hashable, key: Hashable, fingerprint: str, call: Callable[[], Awaitable[T]]
    ) -> T:
        """`call()`'s result, or the result of `owner`'s first call under `key`."""
        while (entry := self._live(owner, key)) is not None:
            if entry.fingerprint != fingerprint:
                raise IdempotencyConflict("this idempotency key was used with other arguments")
            try:
                return await asyncio.shield(entry.future)
            except asyncio.CancelledError:
                if not entry.future.cancelled():
                    raise  # this request was cancelled, not the first one
                # The first call never finished: nothing to replay, so this one runs.
        self._admit(owner)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        entry = _Entry(owner, key, fingerprint, future, self._clock() + self._window)
        entries = self._owners.setdefault(owner, _Entries())
        entries.by_key[key] = self._all.by_key[(owner, key)] = entry
        try:
            result = await call()
        except BaseException:
            self._drop(owner, key)
            future.cancel()
            raise
        future.set_result(result)
        entry.size = self._size_of(result)
        entries.bytes += entry.size
        self._all.bytes += entry.size
        return result

    def _live(self, owner: Hashable, key: Hashable) -> _Entry[T] | None:
        self._expire()
        entries = self._owners.get(owner)
        return entries.by_key.get(key) if entries is not None else None

    def _admit(self, owner: Hashable) -> None:
        """Room for one more entry of `owner`, or `IdempotencyBusy`."""
        for entries, (max_entries, max_bytes) in (
            (self._owners.get(owner), self._owner_bounds),
            (self._all, self._bounds),
        ):
            if entries is not None and (
                len(entries.by_key) >= max_entries or entries.bytes >= max_bytes
            ):
                oldest = next(iter(entries.by_key.values()))
                raise IdempotencyBusy(max(1, math.ceil(oldest.expires - self._clock())))

    def _expire(self) -> None:
        """Drop the entries whose window has passed. One whose call still runs is kept, its
        window starting again (a repeat must still wait for it)."""
        now = self._clock()
        while self._all.by_key:
            oldest = next(iter(self._all.by_key.values()))
            if oldest.expires > now:
                return
            if oldest.future.done():
                self._drop(oldest.owner, oldest.key)
            else:
                oldest.expires = now + self._window
                self._all.by_key.move_to_end((oldest.owner, oldest.key))
                self._owners[oldest.owner].by_key.move_to_end(oldest.key)

    def _drop(self, owner: Hashable, key: Hashable) -> None:
        entry = self._all.by_key.pop((owner, key))
        entries = self._owners[owner]
        del entries.by_key[key]
        entries.bytes -= entry.size
        self._all.bytes -= entry.size
        if not entries.by_key:
            del self._owners[owner]

    def __len__(self) -> int:
        return len(self._all.by_key)
