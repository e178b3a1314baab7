"""The cost of one per-call log event in process: the redactor alone and the whole pipeline
(JSON to an in-memory sink), this tree's redactor against a baseline commit's, in
interleaved batches of the same run.

.venv/bin/python -m benchmarks.log_event [--baseline REF]

The baseline's `soma_runtime/redaction.py` is loaded from `git show REF:...` as a module of its
own; both redactors learn the same secret values (a sidecar knows the ones it decrypted).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from soma_runtime import redaction
from soma_runtime.logs import configure_logging

REPO = Path(__file__).resolve().parent.parent
BATCHES, PER_BATCH = 15, 5000
SECRETS = [f"secret-value-number-{i}-xyz" for i in range(5)]
CALL = {
    "runtime": "alpha",
    "op": "system.echo",
    "outcome": "ok",
    "latency_ms": 0.123,
    "trace_id": "3f2a9c1d4e5b6a7f8091a2b3c4d5e6f7",
}


def baseline_redactor(ref: str, tmp: Path) -> Any:
    source = subprocess.run(
        ["git", "show", f"{ref}:soma_runtime/redaction.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    path = tmp / "baseline_redaction.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("baseline_redaction", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Redactor()


def pipeline(redactor: Any) -> Callable[[], None]:
    """A logger with the configured pipeline, `redactor` in place of the process's."""
    configure_logging("info", "json", stream=io.StringIO())
    processors = [
        redactor if p is redaction.redactor else p for p in structlog.get_config()["processors"]
    ]
    logger = structlog.wrap_logger(
        structlog.PrintLogger(io.StringIO()), processors=processors, component="sidecar"
    )
    return lambda: logger.info("call", **CALL)


def per_call_us(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    for _ in range(PER_BATCH):
        fn()
    return (time.perf_counter() - started) / PER_BATCH * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="main")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as raw:
        old = baseline_redactor(args.baseline, Path(raw))
    new = redaction.Redactor()
    for value in SECRETS:
        old.add(value)
        new.add(value)
    event = {**CALL, "event": "call", "component": "sidecar", "level": "info"}
    event["timestamp"] = "2026-11-22T03:05:37.299562Z"
    cases: dict[str, Callable[[], Any]] = {
        "redactor, baseline": lambda: old(None, "info", dict(event)),
        "redactor, this tree": lambda: new(None, "info", dict(event)),
        "whole event, baseline": pipeline(old),
        "whole event, this tree": pipeline(new),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        per_call_us(fn)  # warm-up
    for _ in range(BATCHES):
        for name, fn in cases.items():
            times[name].append(per_call_us(fn))
    print(f"per-call event ({BATCHES} interleaved batches of {PER_BATCH}; median, min-max us)")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:24} {medians[name]:7.2f}   {min(t):6.2f}-{max(t):6.2f}")
    for part in ("redactor", "whole event"):
        ratio = medians[f"{part}, this tree"] / medians[f"{part}, baseline"]
        print(f"{part}: this tree / baseline {args.baseline} = {ratio:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
