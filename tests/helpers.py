"""Shared test helpers: real processes, real sockets, waiting on real conditions."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdk import _auth, protocol

if TYPE_CHECKING:
    from sidecar.channels import ChannelRegistry

REPO = Path(__file__).resolve().parent.parent
SOMA = str(Path(sys.executable).parent / "soma")
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


async def wait_async(
    predicate: Callable[[], object], what: str = "condition", timeout: float = 10.0
) -> None:
    """`wait_until` inside a coroutine: the event loop (a sidecar's, in-process) keeps running
    while it polls."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def health_status(target: str, service: str = "", timeout: float = 1.0) -> str | None:
    """The health service's answer for `service`, None when the server does not answer."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def child_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: this interpreter's tools first, tests importable."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


class Process:
    """A child process whose stderr goes to a file the test can read."""

    def __init__(
        self,
        argv: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        **popen: Any,
    ) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env or child_env(),
            cwd=cwd or REPO,
            **popen,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process did not exit in {timeout}s:\n{self.output()}") from None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def session_metadata(target: str, token: str | None = None) -> tuple[tuple[str, str], ...]:
    """`authorization` metadata for raw gRPC calls, from a handshake with `token` (default:
    the token file a standalone sidecar writes beside its socket)."""
    path = protocol.socket_path(target)
    assert path is not None
    if token is None:
        token = _auth.read_token_file(protocol.token_file_for(path))
    session = _auth.handshake(protocol.auth_socket_for(path), token, time.monotonic() + 10)
    return (("authorization", f"Bearer {session}"),)


def run_soma(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `soma ARGS` from the repository root to completion."""
    return subprocess.run(
        [SOMA, *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def set_secret(config: Path, name: str, value: str) -> None:
    """`soma secrets set NAME` with the value on stdin, as an operator would."""
    result = subprocess.run(
        [SOMA, "secrets", "set", name, "--config", str(config)],
        input=value + "\n",
        text=True,
        capture_output=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert value not in result.stdout + result.stderr


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def start_sidecar(
    tmp: Path, organs: list[str], extra: str = "", socket: Path | None = None
) -> tuple[Process, str]:
    """`soma sidecar` on a socket in `tmp` (or at `socket`), started and serving; returns it
    and its target."""
    socket_path = socket or tmp / "run" / "sidecar.sock"
    listed = ", ".join(f'"{o}"' for o in organs)
    config = write_config(
        tmp / "soma.toml",
        f"""
[soma]
state_dir = "state"
runtime_dir = "run"

[sidecar]
socket = "{socket_path}"
organs = [{listed}]
{extra}
""",
    )
    proc = Process([SOMA, "sidecar", "--config", str(config)], tmp / "sidecar.log")
    target = f"unix://{socket_path}"
    try:
        wait_until(
            lambda: proc.proc.poll() is not None or health_status(target) == "SERVING",
            timeout=20,
            what="the sidecar to serve",
        )
    except AssertionError:
        proc.kill()
        raise
    if proc.proc.poll() is not None:
        raise AssertionError(f"sidecar exited with {proc.proc.returncode}:\n{proc.output()}")
    return proc, target


class NotifySocket:
    """A NOTIFY_SOCKET the test owns: a thread reads what `soma supervise` tells "systemd",
    as promptly as systemd would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self.messages: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                self.messages.append(self._sock.recv(4096).decode())
            except OSError:
                return

    def drain(self) -> list[str]:
        return list(self.messages)

    def has(self, line: str) -> bool:
        return any(line in message.splitlines() for message in self.drain())

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._reader.join(5)


TEST_ORGANS = ("system", "tests.fixtures.organs:Acme")


class SupervisorRun:
    """`soma supervise` on a config in `tmp`, with a notify socket; stopped at the end."""

    def __init__(
        self,
        tmp: Path,
        body: str,
        watchdog_usec: int | None = None,
        organs: tuple[str, ...] = TEST_ORGANS,
        sidecar: str = "",
        logging: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        """`env`: more environment variables for the supervisor (and so its children)."""
        self.tmp = tmp
        self.config = self.write(tmp, body, organs, sidecar, logging)
        self.notify = NotifySocket(tmp / "notify.sock")
        extra = {**(env or {}), "NOTIFY_SOCKET": str(self.notify.path)}
        if watchdog_usec is not None:
            extra["WATCHDOG_USEC"] = str(watchdog_usec)
        env = child_env(**extra)
        self.proc = Process(
            [SOMA, "supervise", "--config", str(self.config)], tmp / "supervisor.log", env=env
        )

    @staticmethod
    def write(
        tmp: Path,
        body: str,
        organs: tuple[str, ...] = ("system",),
        sidecar: str = "",
        logging: str = "",
    ) -> Path:
        """The configuration file a run uses (written before the run, for the CLI);
        `sidecar` and `logging` hold more keys of the `[sidecar]` and `[logging]` tables."""
        listed = ", ".join(f'"{o}"' for o in organs)
        head = CONFIG_HEAD.format(organs=listed, logging=logging) + sidecar + "\n"
        return write_config(tmp / "soma.toml", head + body)

    @property
    def run_dir(self) -> Path:
        return self.tmp / "run"

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(
            lambda: self.notify.has("READY=1") or self.proc.proc.poll() is not None,
            timeout,
            "READY=1",
        )
        assert self.proc.proc.poll() is None, self.proc.output()

    def status(self) -> dict[str, Any]:
        result = run_soma("status", "--json", "--config", str(self.config))
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def child(self, name: str) -> dict[str, Any]:
        return next(c for c in self.status()["children"] if c["name"] == name)

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.proc.output().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (event is None or record.get("event") == event):
                out.append(record)
        return out

    def stop(self) -> int:
        code = self.proc.stop(timeout=30)
        self.notify.close()
        return code


CONFIG_HEAD = """
[soma]
state_dir = "state"
runtime_dir = "run"

[logging]
format = "json"
{logging}
[sidecar]
organs = [{organs}]
backoff_initial = 0.05
backoff_max = 0.5
"""


def read_report(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def process_environ(pid: int) -> dict[str, str]:
    """A process's environment, as /proc shows it to the same user."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)
    return dict(pairs)  # type: ignore[arg-type]


def runtime_token(pid: int) -> str:
    """What a same-uid attacker can do: read a runtime's token through /proc/<pid>/fd."""
    fd = process_environ(pid)["SOMA_TOKEN_FD"]
    return Path(f"/proc/{pid}/fd/{fd}").read_text()


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line[stat_line.rindex(")") + 2] != "Z"


def zombie_children(parent: int) -> list[int]:
    zombies = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat_line[stat_line.rindex(")") + 2 :].split()
        if fields[0] == "Z" and int(fields[1]) == parent:
            zombies.append(int(entry.name))
    return zombies


def records(state: Path) -> list[str]:
    """The ids the test organ's `acme.record` wrote under `state`, in order."""
    path = state / "acme-records.txt"
    return path.read_text().split() if path.exists() else []


def evict_sessions(target: str) -> None:
    """Revoke every session a standalone sidecar's channel has: it keeps only its newest
    `MAX_SESSIONS`, so that many more handshakes push the older ones out."""
    from sidecar.access import MAX_SESSIONS

    path = protocol.socket_path(target)
    assert path is not None
    token = _auth.read_token_file(protocol.token_file_for(path))
    for _ in range(MAX_SESSIONS):
        _auth.handshake(protocol.auth_socket_for(path), token, None)


def npm_install(package: Path) -> Path:
    """`package`'s npm dependencies (its package.json, and package-lock.json when it has one,
    then installed with `npm ci`), installed once into .soma/npm/<digest of those files>: a new
    pin installs afresh. The directory, with its node_modules; skips when node or npm is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for this client (not installed)")
    manifests = [package / "package.json", package / "package-lock.json"]
    manifests = [m for m in manifests if m.exists()]
    digest = hashlib.sha256(b"".join(m.read_bytes() for m in manifests)).hexdigest()[:16]
    directory = REPO / ".soma" / "npm" / digest
    done = directory / ".installed"
    if not done.exists():
        directory.mkdir(parents=True, exist_ok=True)
        for manifest in manifests:
            shutil.copy(manifest, directory / manifest.name)
        command = "ci" if len(manifests) == 2 else "install"
        subprocess.run(
            [npm, command, "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=directory,
            check=True,
            timeout=300,
        )
        done.touch()
    return directory


@contextlib.asynccontextmanager
async def channel_registry(tmp: Path) -> AsyncIterator[ChannelRegistry]:
    """A sidecar's channel registry in this process (the system organ, a vault under `tmp`)
    for tests that open channels themselves; every channel is closed at the end."""
    from sidecar.channels import ChannelRegistry
    from sidecar.credentials import CredentialBroker
    from sidecar.organs.system import SystemOrgan
    from sidecar.vault.async_vault import AsyncVault
    from sidecar.vault.open import open_vault
    from soma_runtime import Executive
    from soma_runtime.config import parse_config

    config = parse_config({"soma": {"state_dir": str(tmp / "state")}}, tmp / "x.toml")
    vault = AsyncVault(lambda: open_vault(config, durable=False))
    registry = ChannelRegistry(
        Executive([SystemOrgan()]), config.sidecar, CredentialBroker([], vault), None
    )
    try:
        yield registry
    finally:
        await registry.close_all(0)
        await vault.close()
