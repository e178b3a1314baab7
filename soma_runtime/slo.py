"""Live SLOs: in-flight caps and latency/error measurements per function.

Latencies go into a fixed log-scale histogram (buckets at most 10% apart from 5 µs to about
eight minutes): recording is one bisect, memory is constant however long the sidecar runs,
and quantiles are exact to within one bucket (10%). The bounds 1, 2.5 and 5 of every decade
are bucket bounds themselves (the buckets between them are geometric), so counts at those
round bounds are exact: that is what the Prometheus histogram exports.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from dataclasses import dataclass, field

from soma_runtime.cards import SloConfig
from soma_runtime.contract import CALLER_ERRORS


def _round_bound(mantissa: float, exponent: int) -> float:
    """`mantissa`e`exponent`, the float nearest the decimal (2.5e-3, not 2.5 * 10**-3)."""
    return float(f"{mantissa}e{exponent}")


# Round bounds 5 µs ... 500 s; between two of them, 10 (1 -> 2.5) or 8 (2.5 -> 5 -> 10)
# geometric steps, none wider than 2.5 ** 0.1 ≈ 1.096.
_ROUND_MS = [_round_bound(m, e) for e in range(-3, 6) for m in (1, 2.5, 5)][2:]
_STEPS = {2.5: 10, 2.0: 8}


def _fine_bounds() -> tuple[float, ...]:
    out: list[float] = []
    for low, high in itertools.pairwise(_ROUND_MS):
        steps = _STEPS[round(high / low, 6)]
        out += [low] + [low * (high / low) ** (j / steps) for j in range(1, steps)]
    return (*out, _ROUND_MS[-1])


BUCKET_BOUNDS_MS: tuple[float, ...] = _fine_bounds()
_BUCKETS = len(BUCKET_BOUNDS_MS)  # slower calls than the last bound land in the overflow bucket
# The round bounds a snapshot reports cumulative counts at: 10 µs to 100 s.
ROUND_BOUNDS_MS: tuple[float, ...] = tuple(b for b in _ROUND_MS if 0.01 <= b <= 100_000)
_ROUND_INDEX = tuple(BUCKET_BOUNDS_MS.index(b) for b in ROUND_BOUNDS_MS)
# Distinct error kinds counted per function; more (an organ putting details in its error
# kinds) are counted together, so neither memory nor metric series grow without bound.
MAX_ERROR_KINDS = 32
OTHER_ERRORS = "Other"


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

    def quantiles(self, *qs: float) -> list[float | None]:
        """The upper bound of the bucket holding each q-quantile, None when empty."""
        if self.count == 0:
            return [None] * len(qs)
        seen = list(itertools.accumulate(self._counts))
        return [
            BUCKET_BOUNDS_MS[
                min(bisect_left(seen, max(1, math.ceil(q * self.count))), _BUCKETS - 1)
            ]
            for q in qs
        ]

    def cumulative(self) -> tuple[int, ...]:
        """How many latencies are at most each of `ROUND_BOUNDS_MS` (exact: they are bounds)."""
        seen = list(itertools.accumulate(self._counts))
        return tuple(seen[index] for index in _ROUND_INDEX)


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
    # Latencies at most each of ROUND_BOUNDS_MS, and their sum: the Prometheus histogram.
    cumulative: tuple[int, ...] = ()
    sum_ms: float = 0.0

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
            self._count_error("Overloaded")
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
            self._count_error(error)

    def _count_error(self, kind: str) -> None:
        kinds = self._errors_by_kind
        if kind not in kinds and len(kinds) >= MAX_ERROR_KINDS:
            kind = OTHER_ERRORS
        kinds[kind] = kinds.get(kind, 0) + 1

    def snapshot(self) -> FunctionStatsSnapshot:
        by_kind = dict(self._errors_by_kind)
        h = self.histogram
        caller = sum(n for kind, n in by_kind.items() if kind in CALLER_ERRORS)
        errors = sum(by_kind.values())
        counted = errors - caller
        p50, p95, p99 = h.quantiles(0.50, 0.95, 0.99)
        return FunctionStatsSnapshot(
            name=self.name,
            count=self.count,
            errors=errors,
            caller_errors=caller,
            overloaded=by_kind.get("Overloaded", 0),
            in_flight=self.in_flight,
            queue_cap=self.slo.queue_cap,
            mean_ms=h.sum_ms / h.count if h.count else None,
            p50_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
            error_rate=counted / self.count if self.count else 0.0,
            slo_p95_ms=self.slo.p95_latency_ms,
            slo_max_error_rate=self.slo.max_error_rate,
            errors_by_kind=by_kind,
            cumulative=h.cumulative(),
            sum_ms=h.sum_ms,
        )
