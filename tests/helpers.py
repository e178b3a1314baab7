"""Shared test helpers: real processes, real sockets, waiting on real conditions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

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


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def start_sidecar(tmp: Path, organs: list[str], extra: str = "") -> tuple[Process, str]:
    """`soma sidecar` on a socket in `tmp`, started and serving; returns it and its target."""
    socket_path = tmp / "run" / "sidecar.sock"
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
