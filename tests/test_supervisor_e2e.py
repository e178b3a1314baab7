"""`soma supervise` end to end: real processes, real sockets, real signals."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx2
import pytest

import sdk
from sdk import _auth
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from soma_runtime.unix import parent_pid
from tests.fake_upstream import FakeUpstream
from tests.helpers import (
    TEST_ORGANS,
    SupervisorRun,
    pid_alive,
    read_report,
    run_soma,
    runtime_token,
    set_secret,
    wait_until,
    zombie_children,
)

PROBES = """
[[runtime]]
name = "alpha"
command = ["python", "-m", "tests.fixtures.agents", "probe", "alpha.jsonl"]
allow = ["system.*", "acme.greet"]

[[runtime]]
name = "beta"
command = ["python", "-m", "tests.fixtures.agents", "probe", "beta.jsonl"]
allow = ["system.echo", "acme.greet"]
env = { BETA_SETTING = "on" }
"""


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorRun]:
    tmp = tmp_path_factory.mktemp("probes")
    # Every call logged (at info; debug by default): test_children_output_is_logged_with_their_name
    run = SupervisorRun(tmp, PROBES, logging='calls = "info"\n')
    run.wait_ready()
    wait_until(
        lambda: all(
            any(r.get("ready") for r in read_report(tmp / f"{n}.jsonl")) for n in ("alpha", "beta")
        ),
        what="both probes to report",
    )
    yield run
    assert run.stop() == 0, run.proc.output()


def probe_report(run: SupervisorRun, name: str) -> dict[str, object]:
    return read_report(run.tmp / f"{name}.jsonl")[0]


def test_runtimes_call_organs_through_their_own_channels(probes: SupervisorRun) -> None:
    alpha, beta = probe_report(probes, "alpha"), probe_report(probes, "beta")
    assert alpha["echo"] == {"from": "alpha"} and beta["echo"] == {"from": "beta"}
    # the organ learns the caller from the channel, not from anything the caller sent
    assert alpha["greet"] == {"greeting": "Hello, probe!", "runtime": "alpha"}
    assert beta["greet"] == {"greeting": "Hello, probe!", "runtime": "beta"}


def test_allow_lists_are_enforced_and_logged(probes: SupervisorRun) -> None:
    assert probe_report(probes, "alpha")["denied"] == "PERMISSION_DENIED"
    assert probe_report(probes, "alpha")["visible"] == ["acme.greet", "system.echo", "system.ping"]
    assert probe_report(probes, "beta")["visible"] == ["acme.greet", "system.echo"]
    wait_until(
        lambda: (
            {e["runtime"] for e in probes.events("denied") if e.get("op") == "acme.fail"}
            == {"alpha", "beta"}
        ),
        what="denials logged",
    )


def test_the_token_is_not_in_the_environment(probes: SupervisorRun) -> None:
    alpha = probe_report(probes, "alpha")
    assert alpha["env_keys"] == [
        "SOMA_AUTH_SOCKET",
        "SOMA_LOG_TO_SUPERVISOR",  # its stderr is read by the supervisor (soma_runtime.logs)
        "SOMA_RUNTIME",
        "SOMA_SIDECAR_ADDRESS",
        "SOMA_SUPERVISOR",  # the supervisor's mark (an instance id, not a secret)
        "SOMA_TOKEN_FD",
    ]
    assert alpha["token_fd_inheritable"] is False  # the SDK closed it to the runtime's children
    pid = probes.child("alpha")["pid"]
    token = runtime_token(pid)
    assert len(token) == 64
    assert token.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    assert token not in probes.proc.output()


def test_configured_environment_reaches_the_runtime(probes: SupervisorRun) -> None:
    pid = probes.child("beta")["pid"]
    assert b"BETA_SETTING=on" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def test_socket_and_directory_modes(probes: SupervisorRun) -> None:
    run_dir = probes.run_dir
    for directory in (run_dir, run_dir / "rt"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for sock in [run_dir / "admin.sock", run_dir / "supervisor.sock", *(run_dir / "rt").iterdir()]:
        assert stat.S_ISSOCK(sock.stat().st_mode), sock
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600, sock
    assert sorted(p.name for p in (run_dir / "rt").iterdir()) == [
        "alpha.auth.sock",
        "alpha.sock",
        "beta.auth.sock",
        "beta.sock",
    ]


def grpc_call(target: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SidecarStub(channel)
        try:
            stub.Stimulate(
                pb.StimulateRequest(op="system.echo", input_json=b"{}"),
                metadata=metadata,
                timeout=5,
            )
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def handshake(run: SupervisorRun, runtime: str, token: str) -> str:
    auth = str(run.run_dir / "rt" / f"{runtime}.auth.sock")
    return _auth.handshake(auth, token, time.monotonic() + 5)


def test_no_session_and_forged_sessions_are_unauthenticated(probes: SupervisorRun) -> None:
    target = f"unix://{probes.run_dir}/rt/alpha.sock"
    assert grpc_call(target, ()) == grpc.StatusCode.UNAUTHENTICATED
    forged = (("authorization", "Bearer " + "0" * 64),)
    assert grpc_call(target, forged) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_call(target, (("authorization", "Basic abc"),)) == grpc.StatusCode.UNAUTHENTICATED


def test_a_wrong_token_is_refused(probes: SupervisorRun) -> None:
    # From outside the runtime's process tree the handshake socket refuses before it reads;
    # the token check itself is tested against a standalone sidecar's channel.
    with pytest.raises(sdk.Unauthenticated, match="not the runtime's"):
        handshake(probes, "alpha", "f" * 64)


def test_another_runtimes_token_is_refused(probes: SupervisorRun) -> None:
    beta_token = runtime_token(probes.child("beta")["pid"])
    with pytest.raises(sdk.Unauthenticated, match="not the runtime's"):
        handshake(probes, "alpha", beta_token)


def test_the_right_token_from_another_process_is_refused(probes: SupervisorRun) -> None:
    """A stolen token is useless: the handshake checks the kernel's pid of the caller."""
    alpha_token = runtime_token(probes.child("alpha")["pid"])
    with pytest.raises(sdk.Unauthenticated, match="not the runtime's"):
        handshake(probes, "alpha", alpha_token)
    wait_until(
        lambda: any(
            "not the runtime's process" in e.get("reason", "")
            for e in probes.events("peer_refused")
        ),
        what="the refusal logged",
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_uid_is_refused(probes: SupervisorRun) -> None:
    """Another user cannot even reach the sockets; with the directories opened up it is still
    refused by the peer-credential check."""
    auth = probes.run_dir / "rt" / "alpha.auth.sock"

    def as_nobody() -> str:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become nobody and try
            os.close(read)
            try:
                # From inside the directory, so only its own mode matters, not its parents'.
                os.chdir(auth.parent)
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(5)
                    sock.connect(auth.name)
                    # a refused peer is answered at once, before it sends anything
                    answer = sock.makefile("rb").readline().decode()
            except OSError as exc:
                answer = type(exc).__name__
            os.write(write, answer.encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read) as stream:
            return stream.read()

    assert as_nobody() == "PermissionError"
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (auth.parent, auth)}
    try:
        for path in modes:
            path.chmod(0o777)
        answer = json.loads(as_nobody())
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert answer["ok"] is False and answer["error"] == "refused"
    assert "uid 65534" in answer["message"]


def test_soma_status_shows_every_child(probes: SupervisorRun) -> None:
    result = run_soma("status", "--config", str(probes.config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "NAME",
        "KIND",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "LAST",
        "EXIT",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"sidecar", "alpha", "beta"}
    assert all(row[2] == "running" for row in rows.values())
    status = probes.status()
    assert status["summary"] == "sidecar running; 2/2 runtimes running"
    alpha = probes.child("alpha")
    assert alpha["kind"] == "runtime" and pid_alive(alpha["pid"]) and alpha["restarts"] == 0


def test_children_output_is_logged_with_their_name(probes: SupervisorRun) -> None:
    sidecar_events = [e for e in probes.events("call") if e.get("child") == "sidecar"]
    assert {e["runtime"] for e in sidecar_events} >= {"alpha", "beta"}


def test_status_without_a_supervisor_says_so(tmp_path: Path) -> None:
    (tmp_path / "soma.toml").write_text('[soma]\nruntime_dir = "run"\n')
    result = run_soma("status", "--config", str(tmp_path / "soma.toml"))
    assert result.returncode == 1
    assert "no supervisor answers" in result.stderr


CRASHER = """
[[runtime]]
name = "crasher"
command = ["python", "-c", "import sys; print('crashing', flush=True); sys.exit(3)"]
restart = "on-failure"
backoff_initial = 0.2
backoff_max = 0.8
max_restarts = 4
stable_after = 5
"""


def test_a_failing_runtime_backs_off_then_is_fatal(tmp_path: Path) -> None:
    run = SupervisorRun(tmp_path, CRASHER)
    try:
        run.wait_ready()
        wait_until(lambda: run.child("crasher")["state"] == "fatal", 30, "crasher to be fatal")
        crasher = run.child("crasher")
        assert crasher["restarts"] == 4 and crasher["last_exit"] == "exit 3"
        assert crasher["pid"] is None
        delays = [e["delay_s"] for e in run.events("backoff") if e["child"] == "crasher"]
        assert len(delays) == 4
        # exponential with equal jitter: each within [step/2, step], steps 0.2 0.4 0.8 0.8
        for delay, step in zip(delays, [0.2, 0.4, 0.8, 0.8], strict=True):
            assert step / 2 <= delay <= step
        assert delays == sorted(delays[:3]) + delays[3:]
        starts = [e for e in run.events("started") if e["child"] == "crasher"]
        assert len(starts) == 5
        # the observed gaps between starts are at least the planned delays
        times = [time_of(e) for e in starts]
        for gap, delay in zip([b - a for a, b in itertools.pairwise(times)], delays, strict=True):
            assert gap >= delay
        assert any(
            e.get("line") == "crashing" and e["child"] == "crasher" for e in run.events("output")
        )
        assert run.child("sidecar")["state"] == "running"  # the rest keeps running
        assert run.notify.has("STATUS=sidecar running; 0/1 runtimes running")
    finally:
        assert run.stop() == 0


def time_of(event: dict[str, object]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


FLAPPER = """
[[runtime]]
name = "flapper"
command = ["python", "-c", "import time, sys; time.sleep(0.6); sys.exit(1)"]
backoff_initial = 0.05
max_restarts = 1
stable_after = 0.5
"""


def test_a_stable_run_resets_the_restart_budget(tmp_path: Path) -> None:
    run = SupervisorRun(tmp_path, FLAPPER)
    try:
        run.wait_ready()
        wait_until(lambda: run.child("flapper")["restarts"] >= 3, 20, "three restarts")
        assert run.child("flapper")["state"] != "fatal"
        assert zombie_children(run.proc.pid) == []
    finally:
        assert run.stop() == 0


ALWAYS = """
[[runtime]]
name = "once"
command = ["python", "-c", "print('done')"]
restart = "on-failure"

[[runtime]]
name = "never"
command = ["python", "-c", "import sys; sys.exit(1)"]
restart = "never"
"""


def test_restart_policies_on_failure_and_never(tmp_path: Path) -> None:
    run = SupervisorRun(tmp_path, ALWAYS)
    try:
        run.wait_ready()
        wait_until(
            lambda: {c["state"] for c in run.status()["children"][1:]} == {"stopped"},
            what="both runtimes to stop",
        )
        assert run.child("once")["last_exit"] == "exit 0"
        assert run.child("never")["last_exit"] == "exit 1"
        assert run.child("never")["restarts"] == 0
    finally:
        assert run.stop() == 0


CALLER = """
[[runtime]]
name = "caller"
command = ["python", "-m", "tests.fixtures.agents", "caller", "caller.jsonl"]
allow = ["acme.*"]
"""


def test_a_sidecar_killed_mid_traffic_is_survived_by_the_runtimes(tmp_path: Path) -> None:
    run = SupervisorRun(tmp_path, CALLER)
    try:
        run.wait_ready()
        report = tmp_path / "caller.jsonl"

        def successes(op: str) -> int:
            return sum(1 for r in read_report(report) if r.get("op") == op and r["ok"])

        wait_until(
            lambda: successes("acme.slow") > 20 and successes("acme.record") > 10,
            what="traffic to flow",
        )
        caller_pid = run.child("caller")["pid"]
        sidecar_pid = run.child("sidecar")["pid"]
        os.kill(sidecar_pid, signal.SIGKILL)
        wait_until(
            lambda: (
                run.child("sidecar")["restarts"] == 1 and run.child("sidecar")["state"] == "running"
            ),
            20,
            "the sidecar to restart",
        )
        before = successes("acme.slow"), successes("acme.record")
        wait_until(
            lambda: (
                successes("acme.slow") > before[0] + 20
                and successes("acme.record") > before[1] + 10
            ),
            20,
            "traffic to resume",
        )
        assert run.child("caller")["pid"] == caller_pid  # the runtime never restarted
        assert run.child("caller")["restarts"] == 0
        outcomes = read_report(report)
        # idempotent calls are retried across the restart: none failed
        assert [r for r in outcomes if r.get("op") == "acme.slow" and not r["ok"]] == []
        # non-idempotent calls cut off fail with Unavailable; none was executed twice
        failed = [r for r in outcomes if r.get("op") == "acme.record" and not r["ok"]]
        assert {r["error"] for r in failed} <= {"Unavailable"}
        recorded = (tmp_path / "state" / "acme-records.txt").read_text().split()
        assert len(recorded) == len(set(recorded))
    finally:
        assert run.stop() == 0


def test_sigterm_stops_runtimes_first_and_leaves_nothing_behind(tmp_path: Path) -> None:
    run = SupervisorRun(tmp_path, PROBES)
    run.wait_ready()
    wait_until(lambda: len(read_report(tmp_path / "alpha.jsonl")) >= 2, what="alpha ready")
    pids = [c["pid"] for c in run.status()["children"]]
    assert run.stop() == 0
    assert not any(pid_alive(pid) for pid in pids)
    assert list(run.run_dir.rglob("*.sock")) == []
    assert run.notify.has("STOPPING=1")
    assert read_report(tmp_path / "alpha.jsonl")[-1] == {"stopped": True, "pid": pids[1]}
    exits = [e["child"] for e in run.events("exited")]
    assert exits.index("sidecar") > max(exits.index("alpha"), exits.index("beta"))


def test_sigkill_of_the_supervisor_leaves_no_orphans(tmp_path: Path) -> None:
    """What is guaranteed without systemd: its children die with it (PDEATHSIG). Processes
    they started are reparented to init then; under systemd the unit's cgroup ends them
    (KillMode=mixed: SIGKILL to what is left once the supervisor is gone)."""
    run = SupervisorRun(tmp_path, PROBES)
    run.wait_ready()
    pids = [c["pid"] for c in run.status()["children"]]
    assert all(pid_alive(pid) for pid in pids)
    run.proc.proc.kill()
    run.proc.wait()
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), 3, "children to die with it")
    run.notify.close()


def test_notify_protocol_ready_watchdog_status_stopping(tmp_path: Path) -> None:
    run = SupervisorRun(tmp_path, PROBES, watchdog_usec=200_000)
    run.wait_ready()
    ready = next(m for m in run.notify.drain() if "READY=1" in m.splitlines())
    assert "STATUS=sidecar running; 2/2 runtimes running" in ready.splitlines()

    # Pings start before READY (the watchdog covers start-up too): count those after it.
    def pings_after_ready() -> int:
        messages = run.notify.drain()
        return messages[messages.index(ready) :].count("WATCHDOG=1")

    wait_until(lambda: pings_after_ready() >= 3, what="three watchdog pings after READY")
    assert run.stop() == 0
    assert any(m.startswith("STOPPING=1") for m in run.notify.drain())


def test_a_restarted_runtime_gets_a_fresh_token_and_the_old_one_is_dead(tmp_path: Path) -> None:
    run = SupervisorRun(tmp_path, PROBES)
    try:
        run.wait_ready()
        old_pid = run.child("alpha")["pid"]
        old_token = runtime_token(old_pid)
        os.kill(old_pid, signal.SIGKILL)
        wait_until(
            lambda: (
                run.child("alpha")["pid"] not in (None, old_pid)
                and run.child("alpha")["state"] == "running"
            ),
            20,
            "alpha to restart",
        )
        new_pid = run.child("alpha")["pid"]
        assert runtime_token(new_pid) != old_token
        with pytest.raises(sdk.Unauthenticated, match="not the runtime's"):
            handshake(run, "alpha", old_token)
        # and the restarted runtime works with its new token
        wait_until(
            lambda: sum(1 for r in read_report(tmp_path / "alpha.jsonl") if r.get("ready")) == 2,
            what="the new alpha to report",
        )
        assert read_report(tmp_path / "alpha.jsonl")[-1]["pid"] == new_pid
        assert run.child("alpha")["last_exit"] == "signal SIGKILL"
    finally:
        assert run.stop() == 0


HELPER = """
[[runtime]]
name = "parent"
command = ["python", "-m", "tests.fixtures.agents", "{mode}", "parent.jsonl"]
stop_timeout = 2
"""


@pytest.mark.parametrize("mode", ["helper", "setsid-helper"])
def test_stopping_a_runtime_stops_the_helpers_it_started(tmp_path: Path, mode: str) -> None:
    """Even a helper that left the runtime's process group (setsid) and holds its pipes."""
    with supervising(tmp_path, HELPER.format(mode=mode)) as run:
        run.wait_ready()
        report = tmp_path / "parent.jsonl"
        wait_until(lambda: any("helper" in r for r in read_report(report)), what="the helper")
        helper = next(r["helper"] for r in read_report(report) if "helper" in r)
        assert pid_alive(helper)
        began = time.monotonic()
        assert run.stop() == 0
        assert time.monotonic() - began < 2 + 3  # stop_timeout and a little
        assert not pid_alive(helper)


ORPHANING = """
[[runtime]]
name = "crashy"
command = ["python", "-m", "tests.fixtures.agents", "{mode}", "crashy.jsonl"]
backoff_initial = 0.05
backoff_max = 0.1
stop_timeout = 2
"""


@contextlib.contextmanager
def supervising(
    tmp: Path, body: str, organs: tuple[str, ...] = TEST_ORGANS
) -> Iterator[SupervisorRun]:
    """A run that leaves nothing behind even when the test fails: the supervisor and every
    helper its runtimes reported are killed if still there."""
    run = SupervisorRun(tmp, body, organs=organs)
    try:
        yield run
    finally:
        if run.proc.proc.poll() is None:  # the test failed before it was stopped
            run.proc.kill()
            run.notify.close()
        for report in tmp.glob("*.jsonl"):
            for record in read_report(report):
                if "helper" in record and pid_alive(record["helper"]):
                    os.kill(record["helper"], signal.SIGKILL)


def first_exit(run: SupervisorRun) -> dict[str, object]:
    """What the first start of `crashy` reported before it exited, leaving a helper behind."""
    report = run.tmp / "crashy.jsonl"
    records = wait_until(
        lambda: [r for r in read_report(report) if "token" in r], what="the first start to exit"
    )
    helper = next(r["helper"] for r in read_report(report) if "helper" in r)
    return {**records[0], "helper": helper}


def restarted(run: SupervisorRun, old_pid: object) -> dict[str, object]:
    return wait_until(
        lambda: (
            (child := run.child("crashy"))["state"] == "running"
            and child["pid"] not in (None, old_pid)
            and child
        ),
        10,
        "crashy to be restarted",
    )


@pytest.mark.parametrize("mode", ["orphaning", "setsid-orphaning"])
def test_a_runtime_that_exits_is_seen_at_once_though_its_helper_holds_its_pipes(
    tmp_path: Path, mode: str
) -> None:
    """The runtime exits; a helper it started (in its session, or in a new one) lives on
    and holds its stdout and stderr. Its exit is seen at once, its identity revoked, what
    it left behind ended and reaped, and it is restarted."""
    with supervising(tmp_path, ORPHANING.format(mode=mode)) as run:
        run.wait_ready()
        first = first_exit(run)
        crashy = restarted(run, first["pid"])
        assert crashy["restarts"] == 1 and crashy["last_exit"] == "exit 3"
        backoff = next(e for e in run.events("backoff") if e["child"] == "crashy")
        assert time_of(backoff) - float(first["exiting"]) < 1.0  # type: ignore[arg-type]
        # the old identity is dead: its channel was closed (token, sessions and sockets)
        # before the restart registered a new one
        with pytest.raises(sdk.Unauthenticated):
            handshake(run, "crashy", str(first["token"]))
        assert any(e.get("runtime") == "crashy" for e in run.events("channel_closed"))
        # the helper was ended and reaped by the supervisor, which had adopted it
        helper = first["helper"]
        wait_until(lambda: not Path(f"/proc/{helper}").exists(), 5, "the helper to be reaped")
        assert any(e["pid"] == helper for e in run.events("orphan_reaped"))
        assert zombie_children(run.proc.pid) == []
        assert run.stop() == 0


GATEWAY_ORPHANING = """
[[credential]]
name = "upstream"
hosts = ["{upstream}"]

[[gateway]]
name = "model"
upstream = "{upstream}/v1"
credential = "upstream"
base_url_env = "OPENAI_BASE_URL"
api_key_env = "OPENAI_API_KEY"
"""


def test_the_gateway_refuses_the_placeholder_of_a_runtime_that_exited(tmp_path: Path) -> None:
    """Its helper still has the placeholder in its environment; the real key must not be
    attached to anything it sends once the runtime is gone."""
    upstream = FakeUpstream()
    body = GATEWAY_ORPHANING.format(upstream=upstream.url) + ORPHANING.format(mode="orphaning")
    body += 'credentials = ["upstream"]\ngateways = ["model"]\n'
    organs = ("system", "http")
    set_secret(SupervisorRun.write(tmp_path, body, organs), "upstream", "sk-upstream-0123456789")
    try:
        with supervising(tmp_path, body, organs) as run:
            run.wait_ready()
            first = first_exit(run)
            restarted(run, first["pid"])
            gateway = first["gateway"]
            assert isinstance(gateway, dict) and gateway["OPENAI_API_KEY"]
            with httpx2.Client(timeout=10, trust_env=False) as http:
                answer = http.post(
                    f"{gateway['OPENAI_BASE_URL']}/chat/completions",
                    headers={"Authorization": f"Bearer {gateway['OPENAI_API_KEY']}"},
                    json={"model": "m", "messages": []},
                )
            assert answer.status_code == 401
            assert upstream.requests == []
            assert run.stop() == 0
    finally:
        upstream.close()


def test_an_orphan_nothing_names_lives_until_the_supervisor_stops(tmp_path: Path) -> None:
    """A helper that left the session and cleared its environment cannot be traced to its
    runtime once that runtime is gone: the supervisor keeps it (and logs what it writes)
    until it stops, then ends and reaps it."""
    with supervising(tmp_path, ORPHANING.format(mode="hidden-orphaning")) as run:
        run.wait_ready()
        first = first_exit(run)
        restarted(run, first["pid"])
        helper = first["helper"]
        assert isinstance(helper, int) and parent_pid(helper) == run.proc.pid  # adopted

        def ticks() -> int:
            return sum(1 for e in run.events("output") if e.get("line") == "tick")

        seen = ticks()
        wait_until(lambda: ticks() > seen + 5, 10, "its output to be logged still")
        began = time.monotonic()
        assert run.stop() == 0
        assert time.monotonic() - began < 2 + 3 + 2  # the runtime's, then the orphan's timeout
        assert not pid_alive(helper)
        assert any(e["pid"] == helper for e in run.events("orphan_reaped"))
