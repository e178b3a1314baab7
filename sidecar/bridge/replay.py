"""Idempotency keys: a repeated key gets the first call's result instead of a second call.

Under MCP 2026-07-28 a client re-sends a request whose stream broke, so a non-idempotent tool
could run twice. A call carrying an idempotency key runs once per (caller, function, key)
within `window_s`; a repeat waits for the first call if it is still running. The same key with
other arguments is refused (`IdempotencyConflict`): it is a client bug, and answering with
the first result would hide it. Memory is bounded by entry count and result bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class IdempotencyConflict(Exception):
    """The key was used before with other arguments."""


@dataclass(slots=True)
class _Entry(Generic[T]):
    fingerprint: str
    future: asyncio.Future[T]
    expires: float
    size: int = 0


class ReplayCache(Generic[T]):
    def __init__(
        self,
        size_of: Callable[[T], int],
        *,
        window_s: float = 600.0,
        max_entries: int = 1024,
        max_bytes: int = 32 * 1024 * 1024,
        clock: Any = time.monotonic,
    ) -> None:
        self._size_of = size_of
        self._window = window_s
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[Hashable, _Entry[T]] = OrderedDict()
        self._bytes = 0

    async def run(self, key: Hashable, fingerprint: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`'s result, or the result of the first call under `key`."""
        while (entry := self._live(key)) is not None:
            if entry.fingerprint != fingerprint:
                raise IdempotencyConflict("this idempotency key was used with other arguments")
            try:
                return await asyncio.shield(entry.future)
            except asyncio.CancelledError:
                if not entry.future.cancelled():
                    raise  # this request was cancelled, not the first one
                # The first call never finished: nothing to replay, so this one runs.
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        entry = _Entry(fingerprint, future, self._clock() + self._window)
        self._entries[key] = entry
        try:
            result = await call()
        except BaseException:
            if self._entries.get(key) is entry:
                del self._entries[key]
            future.cancel()
            raise
        future.set_result(result)
        if self._entries.get(key) is entry:  # not already evicted while it ran
            entry.size = self._size_of(result)
            self._bytes += entry.size
        self._evict()
        return result

    def _live(self, key: Hashable) -> _Entry[T] | None:
        self._evict()
        return self._entries.get(key)

    def _evict(self) -> None:
        """Drop expired entries, then the oldest while over a bound (oldest first: entries
        are kept in the order they started, and all live equally long)."""
        now = self._clock()
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            over = len(self._entries) > self._max_entries or self._bytes > self._max_bytes
            if oldest.expires > now and not over:
                break
            del self._entries[key]
            self._bytes -= oldest.size

    def __len__(self) -> int:
        return len(self._entries)
