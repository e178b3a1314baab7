"""A setup error is not a crash: the sidecar exits 2, `soma supervise` stops at once with 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc

from tests.helpers import (
    REPO,
    SOMA,
    Process,
    SupervisorRun,
    child_env,
    run_soma,
    set_secret,
    start_sidecar,
    wait_until,
    write_config,
)

LOCAL_ORGAN = "from tests.fixtures.organs import Acme\n\n\nclass Local(Acme):\n    pass\n"


def test_a_bad_organ_stops_the_supervisor_at_once_with_2(tmp_path: Path) -> None:
    run = SupervisorRun(tmp_path, "", organs=("system", "tests.fixtures.organs:NotAnOrgan"))
    try:
        code = run.proc.wait(timeout=45)
    finally:
        run.stop()
    assert code == 2, run.proc.output()
    assert "is not an Organ subclass" in run.proc.output()
    # At once: the sidecar was started once, never restarted with backoff (a bound on the
    # time taken would measure the machine's load: the sidecar alone takes seconds to import).
    assert len([e for e in run.events("started") if e.get("child") == "sidecar"]) == 1
    [event] = run.events("setup_error")
    assert event["child"] == "sidecar"
    assert event["level"] == "error"
    # The cause is in the event itself, not only in an info-level `output` line before it.
    assert "sidecar.organs[1]: " in event["cause"]
    assert "is not an Organ subclass" in event["cause"]


def test_the_sidecar_alone_exits_2_on_a_bad_organ(tmp_path: Path) -> None:
    config = SupervisorRun.write(
        tmp_path, "", organs=("nowhere.at_all:Organ",), sidecar='socket = "run/s.sock"'
    )
    result = run_soma("sidecar", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert "soma sidecar: sidecar.organs[0]: cannot import 'nowhere.at_all'" in result.stderr


def test_the_unit_does_not_restart_a_setup_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "soma.toml", "")
    # A user unit: a system unit refuses a configuration under /tmp (test_supervisor_systemd_unit).
    unit = run_soma("systemd-unit", "--user", "--config", str(config))
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


def _runtime(name: str, command: list[str], extra: str = "") -> str:
    return f"[[runtime]]\nname = {name!r}\ncommand = {json.dumps(command)}\n{extra}"


def test_a_runtime_command_that_does_not_exist_is_a_setup_error(tmp_path: Path) -> None:
    """Not five restarts: at its first start, a command that cannot be executed stops the
    supervisor at once with 2, and the event names the runtime, the command and why. Every
    such runtime is named, not only the first."""
    missing = "soma-no-such-command-here"
    body = (
        _runtime("typo", [missing, "--flag"], 'restart = "always"\n')
        + _runtime("lost", ["python", "-c", "pass"], 'cwd = "no/such/dir"\n')
        + _runtime("fine", ["python", "-c", "import time; time.sleep(60)"])
    )
    run = SupervisorRun(tmp_path, body)
    try:
        code = run.proc.wait(timeout=30)
    finally:
        run.stop()
    output = run.proc.output()
    assert code == 2, output
    causes = {e["child"]: e["cause"] for e in run.events("setup_error")}
    assert set(causes) == {"typo", "lost"}, output
    assert f"cannot execute {missing!r}" in causes["typo"]
    assert "No such file or directory" in causes["typo"]
    assert f"{tmp_path / 'no/such/dir'}" in causes["lost"]
    assert not [e for e in run.events() if e.get("child") in causes and e["level"] != "error"]
    assert len([e for e in run.events() if e.get("child") in causes]) == 2  # one line each
    assert not run.notify.has("READY=1")
    [stopping] = [e for e in run.events("stopping") if e["component"] == "supervisor"]
    assert stopping["reason"].startswith("setup error of ")


def test_a_command_that_vanishes_later_is_restarted_as_any_failure(tmp_path: Path) -> None:
    """Once a runtime has started, a command that is gone (an upgrade under way) is a failed
    start like any other: backed off and retried within the budget, the supervisor serving."""
    script = tmp_path / "once.sh"
    script.write_text('#!/bin/sh\nrm -- "$0"\nexit 1\n')
    script.chmod(0o755)
    body = _runtime(
        "once", [str(script)], "backoff_initial = 0.05\nbackoff_max = 0.1\nmax_restarts = 2\n"
    )
    run = SupervisorRun(tmp_path, body)
    try:
        run.wait_ready()
        wait_until(lambda: run.child("once")["state"] == "fatal", 20, "the budget to run out")
        assert run.proc.proc.poll() is None
        assert not run.events("setup_error")
        failed = [e for e in run.events("spawn_failed") if e["child"] == "once"]
        assert len(failed) == 2 and "No such file or directory" in failed[0]["error"]
    finally:
        assert run.stop() == 0, run.proc.output()


def test_every_allow_list_typo_is_reported_at_once(tmp_path: Path) -> None:
    body = _runtime("a", ["python", "-c", "pass"], 'allow = ["sytem.*", "system.ping"]\n')
    body += _runtime("b", ["python", "-c", "pass"], 'allow = ["vualt.retrieve"]\n')
    run = SupervisorRun(tmp_path, body, organs=("system", "vault"))
    try:
        code = run.proc.wait(timeout=20)
    finally:
        run.stop()
    assert code == 2, run.proc.output()
    [event] = run.events("setup_error")
    assert "runtime[0].allow[0]: 'sytem.*' can match no function" in event["cause"]
    assert "runtime[1].allow[0]: 'vualt.retrieve' can match no function" in event["cause"]
    assert "did you mean 'vault.retrieve'?" in event["cause"]


def test_a_credential_without_its_secret_is_warned_about_with_the_fix(tmp_path: Path) -> None:
    credentials = (
        '[[credential]]\nname = "stored"\nhosts = ["api.example.com"]\n'
        '[[credential]]\nname = "absent"\nsecret = "absent-key"\nhosts = ["api.example.com"]\n'
    )
    config = SupervisorRun.write(tmp_path, credentials)
    set_secret(config, "stored", "a-value")
    run = SupervisorRun(tmp_path, credentials)
    try:
        run.wait_ready()
        warnings = wait_until(lambda: run.events("credential_secret_missing"), 10, "a warning")
    finally:
        assert run.stop() == 0, run.proc.output()
    assert [(w["credential"], w["secret"], w["level"]) for w in warnings] == [
        ("absent", "absent-key", "warning")
    ]
    assert warnings[0]["fix"] == f"soma secrets set absent-key --config {config}"


def unverified_grpcio(tmp_path: Path) -> dict[str, str]:
    """The environment of a Python whose grpcio is not the release `sidecar.handover` was
    verified against: a `sitecustomize` (imported by every interpreter started with it, the
    supervisor's sidecar included) moves the verified release away from the installed one."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        'import sidecar.handover\nsidecar.handover.VERIFIED_GRPCIO = "0.0."\n'
    )
    return {"PYTHONPATH": f"{site}{os.pathsep}{REPO}"}


UNVERIFIED = f"grpcio {grpc.__version__} is installed; the sidecar hands its connections"


def test_the_sidecar_alone_refuses_a_grpcio_it_cannot_hand_connections_to(tmp_path: Path) -> None:
    """Exit 2 and one line that says what to install, before anything serves: not a channel
    that fails at its first connection."""
    config = SupervisorRun.write(tmp_path, "", sidecar='socket = "run/s.sock"')
    sidecar = Process(
        [SOMA, "sidecar", "--config", str(config)],
        tmp_path / "sidecar.log",
        env=child_env(**unverified_grpcio(tmp_path)),
    )
    assert sidecar.wait(60) == 2, sidecar.output()
    output = sidecar.output()
    [line] = [line for line in output.splitlines() if UNVERIFIED in line]
    assert line.startswith("soma sidecar: grpcio ") and "0.0.x only" in line, output
    assert "Traceback" not in output
    assert not (tmp_path / "run" / "s.sock").exists()


def test_a_supervised_sidecar_with_a_grpcio_it_cannot_use_is_a_setup_error(
    tmp_path: Path,
) -> None:
    """Under the supervisor, channels open only as runtimes register: the sidecar must refuse
    at its start, not serve and then fail every registration."""
    body = _runtime("agent", ["python", "-c", "import time; time.sleep(60)"])
    run = SupervisorRun(tmp_path, body, env=unverified_grpcio(tmp_path))
    try:
        code = run.proc.wait(timeout=60)
    finally:
        run.stop()
    output = run.proc.output()
    assert code == 2, output
    [event] = run.events("setup_error")
    assert event["child"] == "sidecar"
    assert UNVERIFIED in event["cause"]
    assert "Traceback" not in output
    assert not run.events("request_failed")
    assert not run.notify.has("READY=1")


def test_sockets_handed_over_that_cannot_be_used_are_a_setup_error(tmp_path: Path) -> None:
    config = SupervisorRun.write(tmp_path, "")
    sidecar = Process(
        [SOMA, "sidecar", "--supervised", "--config", str(config)],
        tmp_path / "sidecar.log",
        env=child_env(SOMA_BRIDGE_SOCKETS="desk=999"),  # no such descriptor
    )
    assert sidecar.wait(60) == 2, sidecar.output()
    output = sidecar.output()
    assert "soma sidecar: SOMA_BRIDGE_SOCKETS: the bridge sockets passed cannot be used" in output
    assert "Traceback" not in output
