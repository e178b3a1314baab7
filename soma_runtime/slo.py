"""Live SLOs: in-flight caps and latency/error measurements per function.

Latencies go into a fixed log-scale histogram (buckets 10% apart from 5 µs to about
two minutes): recording is one bisect, memory is constant however long the sidecar runs,
and quantiles are exact to within one bucket (10%).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field

from soma_runtime.cards import SloConfig
from soma_runtime.contract import CALLER_ERRORS

_GROWTH = 1.1
_FIRST_BOUND_MS = 0.005
_BUCKETS = 180  # 0.005 ms * 1.1**179 ≈ 130 s; slower calls land in the overflow bucket
BUCKET_BOUNDS_MS: tuple[float, ...] = tuple(_FIRST_BOUND_MS * _GROWTH**i for i in range(_BUCKETS))


class LatencyHistogram:
    """Counts of latencies per log-scale bucket; the last bucket holds everything larger."""

    __slots__ = ("_counts", "count", "sum_ms")

    def __init__(self) -> None:
        self._counts = [0] * (_BUCKETS + 1)
        self.count = 0
        self.sum_ms = 0.0

    def record(self, latency_ms: float) -> None:
        self._counts[bisect_left(BUCKET_BOUNDS_MS, latency_ms)] += 1
        self.count += 1
        self.sum_ms += latency_ms

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the q-quantile, None when empty."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index, n in enumerate(self._counts):
            seen += n
            if seen >= rank:
                return BUCKET_BOUNDS_MS[min(index, _BUCKETS - 1)]
        return BUCKET_BOUNDS_MS[-1]  # pragma: no cover - counts always add up to count


@dataclass(frozen=True, slots=True)
class FunctionStatsSnapshot:
    """One function's measurements next to its objectives."""

    name: str
    count: int
    errors: int
    caller_errors: int
    overloaded: int
    in_flight: int
    queue_cap: int | None
    mean_ms: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    error_rate: float
    slo_p95_ms: int
    slo_max_error_rate: float
    errors_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def meets_slo(self) -> bool:
        """p95 within target and error rate within budget (vacuously true before any call)."""
        p95_ok = self.p95_ms is None or self.p95_ms <= self.slo_p95_ms
        return p95_ok and self.error_rate <= self.slo_max_error_rate


class FunctionStats:
    """In-flight admission and outcome recording for one function.

    Errors the caller caused (invalid input, unsupported op) are counted but do not count
    against the function's error budget: a client sending bad input is not the organ failing.
    """

    __slots__ = ("_errors_by_kind", "count", "histogram", "in_flight", "name", "slo")

    def __init__(self, name: str, slo: SloConfig) -> None:
        self.name = name
        self.slo = slo
        self.in_flight = 0
        self.count = 0
        self.histogram = LatencyHistogram()
        self._errors_by_kind: dict[str, int] = {}

    def try_admit(self) -> bool:
        """Take an in-flight slot; False when the function is at its `queue_cap`."""
        cap = self.slo.queue_cap
        if cap is not None and self.in_flight >= cap:
            self._errors_by_kind["Overloaded"] = self._errors_by_kind.get("Overloaded", 0) + 1
            self.count += 1
            return False
        self.in_flight += 1
        return True

    def release(self, latency_ms: float, error: str | None) -> None:
        """Give the slot back and record the call's outcome."""
        self.in_flight -= 1
        self.record(latency_ms, error)

    def record(self, latency_ms: float, error: str | None) -> None:
        """Record an outcome that took no in-flight slot (for example invalid input)."""
        self.count += 1
        self.histogram.record(latency_ms)
        if error is not None:
            self._errors_by_kind[error] = self._errors_by_kind.get(error, 0) + 1

    def snapshot(self) -> FunctionStatsSnapshot:
        by_kind = dict(self._errors_by_kind)
        h = self.histogram
        caller = sum(n for kind, n in by_kind.items() if kind in CALLER_ERRORS)
        errors = sum(by_kind.values())
        counted = errors - caller
        return FunctionStatsSnapshot(
            name=self.name,
            count=self.count,
            errors=errors,
            caller_errors=caller,
            overloaded=by_kind.get("Overloaded", 0),
            in_flight=self.in_flight,
            queue_cap=self.slo.queue_cap,
            mean_ms=h.sum_ms / h.count if h.count else None,
            p50_ms=self.histogram.quantile(0.50),
            p95_ms=self.histogram.quantile(0.95),
            p99_ms=self.histogram.quantile(0.99),
            error_rate=counted / self.count if self.count else 0.0,
            slo_p95_ms=self.slo.p95_latency_ms,
            slo_max_error_rate=self.slo.max_error_rate,
            errors_by_kind=by_kind,
        )
