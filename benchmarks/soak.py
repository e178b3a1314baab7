"""Soak: a real supervisor, several runtimes driving mixed traffic, faults on a schedule.

.venv/bin/python -m benchmarks.soak --duration 10m      (`make soak DURATION=10m`)

Each runtime (`tests.attack.agent mixed`) calls echo, stores vault blobs and reads them back
(comparing the data), sends bad inputs, unknown ops and ops its allow-list denies. Meanwhile
the sidecar is SIGKILLed twice (at 20% and 40% of the run), runtimes are SIGKILLed in turn,
and malformed bytes are written to runtime sockets (HTTP/2 garbage) and handshake sockets
(junk lines). A line per interval shows calls, errors by kind, p50/p99 latency, and the RSS
and open descriptors of the sidecar and the supervisor. At the end: a summary, and a growth
check over the sidecar's last life and the supervisor's whole run after warm-up.

Exit status 1 when an acknowledged write was lost, a call failed in a way it never should
(anything but the expected refusals, or Unavailable for a non-idempotent call cut off by a
kill), or RSS or descriptors kept growing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from soma_runtime.supervisor.control import fetch_status
from tests.attack import h2
from tests.attack.sockets import send_and_read
from tests.helpers import REPO, SupervisorRun

# What each op of the mix may answer. Unavailable is expected only for the calls the SDK does
# not resend after a sidecar kill (their functions are not idempotent or do not exist).
EXPECTED = {
    "system.echo": {"ok"},
    "vault.store": {"ok", "InvalidInput"},
    "vault.retrieve": {"ok"},
    "system.nope": {"UnsupportedOperation", "Unavailable"},
    "acme.fail": {"PermissionDenied", "Unavailable"},
}
RSS_SLACK = 1.25  # a median RSS may grow by a quarter...
RSS_SLACK_BYTES = 16 << 20  # ...plus 16 MiB, before it counts as growth
FD_SLACK = 16


def parse_duration(text: str) -> float:
    """`30s`, `10m`, `1h`, `90` (seconds) → seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 30s, 10m, 1h)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def config_body(runtimes: int) -> str:
    # Right after CONFIG_HEAD's [sidecar] table: the scheduled kills must not spend its budget.
    body = "max_restarts = 1000\n"
    for n in range(1, runtimes + 1):
        body += f"""
[[runtime]]
name = "mix-{n}"
command = ["python", "-m", "tests.attack.agent", "mixed", "mix-{n}.jsonl"]
allow = ["system.*", "vault.*"]
backoff_initial = 0.05
backoff_max = 0.5
max_restarts = 1000
"""
    return body


def proc_usage(pid: int | None) -> tuple[int, int] | None:
    """(RSS bytes, open descriptors) of a process, None when it is gone."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return (int(rss.group(1)) * 1024 if rss else 0), fds


@dataclass
class Sample:
    t: float
    sidecar_pid: int | None
    sidecar: tuple[int, int] | None
    supervisor: tuple[int, int] | None


@dataclass
class Traffic:
    """Everything the runtimes reported, read incrementally from their report files."""

    files: list[Path]
    offsets: dict[Path, int] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def collect(self) -> tuple[Counter[str], list[float]]:
        """What was reported since the last call (whole lines only)."""
        counts: Counter[str] = Counter()
        latencies: list[float] = []
        for path in self.files:
            if not path.exists():
                continue
            with path.open("rb") as stream:
                stream.seek(self.offsets.get(path, 0))
                data = stream.read()
            whole = data[: data.rfind(b"\n") + 1]
            self.offsets[path] = self.offsets.get(path, 0) + len(whole)
            for line in whole.splitlines():
                record = json.loads(line)
                if "counts" in record:
                    counts.update(record["counts"])
                    latencies.extend(record["latency_ms"])
        self.counts.update(counts)
        # A bounded sample of the whole run's latencies, for the summary's quantiles.
        self.latencies.extend(random.sample(latencies, min(len(latencies), 200)))
        return counts, latencies


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def errors_by_kind(counts: Counter[str]) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for key, n in counts.items():
        outcome = key.split(":", 1)[1]
        if outcome != "ok":
            kinds[outcome] += n
    return kinds


def unexpected(counts: Counter[str]) -> Counter[str]:
    bad: Counter[str] = Counter()
    for key, n in counts.items():
        op, outcome = key.split(":", 1)
        if outcome not in EXPECTED.get(op, set()):
            bad[key] += n
    return bad


class Faults:
    """The schedule: two sidecar kills, runtime kills in turn, malformed bytes often."""

    def __init__(self, run: SupervisorRun, runtimes: list[str], duration: float) -> None:
        self.run = run
        self.runtimes = runtimes
        self.rng = random.Random(7)  # noqa: S311 - a fault schedule, not cryptography
        self.injected: Counter[str] = Counter()
        events: list[tuple[float, str]] = [(0.2 * duration, "sidecar"), (0.4 * duration, "sidecar")]
        step = max(10.0, duration / 12)
        events += [(t, "runtime") for t in _times(0.1 * duration, duration * 0.9, step)]
        step = max(3.0, duration / 60)
        events += [(t, "bytes") for t in _times(0.05 * duration, duration * 0.95, step)]
        self.pending = sorted(events)
        self._turn = 0

    def due(self, elapsed: float, children: dict[str, dict[str, object]]) -> None:
        while self.pending and self.pending[0][0] <= elapsed:
            _, kind = self.pending.pop(0)
            getattr(self, f"_{kind}")(children)

    def _kill(self, kind: str, pid: object) -> None:
        if isinstance(pid, int):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.injected[kind] += 1

    def _sidecar(self, children: dict[str, dict[str, object]]) -> None:
        self._kill("sidecar SIGKILL", children["sidecar"]["pid"])

    def _runtime(self, children: dict[str, dict[str, object]]) -> None:
        name = self.runtimes[self._turn % len(self.runtimes)]
        self._turn += 1
        self._kill("runtime SIGKILL", children[name]["pid"])

    def _bytes(self, children: dict[str, dict[str, object]]) -> None:
        name = self.rng.choice(self.runtimes)
        rt = self.run.run_dir / "rt"
        if self.rng.random() < 0.5:
            path, data, kind = rt / f"{name}.sock", self._http2(), "malformed HTTP/2"
        else:
            path, data, kind = rt / f"{name}.auth.sock", self._line(), "malformed line"
        try:
            send_and_read(path, data, timeout=2.0)
        except OSError:
            return  # the socket is not there right now (its runtime is restarting)
        self.injected[kind] += 1

    def _http2(self) -> bytes:
        garbage = self.rng.randbytes(self.rng.randint(1, 300))
        return self.rng.choice(
            [
                garbage,
                h2.PREFACE + garbage,
                h2.connection_start() + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, garbage),
                h2.connection_start() + h2.grpc_request(b"/soma.v1.Sidecar/\xff\xfe", b""),
            ]
        )

    def _line(self) -> bytes:
        return self.rng.choice(
            [
                self.rng.randbytes(200).replace(b"\n", b" ") + b"\n",
                b"[" * 60000 + b"\n",
                b'{"token": ' + b"1" * 5000 + b"}\n",
                b"x" * 70000,
            ]
        )


def _times(start: float, stop: float, step: float) -> list[float]:
    out = []
    t = start
    while t < stop:
        out.append(t)
        t += step
    return out


def grew(samples: list[tuple[int, int]]) -> list[str]:
    """Growth between the first and the last third of `samples` ((rss, fds) pairs)."""
    if len(samples) < 6:
        return []
    third = len(samples) // 3
    first, last = samples[:third], samples[-third:]
    problems = []
    rss_first = statistics.median(s[0] for s in first)
    rss_last = statistics.median(s[0] for s in last)
    if rss_last > rss_first * RSS_SLACK + RSS_SLACK_BYTES:
        problems.append(f"RSS {mib(rss_first)} -> {mib(rss_last)}")
    fds_first, fds_last = max(s[1] for s in first), max(s[1] for s in last)
    if fds_last > fds_first + FD_SLACK:
        problems.append(f"fds {fds_first} -> {fds_last}")
    return problems


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}MiB"


def growth_check(samples: list[Sample], duration: float) -> list[str]:
    """The supervisor after the warm-up (first 20%), and the sidecar's last life after its own
    warm-up (first quarter of that life)."""
    problems = []
    warm = [s.supervisor for s in samples if s.t >= 0.2 * duration and s.supervisor]
    problems += [f"supervisor: {p}" for p in grew(warm)]
    last_pid = samples[-1].sidecar_pid if samples else None
    life = [s for s in samples if s.sidecar_pid == last_pid and s.sidecar]
    if life:
        began = life[0].t
        settled = [
            s.sidecar for s in life if s.t >= began + 0.25 * (life[-1].t - began) and s.sidecar
        ]
        problems += [f"sidecar: {p}" for p in grew(settled)]
    return problems


def usage_text(label: str, usage: tuple[int, int] | None) -> str:
    return f"{label} {mib(usage[0])} {usage[1]}fd" if usage else f"{label} -"


def soak(duration: float, runtimes: int, interval: float) -> int:
    names = [f"mix-{n}" for n in range(1, runtimes + 1)]
    with tempfile.TemporaryDirectory(prefix="soma-soak-") as raw:
        tmp = Path(raw)
        run = SupervisorRun(tmp, config_body(runtimes), organs=("system", "vault"))
        run.wait_ready()
        control = run.run_dir / "supervisor.sock"
        traffic = Traffic([tmp / f"{name}.jsonl" for name in names])
        faults = Faults(run, names, duration)
        samples: list[Sample] = []
        began = time.monotonic()
        next_line = interval
        window: Counter[str] = Counter()
        window_latencies: list[float] = []
        print(f"soak: {duration:.0f}s, {runtimes} runtimes, a line every {interval:.0f}s")
        try:
            while (elapsed := time.monotonic() - began) < duration:
                children = {c["name"]: c for c in fetch_status(control)["children"]}
                faults.due(elapsed, children)
                counts, latencies = traffic.collect()
                window.update(counts)
                window_latencies.extend(latencies)
                sidecar_pid = children["sidecar"]["pid"]
                samples.append(
                    Sample(elapsed, sidecar_pid, proc_usage(sidecar_pid), proc_usage(run.proc.pid))
                )
                if elapsed >= next_line:
                    print(
                        f"t={elapsed:6.0f}s calls {sum(window.values()):7d}"
                        f" errors {dict(errors_by_kind(window))}"
                        f" p50 {quantile(window_latencies, 0.5):.2f}ms"
                        f" p99 {quantile(window_latencies, 0.99):.2f}ms"
                        f" {usage_text('sidecar', samples[-1].sidecar)}"
                        f" {usage_text('supervisor', samples[-1].supervisor)}"
                        f" faults {sum(faults.injected.values())}",
                        flush=True,
                    )
                    window, window_latencies = Counter(), []
                    next_line += interval
                time.sleep(1.0)  # the sampling period of a soak, not a synchronisation
        finally:
            code = run.stop()
        traffic.collect()
        return summary(traffic, faults, samples, duration, code)


def summary(
    traffic: Traffic, faults: Faults, samples: list[Sample], duration: float, code: int
) -> int:
    counts = traffic.counts
    bad = unexpected(counts)
    lost_writes = sum(n for key, n in counts.items() if key.endswith(":lost_write"))
    problems = growth_check(samples, duration)
    report = {
        "duration_s": duration,
        "calls": sum(counts.values()),
        "errors_by_kind": dict(errors_by_kind(counts)),
        "unexpected": dict(bad),
        "acknowledged_writes_lost": lost_writes,
        "faults": dict(faults.injected),
        "p50_ms": quantile(traffic.latencies, 0.5),
        "p99_ms": quantile(traffic.latencies, 0.99),
        "growth": problems,
        "supervisor_exit": code,
    }
    out = REPO / ".soma" / "soak-report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("summary:")
    print(f"  calls {report['calls']}, p50 {report['p50_ms']:.2f}ms, p99 {report['p99_ms']:.2f}ms")
    print(f"  errors by kind {report['errors_by_kind']}")
    print(f"  faults injected {sum(faults.injected.values())}: {dict(faults.injected)}")
    print(f"  unexpected outcomes {dict(bad) or 0}; acknowledged writes lost {lost_writes}")
    print(f"  growth: {'; '.join(problems) or 'none'}")
    print(f"  (written to {out.relative_to(REPO)})")
    failed = bool(bad or lost_writes or problems or code != 0)
    print("soak FAILED" if failed else "soak passed")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("10m"))
    parser.add_argument("--runtimes", type=int, default=3)
    parser.add_argument("--interval", type=parse_duration, default=None)
    args = parser.parse_args()
    interval = args.interval or min(30.0, max(5.0, args.duration / 40))
    sys.exit(soak(args.duration, args.runtimes, interval))


if __name__ == "__main__":
    main()
