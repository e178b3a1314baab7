"""The SDK's stream across a sidecar restart, in supervised runtimes (their tokens outlive the
sidecar): idempotent calls in flight are sent again, non-idempotent ones raise
`sdk.Unavailable` and ran exactly once, calls made while the sidecar is away are sent on the
new stream; a denied call (`sdk.PermissionDenied`) leaves the stream serving."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.helpers import SupervisorRun, read_report, wait_until

KINDS = ("blocking", "asyncio")

RUNTIMES = "".join(
    f"""
[[runtime]]
name = "{kind}"
command = ["python", "-m", "tests.fixtures.stream_agent", "{kind}", "{kind}.jsonl"]
allow = ["system.*", "acme.slow", "acme.record"]
"""
    for kind in KINDS
)


def records(tmp_path: Path) -> list[str]:
    path = tmp_path / "state" / "acme-records.txt"
    return path.read_text().split() if path.exists() else []


def merged(tmp_path: Path, kind: str) -> dict[str, object]:
    merged: dict[str, object] = {}
    for line in read_report(tmp_path / f"{kind}.jsonl"):
        merged.update(line)
    return merged


def test_calls_in_flight_across_a_sidecar_restart(tmp_path: Path) -> None:
    run = SupervisorRun(tmp_path, RUNTIMES)
    try:
        run.wait_ready()
        wait_until(
            lambda: all(
                merged(tmp_path, k).get("sent") and f"cut-{k}" in records(tmp_path) for k in KINDS
            ),
            timeout=30,
            what="both runtimes' non-idempotent calls to be running",
        )
        os.kill(run.child("sidecar")["pid"], signal.SIGKILL)
        wait_until(
            lambda: all("queued" in merged(tmp_path, k) for k in KINDS),
            timeout=45,
            what="both runtimes to report",
        )
        for kind in KINDS:
            outcome = merged(tmp_path, kind)
            assert outcome["denied"] == {"error": "PermissionDenied"}, outcome
            assert outcome["after"] == {"after": "denied"}
            assert outcome["idempotent"] == {"ok": {"slept_ms": 3000}}, outcome
            assert outcome["cut"] == {"error": "Unavailable"}, outcome
            assert outcome["queued"] == {"ok": {"recorded": f"queued-{kind}"}}, outcome
            assert records(tmp_path).count(f"cut-{kind}") == 1  # ran once, never again
            assert records(tmp_path).count(f"queued-{kind}") == 1
        assert run.child("sidecar")["restarts"] == 1
    finally:
        assert run.stop() == 0, run.proc.output()
