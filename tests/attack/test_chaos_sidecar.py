"""SIGKILL the sidecar again and again under writers; nothing acknowledged may be lost.

Two runtimes write as fast as they can: numbered vault keys (`vault.store`, idempotent, so the
SDK resends one cut off by a restart) and ids through the non-idempotent `acme.record` (never
resent: a cut-off call fails with `Unavailable`). After the kills, read from the vault file
itself: every acknowledged store is there with its value, every acknowledged record appears
exactly once, and no record appears twice.
"""

from __future__ import annotations

import os
import random
import signal
from collections import Counter
from pathlib import Path
from typing import Any

from sidecar.vault.open import open_vault
from soma_runtime.config import parse_config
from tests.attack import tally
from tests.attack.scale import pick
from tests.helpers import SupervisorRun, read_report, wait_until

WRITERS = ("w1", "w2")
# Right after CONFIG_HEAD, so still in its [sidecar] table: the kills must not exhaust the
# sidecar's restart budget.
BODY = "max_restarts = 1000\n" + "".join(
    f"""
[[runtime]]
name = "{name}"
command = ["python", "-m", "tests.attack.agent", "writer", "{name}.jsonl"]
allow = ["vault.store", "acme.record"]
"""
    for name in WRITERS
)


def outcomes(tmp: Path, name: str) -> list[dict[str, Any]]:
    return [r for r in read_report(tmp / f"{name}.jsonl") if "op" in r]


def acked(tmp: Path, op: str) -> int:
    return sum(1 for name in WRITERS for r in outcomes(tmp, name) if r["op"] == op and r["ok"])


def test_acknowledged_writes_survive_sidecar_sigkills(tmp_path: Path) -> None:
    kills = pick(2, 25)
    rng = random.Random(kills)
    run = SupervisorRun(tmp_path, BODY, organs=("system", "vault", "tests.fixtures.organs:Acme"))
    try:
        run.wait_ready()
        for round_ in range(kills):
            # Let the writers get going again, a different amount each round, so the kill lands
            # anywhere in a store or a record.
            target = acked(tmp_path, "store") + rng.randint(5, 40)
            records = acked(tmp_path, "record") + 2
            wait_until(
                lambda t=target, r=records: (
                    acked(tmp_path, "store") >= t and acked(tmp_path, "record") >= r
                ),
                30,
                f"writes to flow before kill {round_ + 1}",
            )
            sidecar = run.child("sidecar")["pid"]
            os.kill(sidecar, signal.SIGKILL)
            tally.count("faults", "sidecar SIGKILL")
            wait_until(
                lambda old=sidecar: (
                    run.child("sidecar")["state"] == "running"
                    and run.child("sidecar")["pid"] not in (None, old)
                ),
                30,
                "the sidecar to be restarted",
            )
        final = acked(tmp_path, "store") + 20
        wait_until(lambda: acked(tmp_path, "store") >= final, 30, "writes to flow at the end")
    finally:
        assert run.stop() == 0, run.proc.output()[-4000:]
    check_nothing_acknowledged_was_lost(tmp_path)


def check_nothing_acknowledged_was_lost(tmp: Path) -> None:
    vault = open_vault(parse_config({"soma": {"state_dir": str(tmp / "state")}}))
    lost_stores = []
    stored = 0
    failures: Counter[str] = Counter()
    acked_records: list[str] = []
    for name in WRITERS:
        for record in outcomes(tmp, name):
            tally.count("calls", "made")
            if not record["ok"]:
                failures[f"{record['op']}: {record['error']}"] += 1
                continue
            if record["op"] == "record":
                acked_records.append(record["id"])
                continue
            stored += 1
            blob = vault.get_blob(name, f"w-{record['n']}")
            expected = f"{name}:{record['n']}".encode()
            if blob is None or blob.data != expected:
                lost_stores.append((name, record["n"]))
    vault.close()
    executed = Counter((tmp / "state" / "acme-records.txt").read_text().split())
    twice = sorted(i for i, n in executed.items() if n > 1)
    missing = sorted(i for i in acked_records if i not in executed)
    tally.count("writes", "acknowledged", stored + len(acked_records))
    tally.count("writes", "acknowledged lost", len(lost_stores) + len(missing))
    tally.count("calls", "lost", len(lost_stores) + len(missing))
    tally.count("calls", "executed twice", len(twice))
    assert lost_stores == [], f"acknowledged stores lost: {lost_stores[:10]}"
    assert missing == [], f"acknowledged records never executed: {missing[:10]}"
    assert twice == [], f"non-idempotent calls executed twice: {twice[:10]}"
    # Stores are idempotent, so the SDK resends them: none fails. A cut-off record fails with
    # Unavailable (it may have run), nothing else.
    assert set(failures) <= {"record: Unavailable"}, failures
