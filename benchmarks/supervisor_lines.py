"""The supervisor's CPU per sidecar call (one `call` log line each), for this tree against a
baseline commit, in interleaved runs of a real `soma supervise`.

.venv/bin/python -m benchmarks.supervisor_lines [--baseline REF] [--rounds N]

A supervised runtime (this file, `caller` mode) makes batches of `system.echo` calls and
reads its parent's (the supervisor's) CPU time around each batch: CPU time, unlike latency,
hardly moves with the load of a shared machine. The baseline runs from `git archive REF`
(PYTHONPATH), everything else (interpreter, packages) being the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CALLS, BATCHES, WARMUP = 2000, 5, 300
CONFIG = """
[soma]
state_dir = "state"
runtime_dir = "run"

[logging]
format = "json"
level = "info"

[sidecar]
organs = ["system"]

[[runtime]]
name = "caller"
command = [{python}, {script}, "caller", {report}]
allow = ["system.*"]
restart = "never"
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def caller(report: Path) -> None:
    """Runs as the supervised runtime: one JSON line per batch in `report`."""
    import sdk

    supervisor = os.getppid()
    payload = {"data": "x" * 88}
    with sdk.Client.from_env() as client, report.open("w") as out:
        for _ in range(WARMUP):
            client.call("system.echo", payload)
        for _ in range(BATCHES):
            cpu, started = cpu_seconds(supervisor), time.perf_counter()
            for _ in range(CALLS):
                client.call("system.echo", payload)
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds(supervisor) - cpu
            line = {"supervisor_us": cpu / CALLS * 1e6, "call_us": elapsed / CALLS * 1e6}
            out.write(json.dumps(line) + "\n")
            out.flush()


def run(tree: Path, tmp: Path) -> list[dict[str, float]]:
    """One supervisor run on the code in `tree`; the runtime's per-batch figures."""
    report = tmp / "report.jsonl"
    config = tmp / "soma.toml"
    config.write_text(
        CONFIG.format(
            python=json.dumps(sys.executable),
            script=json.dumps(str(Path(__file__).resolve())),
            report=json.dumps(str(report)),
        )
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("NOTIFY_SOCKET", None)
    argv = [sys.executable, "-m", "soma_cli", "supervise", "--config", str(config)]
    with (tmp / "supervisor.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        deadline = time.monotonic() + 300
        try:
            while not report.exists() or len(report.read_text().splitlines()) < BATCHES:
                if proc.poll() is not None or time.monotonic() > deadline or exited(tmp):
                    raise SystemExit((tmp / "supervisor.log").read_text()[-3000:])
                time.sleep(0.2)  # polling a file another process writes; not a test
        finally:
            proc.terminate()
            proc.wait(30)
    return [json.loads(line) for line in report.read_text().splitlines()]


def exited(tmp: Path) -> bool:
    """Whether the runtime exited (before its last batch, since the loop still waits)."""
    return '"exited"' in (tmp / "supervisor.log").read_text()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="main")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        base = tmp / "baseline"
        base.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.baseline], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        for n in range(args.rounds):
            for name, tree in ((f"baseline {args.baseline}", base), ("this tree", REPO)):
                work = tmp / f"{n}-{tree.name}"
                work.mkdir()
                batches = run(tree, work)
                entry = figures.setdefault(name, {"supervisor_us": [], "call_us": []})
                for batch in batches:
                    for key in entry:
                        entry[key].append(batch[key])
                print(f"round {n + 1}/{args.rounds} {name} done", file=sys.stderr)
    (base_name, base_fig), (_, this_fig) = figures.items()
    print(f"{CALLS} echo calls x {BATCHES} batches x {args.rounds} interleaved runs; medians")
    print(f"{'':28} supervisor CPU us/call   call us (sequential)")
    for name, fig in figures.items():
        cpu, call = statistics.median(fig["supervisor_us"]), statistics.median(fig["call_us"])
        print(f"{name:28} {cpu:10.1f} {call:22.1f}")
    ratio_cpu = statistics.median(this_fig["supervisor_us"]) / max(
        statistics.median(base_fig["supervisor_us"]), 1e-9
    )
    ratio_call = statistics.median(this_fig["call_us"]) / statistics.median(base_fig["call_us"])
    print(f"this / {base_name}: supervisor CPU {ratio_cpu:.2f}x, call time {ratio_call:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "caller":
        caller(Path(sys.argv[2]))
    else:
        main()
