"""The measuring engine shared by the driver (`soma bench`) and the worker inside a runtime.

A case is an awaitable call plus the process (or thread) whose CPU and memory it is charged
with: the sidecar for Soma's cases, the bare server for the baselines. Cases of one group are
warmed up, then measured batch by batch, each batch of every case in turn, with the order
rotated from batch to batch so no case always runs right after another.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Call = Callable[[], Awaitable[object]]


@dataclass(frozen=True)
class Settings:
    """How much to measure: warm-up calls, batches, and calls per batch (per in-flight slot at
    least a few, so that 128 calls in flight still make a batch of many rounds)."""

    warmup: int
    batches: int
    per_batch: int

    def calls(self, inflight: int) -> int:
        return self.per_batch if inflight == 1 else max(self.per_batch, inflight * 8)


@dataclass
class Case:
    """One thing measured. `server` is where to read the CPU of what serves it (a process's
    `/proc/<pid>/task` or one thread's `/proc/<pid>/task/<tid>`), `rss_pid` the process
    whose VmRSS is reported; `supervisor` the supervisor's, whose CPU a supervised call costs
    too (it carries the sidecar's log lines); `scale` divides the batch size for slow cases
    (1 MB payloads)."""

    name: str
    call: Call
    server: Path | None
    rss_pid: int | None
    baseline: str | None = None
    inflight: int = 1
    scale: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    supervisor: Path | None = None


@dataclass
class Result:
    """A case's figures: latencies in µs; medians over batches, spread = min and max of the
    batch medians; `max_us` over every call measured; CPU over every batch."""

    name: str
    baseline: str | None
    params: dict[str, Any]
    calls: int
    p50_us: float
    p50_spread_us: tuple[float, float]
    p90_us: float
    p99_us: float
    max_us: float
    calls_per_s: float
    cpu_us_per_call: float | None
    supervisor_cpu_us_per_call: float | None
    rss_kb: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_seconds(where: Path) -> float:
    """CPU time a process (`/proc/<pid>/task`: every thread summed) or one thread
    (`/proc/<pid>/task/<tid>`) has run, from the scheduler's nanosecond counters (the clock
    ticks of /proc/<pid>/stat are 10 ms, too coarse for a batch). Load on a shared machine
    hardly moves it, unlike latency. Threads that exited are not counted."""
    files = where.glob("*/schedstat") if where.name == "task" else [where / "schedstat"]
    total = 0
    for file in files:
        try:
            total += int(file.read_text().split()[0])
        except (OSError, IndexError, ValueError):  # the thread has just exited
            continue
    return total / 1e9


def rss_kb(pid: int) -> int | None:
    """VmRSS in KiB, None when the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@dataclass
class _Batches:
    """What a case's batches measured, to be summed up by `result`."""

    p50: list[float] = field(default_factory=list)
    p90: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    cpu: float = 0.0
    supervisor_cpu: float = 0.0
    peak: float = 0.0
    calls: int = 0

    def add(self, latencies: list[float], wall: float, cpu: float, supervisor_cpu: float) -> None:
        self.p50.append(quantile(latencies, 0.5))
        self.p90.append(quantile(latencies, 0.9))
        self.p99.append(quantile(latencies, 0.99))
        self.rate.append(len(latencies) / wall)
        self.cpu += cpu
        self.supervisor_cpu += supervisor_cpu
        self.peak = max(self.peak, latencies[-1])
        self.calls += len(latencies)

    def result(self, case: Case) -> Result:
        return Result(
            name=case.name,
            baseline=case.baseline,
            params={"inflight": case.inflight, **case.params},
            calls=self.calls,
            p50_us=statistics.median(self.p50),
            p50_spread_us=(min(self.p50), max(self.p50)),
            p90_us=statistics.median(self.p90),
            p99_us=statistics.median(self.p99),
            max_us=self.peak,
            calls_per_s=statistics.median(self.rate),
            cpu_us_per_call=self.cpu / self.calls * 1e6 if case.server else None,
            supervisor_cpu_us_per_call=(
                self.supervisor_cpu / self.calls * 1e6 if case.supervisor else None
            ),
            rss_kb=rss_kb(case.rss_pid) if case.rss_pid else None,
        )


def _cpu(where: Path | None) -> float:
    return cpu_seconds(where) if where else 0.0


async def batch(call: Call, calls: int, inflight: int) -> tuple[list[float], float]:
    """`calls` calls, `inflight` at a time; their latencies (µs, sorted) and the wall time."""
    latencies: list[float] = []
    left = calls

    async def slot() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            began = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - began) * 1e6)

    began = time.perf_counter()
    if inflight == 1:
        await slot()
    else:
        await asyncio.gather(*(slot() for _ in range(inflight)))
    wall = time.perf_counter() - began
    latencies.sort()
    return latencies, wall


STARTED = time.monotonic()


def progress(text: str) -> None:
    """A line on stderr, with the seconds since this process started measuring."""
    print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", file=sys.stderr, flush=True)


async def run_group(title: str, cases: list[Case], settings: Settings) -> list[Result]:
    """Warm every case up, then measure them in interleaved batches."""
    for case in cases:
        calls = max(1, settings.warmup // case.scale)
        await batch(case.call, calls, case.inflight)
    figures = {case.name: _Batches() for case in cases}
    for number in range(settings.batches):
        progress(f"  {title}: batch {number + 1}/{settings.batches}")
        shift = number % len(cases)
        for case in cases[shift:] + cases[:shift]:
            calls = max(case.inflight, settings.calls(case.inflight) // case.scale)
            server, supervisor = _cpu(case.server), _cpu(case.supervisor)
            latencies, wall = await batch(case.call, calls, case.inflight)
            figures[case.name].add(
                latencies, wall, _cpu(case.server) - server, _cpu(case.supervisor) - supervisor
            )
    return [figures[case.name].result(case) for case in cases]
