"""One supervisor or standalone sidecar per runtime directory (`soma_runtime.runtime_lock`), and
a process removes only the files it wrote: real `soma supervise`, `soma sidecar` and `make run`
processes on one configuration."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx2

from sidecar.bridge.published import url_file
from soma_runtime import runtime_lock
from tests.helpers import (
    SOMA,
    Process,
    SupervisorRun,
    child_env,
    pid_alive,
    start_sidecar,
    wait_until,
)

BRIDGE = '[[bridge]]\nname = "local"\nexpose = ["system.*"]\n'


def busy(run_dir: Path, pid: int, holder: str) -> str:
    return f"runtime directory {run_dir} is in use by another Soma process (pid {pid}, {holder})"


def answers(url: str) -> bool:
    """Whether a bridge instance serves at `url` (it refuses a request without a key)."""
    try:
        reply = httpx2.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    except httpx2.TransportError:
        return False
    return reply.status_code == 401


def test_a_standalone_sidecar_beside_a_supervisor_is_refused(tmp_path: Path) -> None:
    """`soma sidecar` on the configuration `soma supervise` runs (its own `[sidecar].socket`
    is free) exits 2 before it binds or writes anything: the supervised bridge's URL file
    is the same file, and the bridge still serves."""
    run = SupervisorRun(tmp_path, BRIDGE, organs=("system",), sidecar='socket = "run/local.sock"')
    standalone = None
    try:
        run.wait_ready()
        published = url_file(run.run_dir, "local")
        wait_until(published.exists, what="the bridge URL file")
        before = published.stat().st_ino, published.read_text()
        argv = [SOMA, "sidecar", "--config", str(run.config)]
        standalone = Process(argv, tmp_path / "standalone.log")
        assert standalone.wait(30) == 2, standalone.output()
        assert busy(run.run_dir, run.proc.pid, "soma supervise") in standalone.output()
        assert (published.stat().st_ino, published.read_text()) == before
        assert not (run.run_dir / "local.sock").exists()
        assert answers(before[1].strip())
    finally:
        if standalone is not None:
            standalone.kill()
        assert run.stop() == 0, run.proc.output()


def test_a_second_supervisor_or_make_run_is_refused_until_the_first_is_killed(
    tmp_path: Path,
) -> None:
    """A second `soma supervise`, or `make run`, on a runtime directory a supervisor serves
    exits 2 naming it and the supervisor's pid, and touches nothing (`make run` neither
    revokes the running one's key nor removes its URL file). Once the first is SIGKILLed
    (no chance to clean up: the lock file stays), a new supervisor starts there."""
    first = SupervisorRun(tmp_path, BRIDGE, organs=("system",))
    try:
        first.wait_ready()
        published = url_file(first.run_dir, "local")
        wait_until(published.exists, what="the bridge URL file")
        before = published.stat().st_ino, published.read_text()
        message = busy(first.run_dir, first.proc.pid, "soma supervise")

        second = Process([SOMA, "supervise", "--config", str(first.config)], tmp_path / "2.log")
        assert second.wait(30) == 2, second.output()
        assert f"soma supervise: {message}" in second.output()
        key_file = tmp_path / ".soma" / "bridge-local.key"
        make_run = [sys.executable, "-m", "examples.run", "--config", str(first.config)]
        again = Process(make_run, tmp_path / "make-run.log")
        assert again.wait(30) == 2, again.output()
        assert f"make run: {message}" in again.output()
        assert not key_file.exists()  # no key made, so none revoked either
        assert (published.stat().st_ino, published.read_text()) == before
        assert answers(before[1].strip())

        started = first.events("started")
        sidecar = [e for e in started if e["component"] == "supervisor" and e["child"] == "sidecar"]
        first.proc.kill()
        wait_until(
            lambda: not pid_alive(sidecar[-1]["pid"]), what="the sidecar to die with its supervisor"
        )
    finally:
        first.proc.kill()
        first.notify.close()
    assert (first.run_dir / "soma.lock").exists()
    third = Process([SOMA, "supervise", "--config", str(first.config)], tmp_path / "3.log")
    try:
        wait_until(
            lambda: '"event": "ready"' in third.output() or third.proc.poll() is not None,
            timeout=30,
            what="the new supervisor to be ready",
        )
        wait_until(lambda: published.stat().st_ino != before[0], what="the new bridge URL file")
        assert answers(published.read_text().strip())
    finally:
        assert third.stop(30) == 0, third.output()


def test_a_sidecar_removes_only_the_files_it_wrote(tmp_path: Path) -> None:
    """A bridge's URL file and the local channel's token file replaced by someone else while
    the sidecar runs (another sidecar serving that name) are left alone at its stop."""
    sidecar, _ = start_sidecar(tmp_path, ["system"], extra=BRIDGE)
    published = url_file(tmp_path / "run", "local")
    token = tmp_path / "run" / "sidecar.token"
    try:
        wait_until(published.exists, what="the bridge URL file")
        for path, text in ((published, "http://127.0.0.1:9/mcp\n"), (token, "0" * 64 + "\n")):
            replacement = path.with_name(path.name + ".other")
            replacement.write_text(text)
            os.replace(replacement, path)
    finally:
        assert sidecar.stop() == 0, sidecar.output()
    assert published.read_text() == "http://127.0.0.1:9/mcp\n"
    assert token.read_text() == "0" * 64 + "\n"


def test_a_descriptor_passed_as_the_lock_that_is_not_this_directory_s_is_closed(
    tmp_path: Path,
) -> None:
    """A sidecar handed, as its lock, a descriptor that is not its runtime directory's lock
    (here another directory's lock, locked) takes its own lock and closes that descriptor:
    kept open, it held the other directory's lock for the sidecar's whole life."""
    other = runtime_lock.acquire(tmp_path / "other", "test")
    config = SupervisorRun.write(tmp_path, "")
    sidecar = Process(
        [SOMA, "sidecar", "--supervised", "--config", str(config)],
        tmp_path / "sidecar.log",
        env=child_env(**{runtime_lock.LOCK_FD_ENV: str(other.fd)}),
        pass_fds=(other.fd,),
    )
    other.release()  # the sidecar's copy is the only one left
    lock_file = tmp_path / "run" / runtime_lock.LOCK_FILE
    try:
        wait_until(
            lambda: sidecar.proc.poll() is not None or '"event": "serving"' in sidecar.output(),
            timeout=30,
            what="the sidecar to serve",
        )
        assert sidecar.proc.poll() is None, sidecar.output()
        assert lock_file.read_text().startswith(f"{sidecar.pid} soma sidecar --supervised")
        runtime_lock.acquire(tmp_path / "other", "test").release()  # free again
    finally:
        assert sidecar.stop() == 0, sidecar.output()


def test_make_run_hands_its_lock_to_the_supervisor_it_starts(tmp_path: Path) -> None:
    """`make run` locks the runtime directory before it revokes a key or removes a URL file,
    and the supervisor it starts holds that same lock (its open file): no other Soma process
    can start on the directory in between. The refusal names `make run`, which holds it."""
    config = SupervisorRun.write(tmp_path, BRIDGE, organs=("system",))
    make_run = Process(
        [sys.executable, "-m", "examples.run", "--config", str(config)], tmp_path / "run.log"
    )
    try:
        wait_until(
            lambda: '"event": "ready"' in make_run.output() or make_run.proc.poll() is not None,
            timeout=30,
            what="make run's supervisor to be ready",
        )
        assert make_run.proc.poll() is None, make_run.output()
        second = Process([SOMA, "supervise", "--config", str(config)], tmp_path / "2.log")
        assert second.wait(30) == 2, second.output()
        assert busy(tmp_path / "run", make_run.pid, "make run") in second.output()
    finally:
        assert make_run.stop(30) == 0, make_run.output()
