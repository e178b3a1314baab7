"""The `soma` command: one tree, lazily imported handlers, one meaning for each exit status."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from soma_cli.main import build_parser
from tests.helpers import (
    REPO,
    SOMA,
    Process,
    SupervisorRun,
    child_env,
    run_soma,
    set_secret,
    wait_until,
    write_config,
)


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _all_parsers(sub)
    return found


def test_version_comes_from_the_installed_distribution() -> None:
    from importlib.metadata import version

    result = run_soma("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"soma {version('soma-runtime')}"


def test_every_help_text_says_soma_and_never_python_m_sidecar() -> None:
    parsers = _all_parsers(build_parser())
    assert len(parsers) >= 14  # the root, 6 commands, 5 secret and 3 card actions
    for parser in parsers:
        text = parser.format_help()
        assert parser.prog.startswith("soma"), parser.prog
        assert "python -m" not in text, text


def test_status_imports_neither_grpc_nor_the_sidecar(tmp_path: Path) -> None:
    config = write_config(tmp_path / "soma.toml", '[soma]\nruntime_dir = "run"\n')
    probe = (
        "import sys\n"
        "from soma_cli.main import main\n"
        "try:\n"
        f"    main(['status', '--config', {str(config)!r}])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'sidecar'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_status_json_without_a_supervisor_is_a_json_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "soma.toml", '[soma]\nruntime_dir = "run"\n')
    result = run_soma("status", "--json", "--config", str(config))
    assert result.returncode == 1
    answer = json.loads(result.stdout)
    assert answer["ok"] is False
    assert answer["error"] == "unreachable"
    assert str(tmp_path / "run" / "supervisor.sock") in answer["message"]


@pytest.mark.parametrize(
    "command",
    [
        ("supervise",),
        ("sidecar",),
        ("status",),
        ("status", "--json"),
        ("systemd-unit",),
        ("secrets", "list"),
        ("secrets", "rotate-kek"),
        ("secrets", "audit"),
    ],
)
def test_a_configuration_error_exits_2_with_one_message(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    config = write_config(tmp_path / "soma.toml", '[sidecar]\nsockt = "x"\n')
    result = run_soma(*command, "--config", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""  # no half an answer, no empty unit
    assert result.stderr == f"soma {command[0]}: {config}: sidecar.sockt: unknown key\n"


def test_a_usage_error_exits_2() -> None:
    assert run_soma("secrets", "sett").returncode == 2
    assert run_soma("status", "--jsn").returncode == 2


def test_a_runtime_failure_exits_1(tmp_path: Path) -> None:
    config = write_config(tmp_path / "soma.toml", '[soma]\nstate_dir = "state"\n')
    result = run_soma("secrets", "delete", "missing", "--config", str(config))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("soma secrets: ")


def test_the_module_entry_is_the_same_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "soma_cli", "--version"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("soma ")


def test_secrets_set_on_a_terminal_reads_without_echo(tmp_path: Path) -> None:
    """The value is typed on a pseudo-terminal: it is stored, and never echoed back to it."""
    config = write_config(tmp_path / "soma.toml", '[soma]\nstate_dir = "state"\n')
    controller, terminal = os.openpty()
    try:
        proc = subprocess.Popen(
            [SOMA, "secrets", "set", "typed", "--config", str(config)],
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=terminal,
            env=child_env(),
            start_new_session=True,  # no controlling terminal: getpass uses stdin, the pty
        )
        os.close(terminal)
        seen = b""
        while b"Value for typed:" not in seen:
            seen += os.read(controller, 1024)
        os.write(controller, b"hunter2-typed\n")
        stdout, _ = proc.communicate(timeout=30)
        try:
            while chunk := os.read(controller, 1024):
                seen += chunk
        except OSError:  # EIO: the terminal's last user is gone
            pass
    finally:
        os.close(controller)
    assert proc.returncode == 0, seen
    assert b"version 1 stored" in stdout
    assert b"hunter2-typed" not in seen
    listing = run_soma("secrets", "list", "--json", "--config", str(config))
    assert [s["name"] for s in json.loads(listing.stdout)] == ["typed"]


def test_the_operator_reaches_the_service_without_its_environment(tmp_path: Path) -> None:
    """The service runs with systemd's $RUNTIME_DIRECTORY and $STATE_DIRECTORY set (here to
    other directories); the operator's `soma status` and `soma secrets`, without them, reach
    the same supervisor and the same vault."""
    config = SupervisorRun.write(tmp_path, "")
    elsewhere = {"RUNTIME_DIRECTORY": str(tmp_path / "svc-run")}
    elsewhere["STATE_DIRECTORY"] = str(tmp_path / "svc-state")
    service = Process(
        [SOMA, "supervise", "--config", str(config)],
        tmp_path / "supervisor.log",
        env=child_env(**elsewhere),
    )
    try:
        status = wait_until(
            lambda: (
                service.proc.poll() is not None
                or run_soma("status", "--json", "--config", str(config)).returncode == 0
            ),
            30,
            "the operator's `soma status` to reach the service",
        )
        assert service.proc.poll() is None, service.output()
        assert status
        set_secret(config, "shared", "one-value")
        assert (tmp_path / "state" / "vault.db").exists()
        assert not (tmp_path / "svc-state").exists()
        assert not (tmp_path / "svc-run").exists()
    finally:
        assert service.stop(30) == 0, service.output()


@pytest.mark.parametrize(
    ("given", "why"),
    [
        (b"", "no value"),
        (b"\n", "no value"),
        (b"x" * (64 * 1024 + 1), "the value from standard input is over 65536 bytes"),
    ],
    ids=["empty", "only-a-newline", "too-large"],
)
def test_a_secret_value_that_cannot_be_stored_is_a_usage_error(
    tmp_path: Path, given: bytes, why: str
) -> None:
    """`printf '' | soma secrets set x`: exit 2 (a usage error, as the README promises), a
    message saying what to do, and nothing stored."""
    config = write_config(tmp_path / "soma.toml", '[soma]\nstate_dir = "state"\n')
    result = subprocess.run(
        [SOMA, "secrets", "set", "x", "--config", str(config)],
        input=given,
        capture_output=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    message = result.stderr.decode()
    assert message.startswith(f"soma secrets: secret 'x': {why}"), message
    assert "standard input" in message and "nothing stored" in message
    assert message.count("\n") == 1
    listing = run_soma("secrets", "list", "--json", "--config", str(config))
    assert json.loads(listing.stdout) == []


def ends_quietly_into_a_pipe_whose_reader_left(*args: str) -> None:
    """`soma ARGS | head -1`, head done before soma has written everything (a real pipe
    whose reader has read its line and exited): no BrokenPipeError traceback, just exit 1."""
    read_end, pipe = os.pipe()
    head = subprocess.Popen(["head", "-1"], stdin=read_end, stdout=subprocess.DEVNULL)
    os.close(read_end)
    try:
        os.write(pipe, b"the line head wanted\n")
        assert head.wait(timeout=30) == 0
        result = subprocess.run(
            [SOMA, *args],
            stdout=pipe,
            stderr=subprocess.PIPE,
            env=child_env(),
            timeout=60,
            check=False,
        )
    finally:
        os.close(pipe)
    assert result.stderr == b"", result.stderr.decode()
    assert result.returncode == 1


def test_status_into_a_pipe_whose_reader_left_ends_quietly(tmp_path: Path) -> None:
    run = SupervisorRun(tmp_path, "")
    try:
        run.wait_ready()
        for args in (["status"], ["status", "--json"]):
            ends_quietly_into_a_pipe_whose_reader_left(*args, "--config", str(run.config))
    finally:
        assert run.stop() == 0, run.proc.output()


def test_every_command_ends_quietly_when_its_reader_left() -> None:
    """The same for every command (handled once, in `main`): here one printing 18 kB."""
    ends_quietly_into_a_pipe_whose_reader_left(
        "cards", "search", "--json", "--dir", str(REPO / "cards"), ""
    )
