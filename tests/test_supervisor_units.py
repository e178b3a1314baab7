"""The supervisor's parts on their own: restart policy, notify, identities, status."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from soma_runtime import jsonline
from soma_runtime.config import ConfigError, RestartPolicy, load_config
from soma_runtime.supervisor.control import format_status
from soma_runtime.supervisor.identity import mint_identity
from soma_runtime.supervisor.notify import Notifier
from soma_runtime.supervisor.policy import backoff_delay, wants_restart
from soma_runtime.supervisor.reaper import describe_exit
from soma_runtime.unix import is_descendant, loopback_peer_uid, parent_pid
from tests.helpers import REPO, Process, wait_until


@pytest.mark.parametrize(
    ("policy", "code", "expected"),
    [
        ("always", 0, True),
        ("always", 1, True),
        ("on-failure", 0, False),
        ("on-failure", 2, True),
        ("on-failure", -9, True),
        ("never", 1, False),
    ],
)
def test_wants_restart(policy: str, code: int, expected: bool) -> None:
    assert wants_restart(RestartPolicy(restart=policy), code) is expected  # type: ignore[arg-type]


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    policy = RestartPolicy(backoff_initial=1.0, backoff_max=10.0)
    rng = random.Random(7)
    for attempt, step in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (9, 10.0)]:
        delays = [backoff_delay(policy, attempt, rng) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays)
        assert max(delays) - min(delays) > step / 4  # really jittered


def test_describe_exit() -> None:
    assert describe_exit(3) == "exit 3"
    assert describe_exit(-9) == "signal SIGKILL"


def test_notifier_reads_systemd_environment(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    watchdog = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000"})
    assert watchdog.enabled and watchdog.watchdog_interval == 2.0
    other = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # the watchdog is someone else's


def test_notifier_speaks_to_abstract_sockets() -> None:
    name = f"soma-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        Notifier({"NOTIFY_SOCKET": "@" + name}).send("READY=1", "STATUS=ok")
        assert receiver.recv(100) == b"READY=1\nSTATUS=ok"


def test_notifier_never_blocks_on_a_full_receiver(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        for _ in range(1000):  # far beyond the queue length; a blocking send would hang here
            notifier.send("STATUS=busy")
        received = 0
        receiver.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while receiver.recv(64) == b"STATUS=busy":
                received += 1
    assert 0 < received < 1000  # it sent until the queue was full, then dropped the rest


def test_identity_is_a_sealed_memfd_holding_the_token() -> None:
    identity = mint_identity()
    try:
        token = os.pread(identity.token_fd, 100, 0).decode()
        assert len(token) == 64 and int(token, 16) >= 0
        assert hashlib.sha256(token.encode()).hexdigest() == identity.digest
        assert not os.get_inheritable(identity.token_fd)
        seals = fcntl.fcntl(identity.token_fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.pwrite(identity.token_fd, b"x", 0)
        assert mint_identity().digest != identity.digest
    finally:
        os.close(identity.token_fd)


def test_process_ancestry() -> None:
    assert parent_pid(os.getpid()) == os.getppid()
    assert is_descendant(os.getpid(), os.getpid())
    assert is_descendant(os.getpid(), os.getppid())
    child = subprocess.Popen(["sleep", "5"])
    try:
        assert is_descendant(child.pid, os.getpid())
        assert not is_descendant(os.getpid(), child.pid)
    finally:
        child.kill()
        child.wait()
    assert parent_pid(child.pid) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '[[runtime]]\nname = "Bad Name"\ncommand = ["x"]\n',
            "runtime[0].name: String should match",
        ),
        (
            '[[runtime]]\nname = "a"\ncommand = []\n',
            "runtime[0].command: List should have at least 1",
        ),
        ('[[runtime]]\nname = "a"\n', "runtime[0].command: Field required"),
        ('[[runtime]]\nname = "a"\ncommand = ["x"]\nrestart = "sometimes"\n', "runtime[0].restart"),
        (
            '[[runtime]]\nname = "a"\ncommand = ["x"]\nshell = true\n',
            "runtime[0].shell: unknown key",
        ),
        (
            '[[runtime]]\nname = "a"\ncommand = ["x"]\n[[runtime]]\nname = "a"\ncommand = ["y"]\n',
            "runtime[1].name: 'a' is used twice",
        ),
        ('[[runtime]]\nname = "a"\ncommand = ["x"]\nenv = { X = 1 }\n', "runtime[0].env.X"),
    ],
)
def test_runtime_config_errors_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "soma.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_status_table() -> None:
    table = format_status(
        {
            "children": [
                {
                    "name": "sidecar",
                    "kind": "sidecar",
                    "state": "running",
                    "pid": 10,
                    "uptime_s": 3725.0,
                    "restarts": 1,
                    "last_exit": "signal SIGKILL",
                },
                {
                    "name": "claims",
                    "kind": "runtime",
                    "state": "fatal",
                    "pid": None,
                    "uptime_s": None,
                    "restarts": 5,
                    "last_exit": "exit 3",
                },
            ]
        }
    )
    lines = table.splitlines()
    assert lines[1].split() == [
        "sidecar",
        "sidecar",
        "running",
        "10",
        "1h02m",
        "1",
        "signal",
        "SIGKILL",
    ]
    assert lines[2].split() == ["claims", "runtime", "fatal", "-", "-", "5", "exit", "3"]


def supervised_sidecar(tmp_path: Path) -> tuple[Process, Path]:
    """A `soma sidecar --supervised` whose parent is this test, so the test may use its admin
    socket as a supervisor does; the process and that socket, once it is there."""
    config = tmp_path / "soma.toml"
    config.write_text('[soma]\nruntime_dir = "run"\nstate_dir = "state"\n')
    sidecar = Process(
        [
            str(Path(sys.executable)),
            "-m",
            "soma_cli",
            "sidecar",
            "--supervised",
            "--config",
            str(config),
        ],
        tmp_path / "sidecar.log",
    )
    admin = tmp_path / "run" / "admin.sock"
    wait_until(admin.exists, 20, "the admin socket")
    return sidecar, admin


async def test_the_sidecar_admin_socket_refuses_anyone_but_its_supervisor(tmp_path: Path) -> None:
    """A supervised sidecar started by this test (so its parent is the test) refuses another
    process of the same user: only the parent pid may use the admin socket."""
    sidecar, admin = supervised_sidecar(tmp_path)
    try:
        assert (await jsonline.request(admin, {"op": "ping"}))["ok"] is True  # the parent
        stranger = subprocess.run(  # noqa: ASYNC221 - the loop has nothing else to do
            [
                sys.executable,
                "-c",
                "import json, sys; from soma_runtime import jsonline; from pathlib import Path;"
                f"print(json.dumps(jsonline.request_sync(Path({str(admin)!r}), {{'op': 'ping'}})))",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        answer = json.loads(stranger.stdout)
        assert answer["error"] == "refused" and "is not the supervisor" in answer["message"]
        bad = await jsonline.request(admin, {"op": "register", "runtime": "../etc"})
        assert bad["ok"] is False and "runtime" in bad["message"]
    finally:
        assert sidecar.stop() == 0


async def test_registering_the_same_identity_again_keeps_its_sessions(tmp_path: Path) -> None:
    """The supervisor resends a registration the sidecar was slow to answer: the runtime's
    sessions survive it. A new token (a restarted runtime) ends them."""
    import asyncio

    from sdk import _auth

    sidecar, admin = supervised_sidecar(tmp_path)

    def register(token: str) -> jsonline.Message:
        digest = hashlib.sha256(token.encode()).hexdigest()
        message = {"op": "register", "runtime": "x", "token_sha256": digest, "pid": os.getpid()}
        return jsonline.request_sync(admin, message)

    def sessions() -> int:
        status = jsonline.request_sync(admin, {"op": "status"})
        return int(next(c["sessions"] for c in status["channels"] if c["runtime"] == "x"))

    try:
        token = "a" * 64
        assert register(token)["ok"]
        auth = tmp_path / "run" / "rt" / "x.auth.sock"
        await asyncio.to_thread(_auth.handshake, str(auth), token, None)
        assert sessions() == 1
        assert register(token)["ok"]  # the same registration again
        assert sessions() == 1
        assert register("b" * 64)["ok"]  # a new identity
        assert sessions() == 0
    finally:
        assert sidecar.stop() == 0


def test_loopback_peer_uid_names_the_client_sockets_owner() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()):
            conn, (_, client_port) = server.accept()
            with conn:
                assert loopback_peer_uid(client_port, server.getsockname()[1]) == os.geteuid()
        assert loopback_peer_uid(1, 2) is None  # no such connection


def test_a_childs_json_log_line_cannot_impersonate_or_break_the_pump(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from soma_runtime.supervisor.process import _log_line
    from tests.test_child_log_lines import logging_to

    out = logging_to("json", monkeypatch)  # a fresh logger: structlog caches the first one
    _log_line("claims", "stderr", '{"event": "hello", "child": "sidecar", "self": 1, "x": 2}')
    record = json.loads(out.getvalue())
    assert record["child"] == "claims" and record["child_child"] == "sidecar"
    assert record["event"] == "hello" and record["x"] == 2
