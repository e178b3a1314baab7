"""The sidecar with many runtimes: its RSS with 1, 16 and 64 connected runtimes, and the p50
of one runtime's `system.echo` calls while the others are connected (idle, or each making 10
calls a second), from a real `soma supervise`; and RSS growth over many calls.

.venv/bin/python -m benchmarks.many_runtimes [--counts 1,16,64] [--rounds 2] [--busy]
.venv/bin/python -m benchmarks.many_runtimes --growth 200000

Runs of the different counts are interleaved, round after round; p50s are medians of
batches, compared with the one-runtime run of the same round.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sdk
from benchmarks.vault_and_gateway import cpu_seconds
from tests.helpers import SupervisorRun, start_sidecar, wait_until

BATCHES, CALLS, WARMUP = 7, 400, 200
IDLE_S = 5.0
PAYLOAD = {"data": "x" * 88}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError("no Threads")


def runtime(mode: str, directory: Path, name: str) -> None:
    """A supervised runtime: connects, says so, then idles, calls 10 times a second, or
    (`caller`) waits for the go and measures."""
    with sdk.Client.from_env() as client:
        client.call("system.echo", PAYLOAD)
        (directory / f"ready-{name}").touch()
        if mode == "idle":
            signal.pause()
        while mode == "busy":
            client.call("system.echo", PAYLOAD)
            time.sleep(0.1)  # pacing the background load
        while not (directory / "go").exists():
            time.sleep(0.05)  # the bench's signal to start; not a test
        for _ in range(WARMUP):
            client.call("system.echo", PAYLOAD)
        p50s = []
        for _ in range(BATCHES):
            times = []
            for _ in range(CALLS):
                started = time.perf_counter()
                client.call("system.echo", PAYLOAD)
                times.append(time.perf_counter() - started)
            p50s.append(statistics.median(times) * 1e6)
        (directory / "report.json").write_text(json.dumps({"p50_us": p50s}))
        signal.pause()


def one_run(tmp: Path, count: int, others: str) -> dict[str, float]:
    directory = tmp / "signals"
    directory.mkdir()
    script = json.dumps(str(Path(__file__).resolve()))
    body = ""
    for i in range(count):
        mode = "caller" if i == 0 else others
        body += (
            f'\n[[runtime]]\nname = "r{i}"\nallow = ["system.*"]\nrestart = "never"\n'
            f'command = [{json.dumps(sys.executable)}, {script}, "{mode}", '
            f'{json.dumps(str(directory))}, "r{i}"]\n'
        )
    run = SupervisorRun(tmp, body, organs=("system",))
    try:
        run.wait_ready(120)
        wait_until(
            lambda: len(list(directory.glob("ready-*"))) == count, 300, "every runtime connected"
        )
        pid = run.child("sidecar")["pid"]
        connected, thread_count = rss_kib(pid), threads(pid)
        cpu = cpu_seconds(pid)
        time.sleep(IDLE_S)  # the sidecar's own CPU while no runtime calls (others idle)
        idle_cpu = (cpu_seconds(pid) - cpu) / IDLE_S * 1000
        (directory / "go").touch()
        report = directory / "report.json"
        wait_until(report.exists, 300, "the caller's report")
        p50s = json.loads(report.read_text())["p50_us"]
        after = rss_kib(pid)
    finally:
        run.stop()
    return {
        "rss_kib": connected,
        "rss_after_kib": after,
        "threads": thread_count,
        "idle_cpu_ms_per_s": idle_cpu,
        "p50_us": statistics.median(p50s),
    }


def scaling(counts: list[int], rounds: int, others: str) -> None:
    results: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as raw:
        for r in range(rounds):
            for n in counts:
                work = Path(raw) / f"{r}-{n}"
                work.mkdir()
                results[n].append(one_run(work, n, others))
                print(f"round {r + 1}/{rounds}: {n} runtimes: {results[n][-1]}", file=sys.stderr)
    base = counts[0]
    print(f"other runtimes {others}; {rounds} interleaved rounds; medians")
    print("runtimes  sidecar RSS MiB  threads  CPU ms/s (caller quiet)", end="")
    print(f"  p50 us  p50 / {base} runtime(s)")
    for n in counts:
        rss = statistics.median(x["rss_kib"] for x in results[n]) / 1024
        ratios = [x["p50_us"] / b["p50_us"] for x, b in zip(results[n], results[base], strict=True)]
        p50 = statistics.median(x["p50_us"] for x in results[n])
        thread_count = statistics.median(x["threads"] for x in results[n])
        idle = statistics.median(x["idle_cpu_ms_per_s"] for x in results[n])
        ratio = statistics.median(ratios)
        print(f"{n:8} {rss:16.1f} {thread_count:8.0f} {idle:24.1f} {p50:7.0f}  {ratio:.2f}x")
    for n in counts[1:]:
        added = [
            (x["rss_kib"] - b["rss_kib"]) / (n - base)
            for x, b in zip(results[n], results[base], strict=True)
        ]
        print(f"RSS per added runtime ({base} -> {n}): {statistics.median(added):.0f} KiB")


def growth(calls: int) -> None:
    """RSS of a standalone sidecar after a warm-up of a tenth of `calls`, and at the end."""
    with tempfile.TemporaryDirectory() as raw:
        proc, target = start_sidecar(Path(raw), ["system"], '[logging]\nlevel = "info"\n')
        try:
            with sdk.Client(target) as client:
                warm = calls // 10
                for _ in range(warm):
                    client.call("system.echo", PAYLOAD)
                marks = [rss_kib(proc.pid)]
                for step in range(4):
                    for _ in range((calls - warm) // 4):
                        client.call("system.echo", PAYLOAD)
                    marks.append(rss_kib(proc.pid))
                    print(f"{warm + (step + 1) * (calls - warm) // 4} calls", file=sys.stderr)
        finally:
            proc.stop()
    print(f"sidecar RSS after {calls // 10} warm-up calls and every quarter of the rest (KiB):")
    print(" ".join(map(str, marks)), f"-> growth {marks[-1] - marks[0]} KiB")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] in ("idle", "busy", "caller"):
        runtime(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="others call 10 times a second")
    parser.add_argument("--growth", type=int, default=0, help="calls for the RSS growth check")
    args = parser.parse_args()
    if args.growth:
        growth(args.growth)
    else:
        scaling(
            [int(n) for n in args.counts.split(",")], args.rounds, "busy" if args.busy else "idle"
        )
