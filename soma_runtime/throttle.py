"""Bounding what a misbehaving peer can cost: failed attempts and the warnings they cause.

A runtime that sends thousands of wrong tokens or sessions must neither flood the log (one
line per attempt is a disk-filling attack) nor get an answer as fast as it can ask. Both are
token buckets keyed by who is failing; success is never limited, so a legitimate runtime is
never slowed by an attacker's failures.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

# Keys remembered at most; the least recently seen is forgotten first.
MAX_KEYS = 1024


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """One token bucket per key: `burst` tokens, refilled at `rate` per second."""

    def __init__(self, burst: float, rate: float, clock: Any = time.monotonic) -> None:
        self.burst = burst
        self.rate = rate
        self._clock = clock
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def take(self, key: Hashable) -> float:
        """Take a token for `key`: 0.0 when one was there, otherwise how many seconds the
        caller should wait for it. Waiting takes the token in advance, so a peer that keeps
        failing waits longer each time, up to `burst / rate` seconds."""
        bucket = self._refilled(key)
        bucket.tokens = max(bucket.tokens - 1.0, -self.burst)
        return 0.0 if bucket.tokens >= 0.0 else -bucket.tokens / self.rate

    def take_if_there(self, key: Hashable) -> bool:
        """Take a token for `key` only if one is there now."""
        bucket = self._refilled(key)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _refilled(self, key: Hashable) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        self._buckets[key] = bucket
        while len(self._buckets) > MAX_KEYS:
            self._buckets.popitem(last=False)
        return bucket


# Distinct values a held-back warning keeps of what its occurrences were about (`sample`).
SAMPLE_SIZE = 8


@dataclass(slots=True)
class _Held:
    """The occurrences of one warning held back since its last line."""

    count: int
    fields: dict[str, Any]  # the latest occurrence's
    sample: tuple[str, dict[Hashable, None]] | None  # field name, distinct values, in order


class RepeatedWarnings:
    """Logs the first few occurrences of a warning per key, then counts the rest and reports
    the count (`repeated`) with the next line it lets through, or an interval later (`flush`,
    which it arranges on the running event loop), so a flood costs a line per interval, not
    one per event, and the count of the last one is not lost when it stops.

    The key is who causes the warning (a runtime, a peer), never a value that party chooses:
    each new value would be a key with a burst of its own, and a flood of distinct values a
    line each. Such a value goes in `sample` (a field name and the value): the line that
    reports held-back occurrences lists up to `SAMPLE_SIZE` distinct values of them."""

    def __init__(
        self, logger: Any, burst: int = 5, every_s: float = 10.0, clock: Any = time.monotonic
    ) -> None:
        self._log = logger
        self._every_s = every_s
        self._buckets = TokenBuckets(burst, 1.0 / every_s, clock)
        self._suppressed: dict[tuple[str, Hashable], _Held] = {}
        # The flush arranged on an event loop, while something is held back.
        self._flush_timer: tuple[asyncio.AbstractEventLoop, asyncio.TimerHandle] | None = None

    def warning(
        self, event: str, key: Hashable, sample: tuple[str, Hashable] | None = None, **fields: Any
    ) -> None:
        held = self._suppressed.pop((event, key), None)
        if self._buckets.take_if_there((event, key)):
            self._log.warning(event, **fields, **_summary(held, held.count if held else 0))
            return
        if held is None:
            if len(self._suppressed) >= MAX_KEYS:
                return
            held = _Held(0, fields, None if sample is None else (sample[0], {}))
        held.count += 1
        held.fields = fields
        if sample is not None and held.sample is not None:
            values = held.sample[1]
            if len(values) < SAMPLE_SIZE:
                values[sample[1]] = None
        self._suppressed[(event, key)] = held
        self._flush_later()

    def flush(self) -> None:
        """Log the latest occurrence of each warning held back whose interval has come, with
        how many more there were: each line plus its `repeated` count is every occurrence."""
        for (event, key), held in list(self._suppressed.items()):
            if self._buckets.take_if_there((event, key)):
                del self._suppressed[(event, key)]
                self._log.warning(event, **held.fields, **_summary(held, held.count - 1))

    def _flush_later(self) -> None:
        """Have `flush` run an interval from now (a token is back by then) on the running
        event loop, unless it is arranged already. Outside an event loop, the count waits for
        the next line or a call of `flush`."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._flush_timer is None or self._flush_timer[0] is not loop:
            self._flush_timer = (loop, loop.call_later(self._every_s, self._flush_due))

    def _flush_due(self) -> None:
        self._flush_timer = None
        self.flush()
        if self._suppressed:  # a line let through meanwhile took the token: later, then
            self._flush_later()


def _summary(held: _Held | None, repeated: int) -> dict[str, Any]:
    """The fields a line adds for the occurrences held back before it."""
    summary: dict[str, Any] = {"repeated": repeated} if repeated else {}
    if held is not None and held.sample is not None:
        summary[held.sample[0]] = list(held.sample[1])
    return summary
