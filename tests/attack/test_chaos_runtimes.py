"""SIGKILL runtimes that started helpers, and the supervisor itself.

After each kill: the runtime is back (a new process, answering through its channel), the
helpers it started are gone, its old token is refused, and the other runtime never noticed.
After the supervisor is killed: no process of the run is left (sidecar, runtimes, helpers:
found by a mark in their environment), and a new supervisor on the same directories starts,
serves, and refuses every token of the old run.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from tests.attack import tally
from tests.attack.cluster import Cluster
from tests.attack.scale import pick
from tests.helpers import pid_alive, runtime_token, wait_until

RUNTIMES = {"alpha": ["system.*"], "beta": ["system.*"]}
MARK = "ATTACK_RUN_MARK"


def old_token_refused(cluster: Cluster, runtime: str, token: str) -> bool:
    """Replay a dead identity's token on the runtime's handshake socket, from inside the
    restarted runtime's own tree (from anywhere else it is refused before the token is read)."""
    tally.count("attacks", "replayed token of a dead identity")
    refusal = cluster.relay(runtime).handshake_refusal(token)
    return refusal is not None and "wrong token" in refusal


def marked_processes(mark: str) -> list[int]:
    """Live processes whose environment carries `MARK=mark` (this test's own excluded)."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0") and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def kill_leftovers(pids: list[int]) -> None:
    """A failed run must not leave its orphans to the rest of the test session."""
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigkilled_runtimes_come_back_and_leave_nothing_behind(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, RUNTIMES).start()
    helpers: list[int] = []
    try:
        for round_ in range(pick(3, 20)):
            victim, other = ("alpha", "beta") if round_ % 2 == 0 else ("beta", "alpha")
            helpers += [cluster.relay(victim).spawn() for _ in range(2)]
            old = cluster.relay(victim).pid()
            other_pid = cluster.relay(other).pid()
            assert old is not None and other_pid is not None
            token = runtime_token(old)
            os.kill(old, signal.SIGKILL)
            tally.count("faults", "runtime SIGKILL")
            wait_until(
                lambda v=victim, o=old: cluster.relay(v).pid() not in (None, o),
                15,
                f"{victim} to be restarted",
            )
            wait_until(
                lambda h=helpers: not any(pid_alive(p) for p in h), 5, "its helpers to be gone"
            )
            assert old_token_refused(cluster, victim, token)
            assert cluster.relay(victim).serves()
            assert cluster.relay(other).pid() == other_pid
            assert cluster.relay(other).serves()
    finally:
        try:
            cluster.stop()
        finally:
            kill_leftovers(helpers)


def test_a_sigkilled_supervisor_leaves_no_process_and_no_live_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)  # inherited by the supervisor and everything below it
    tokens: dict[str, str] = {}
    for round_ in range(pick(2, 6)):
        (tmp_path / "notify.sock").unlink(missing_ok=True)
        cluster = Cluster(tmp_path, RUNTIMES)
        try:
            cluster.start()
            for runtime, token in tokens.items():
                assert old_token_refused(cluster, runtime, token), runtime
            assert all(cluster.relay(name).serves() for name in RUNTIMES)
            helpers = [cluster.relay(name).spawn() for name in RUNTIMES]
            tokens = {name: runtime_token(cluster.run.child(name)["pid"]) for name in RUNTIMES}
            assert set(helpers) <= set(marked_processes(mark))
        except BaseException:
            cluster.stop()
            raise
        cluster.run.proc.proc.kill()
        tally.count("faults", "supervisor SIGKILL")
        cluster.run.proc.wait()
        cluster.run.notify.close()
        try:
            wait_until(lambda: not marked_processes(mark), 5, f"no orphans after kill {round_ + 1}")
        finally:
            kill_leftovers(marked_processes(mark))
