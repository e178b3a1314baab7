"""A child's structured log lines reach the supervisor's stream in its format: one line, one
timestamp (the child's), the child's name. The sidecar writes its own there; a runtime's are
re-emitted by the supervisor, only strict JSON, never as the supervisor's or the sidecar's."""

from __future__ import annotations

import io
import json
import os
import re
import stat
from pathlib import Path

import pytest
import structlog

from soma_runtime import strict_json
from soma_runtime.logs import Format, configure_logging
from soma_runtime.redaction import REDACTED
from soma_runtime.supervisor import process
from soma_runtime.supervisor.process import _log_line
from tests.helpers import (
    SOMA,
    NotifySocket,
    Process,
    SupervisorRun,
    child_env,
    wait_until,
    write_config,
)

ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
CHILD_TIME = "2026-01-02T03:04:05.000006Z"


def logging_to(fmt: Format, monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """The supervisor's log, configured anew (its logger caches the first configuration)."""
    out = io.StringIO()
    configure_logging("info", fmt, stream=out)
    monkeypatch.setattr(process, "log", structlog.get_logger(component="supervisor"))
    return out


def test_a_childs_event_keeps_its_own_timestamp_and_level_in_console_format(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = logging_to("console", monkeypatch)
    _log_line(
        "claims",
        "stderr",
        json.dumps(
            {"event": "gateway_serving", "level": "warning", "timestamp": CHILD_TIME, "n": 7}
        ),
    )
    line = out.getvalue().strip()
    assert line.startswith(CHILD_TIME) and len(ISO_TIME.findall(line)) == 1, line
    assert "gateway_serving" in line and "child=claims" in line and "n=7" in line
    assert "warning" in line and "line=" not in line  # not wrapped as an `output` line


def test_a_childs_event_without_a_usable_timestamp_gets_the_supervisors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = logging_to("json", monkeypatch)
    _log_line("claims", "stderr", '{"event": "tick", "timestamp": {"not": "a time"}}')
    record = json.loads(out.getvalue())
    assert record["event"] == "tick" and ISO_TIME.match(record["timestamp"])


def test_a_childs_non_standard_json_is_logged_as_text_never_re_emitted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python's json module reads NaN; re-emitted, it would make the supervisor's own line
    something no other JSON reader takes."""
    out = logging_to("json", monkeypatch)
    text = '{"event": "score", "value": NaN}'
    _log_line("claims", "stdout", text)
    record = strict_json.loads(out.getvalue().encode(), 4)  # the supervisor's line is JSON
    assert record["event"] == "output" and record["line"] == text


def test_under_console_format_the_sidecars_lines_are_first_class(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "soma.toml",
        """
[soma]
state_dir = "state"
runtime_dir = "run"

[logging]
format = "console"

[sidecar]
organs = ["system"]
""",
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    env = child_env(NOTIFY_SOCKET=str(notify.path))
    proc = Process([SOMA, "supervise", "--config", str(config)], tmp_path / "log", env=env)
    try:
        wait_until(lambda: notify.has("READY=1") or proc.proc.poll() is not None, 30, "READY=1")
        assert proc.proc.poll() is None, proc.output()
    finally:
        assert proc.stop(timeout=30) == 0
        notify.close()
    lines = proc.output().splitlines()
    sidecar = [line for line in lines if "child=sidecar" in line]
    assert any(" serving " in line for line in sidecar), proc.output()
    for line in sidecar:
        assert len(ISO_TIME.findall(line)) == 1 and "line=" not in line, line


def test_a_runtime_cannot_write_a_line_that_reads_as_the_supervisors_or_the_sidecars(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = logging_to("json", monkeypatch)
    forged = {"event": "exited", "component": "supervisor", "child": "sidecar", "exit": "exit 0"}
    _log_line("claims", "stderr", json.dumps(forged))
    record = json.loads(out.getvalue())
    assert record["event"] == "exited" and record["exit"] == "exit 0"
    assert record["child"] == "claims" and record["component"] == process.CHILD_COMPONENT
    assert record["child_child"] == "sidecar" and record["child_component"] == "supervisor"


def test_the_sidecar_writes_its_lines_to_the_supervisors_stream_itself(tmp_path: Path) -> None:
    """Its events do not pass through the supervisor (no parse, no re-render): it holds the
    supervisor's log file itself; its stderr is still a pipe the supervisor reads, for what
    bypasses its logging."""
    run = SupervisorRun(tmp_path, "")
    try:
        run.wait_ready()
        pid = run.child("sidecar")["pid"]
        log = os.stat(f"/proc/{run.proc.pid}/fd/2")
        fds = os.listdir(f"/proc/{pid}/fd")
        held = [fd for fd in fds if os.path.samestat(os.stat(f"/proc/{pid}/fd/{fd}"), log)]
        assert held, "the sidecar does not hold the supervisor's log"
        for fd in held:  # and its own children do not inherit it
            flags = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
            assert int(flags, 8) & os.O_CLOEXEC
        assert stat.S_ISFIFO(os.stat(f"/proc/{pid}/fd/2").st_mode)
    finally:
        assert run.stop() == 0
    serving = [e for e in run.events("serving") if e.get("child") == "sidecar"]
    assert len(serving) == 1 and serving[0]["component"] == "sidecar", run.proc.output()


def test_a_runtime_cannot_slip_text_past_the_redactor_in_a_structural_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The redactor trusts `runtime`, `stream`, `timestamp`... as values this process computed;
    in a child's event, they are the child's text, and scanned."""
    out = logging_to("json", monkeypatch)
    token = "sk-" + "R" * 24
    forged = {key: token for key in ("runtime", "stream", "logger", "timestamp", "component")}
    _log_line("claims", "stderr", json.dumps({"event": "tick", **forged}))
    record = json.loads(out.getvalue())
    assert token not in out.getvalue()
    assert record["child_runtime"] == record["child_timestamp"] == REDACTED
    assert record["child_stream"] == REDACTED and ISO_TIME.match(record["timestamp"])
