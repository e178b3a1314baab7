"""A setup error is not a crash: the sidecar exits 2, `soma supervise` stops at once with 2."""

from __future__ import annotations

import time
from pathlib import Path

from tests.helpers import SupervisorRun, run_soma, start_sidecar, wait_until, write_config

LOCAL_ORGAN = "from tests.fixtures.organs import Acme\n\n\nclass Local(Acme):\n    pass\n"


def test_a_bad_organ_stops_the_supervisor_at_once_with_2(tmp_path: Path) -> None:
    run = SupervisorRun(tmp_path, "", organs=("system", "tests.fixtures.organs:NotAnOrgan"))
    began = time.monotonic()
    try:
        code = run.proc.wait(timeout=20)
    finally:
        run.stop()
    assert code == 2, run.proc.output()
    assert time.monotonic() - began < 10
    assert "is not an Organ subclass" in run.proc.output()
    assert len([e for e in run.events("started") if e.get("child") == "sidecar"]) == 1
    assert [e["child"] for e in run.events("setup_error")] == ["sidecar"]


def test_the_sidecar_alone_exits_2_on_a_bad_organ(tmp_path: Path) -> None:
    config = SupervisorRun.write(
        tmp_path, "", organs=("nowhere.at_all:Organ",), sidecar='socket = "run/s.sock"'
    )
    result = run_soma("sidecar", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "soma sidecar: sidecar.organs[0]: cannot import 'nowhere.at_all'" in result.stderr


def test_the_unit_does_not_restart_a_setup_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "soma.toml", "")
    unit = run_soma("systemd-unit", "--config", str(config))
    assert "\nRestartPreventExitStatus=2\n" in unit.stdout


def test_organ_modules_are_imported_from_the_config_directory_alone(tmp_path: Path) -> None:
    """`soma sidecar` started elsewhere finds `local:Local` beside its configuration file."""
    (tmp_path / "local.py").write_text(LOCAL_ORGAN)
    proc, _ = start_sidecar(tmp_path, ["system", "local:Local"])
    assert proc.stop() == 0, proc.output()


def test_organ_modules_are_imported_from_the_config_directory_supervised(
    tmp_path: Path,
) -> None:
    (tmp_path / "local.py").write_text(LOCAL_ORGAN)
    run = SupervisorRun(tmp_path, "", organs=("system", "local:Local"))
    try:
        run.wait_ready()
    finally:
        assert run.stop() == 0, run.proc.output()


def test_a_runtime_exiting_2_is_restarted_as_any_failure(tmp_path: Path) -> None:
    """Exit 2 is final only for the sidecar: for an agent's command it may mean anything."""
    body = (
        '[[runtime]]\nname = "two"\ncommand = ["python", "-c", "raise SystemExit(2)"]\n'
        'restart = "on-failure"\nbackoff_initial = 0.05\nbackoff_max = 0.1\n'
    )
    run = SupervisorRun(tmp_path, body)
    try:
        run.wait_ready()
        wait_until(lambda: run.child("two")["restarts"] >= 2, 20, "two restarts")
        assert run.proc.proc.poll() is None
    finally:
        assert run.stop() == 0, run.proc.output()
