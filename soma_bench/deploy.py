"""The servers a bench run starts, each a real process: the baselines' server, a standalone
`soma sidecar`, and a whole `soma supervise` deployment whose runtimes are bench workers."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from soma_bench.measure import cpu_seconds
from soma_runtime.supervisor.control import fetch_status

T = TypeVar("T")
PYTHON = sys.executable
MEASURE_TIMEOUT = 1800  # seconds a worker may take for one group (a full run's largest is minutes)


class BenchError(RuntimeError):
    """A server did not start or a worker failed: the run stops with this message."""


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `predicate` until it returns something; `BenchError` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)
    return value


def settle(pid: int, timeout: float = 10.0) -> None:
    """Wait until a process that has just started is done with its start-up work (it used
    under 5% of a CPU over a quarter of a second), so that the first batches do not pay for
    it; after `timeout`, measure anyway."""
    task = Path(f"/proc/{pid}/task")
    deadline = time.monotonic() + timeout
    before = cpu_seconds(task)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu_seconds(task)
        if now - before < 0.0125:
            return
        before = now


class Server:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, argv: list[str], log: Path, stdin: str | None = None) -> None:
        self.log = log
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # the bench's supervisor is nobody's service
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check(self, what: str) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise BenchError(f"{what} exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_bare(directory: Path) -> tuple[Server, dict[str, Any]]:
    """The baselines' server (`soma_bench.bare`); returns it and its ready.json."""
    directory.mkdir(mode=0o700)
    server = Server([PYTHON, "-m", "soma_bench.bare", str(directory)], directory / "log")
    ready = directory / "ready.json"

    def up() -> bool:
        server.check("the bare server")
        return ready.exists()

    wait_for(up, 30, "the bare server")
    return server, json.loads(ready.read_text())


def start_sidecar(directory: Path) -> tuple[Server, str]:
    """`soma sidecar` on its own socket (system organ, logging at info); returns its target.
    It serves once it has written its token beside the socket."""
    directory.mkdir(mode=0o700)
    sock = directory / "run" / "sidecar.sock"
    config = directory / "soma.toml"
    config.write_text(
        f'[soma]\nstate_dir = "state"\nruntime_dir = "run"\n[logging]\nlevel = "info"\n'
        f'format = "json"\n[sidecar]\nsocket = "{sock}"\norgans = ["system"]\n'
    )
    argv = [PYTHON, "-m", "soma_cli", "sidecar", "--config", str(config)]
    server = Server(argv, directory / "log")

    def up() -> bool:
        server.check("the sidecar")
        return sock.exists() and sock.with_suffix(".token").exists()

    wait_for(up, 30, "the sidecar")
    settle(server.pid)
    return server, f"unix://{sock}"


SUPERVISED = """
[soma]
state_dir = "state"
runtime_dir = "run"

[logging]
level = "info"
format = "json"

[sidecar]
organs = ["system", "soma_bench.organ:BenchOrgan"]
max_connections = {max_connections}

[[credential]]
name = "bench"
hosts = ["{upstream}"]

[[gateway]]
name = "model"
upstream = "{upstream}/v1"
credential = "bench"
base_url_env = "BENCH_BASE_URL"
api_key_env = "BENCH_API_KEY"

[[runtime]]
name = "bench0"
command = {worker}
allow = ["system.echo", "bench.echo"]
credentials = ["bench"]
gateways = ["model"]
restart = "never"
"""

IDLE = """
[[runtime]]
name = "idle{n}"
command = {worker}
allow = ["system.echo"]
restart = "never"
"""


class Deployment:
    """`soma supervise` with `runtimes` bench workers (one measuring, the rest idle), the
    production configuration: sessions, allow-lists, validation, a credential from the vault,
    the gateway, JSON logs at info, the metrics endpoint."""

    def __init__(self, directory: Path, runtimes: int, upstream: str) -> None:
        directory.mkdir(mode=0o700)
        self.directory = directory
        self.control_path = directory / "control.sock"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.control_path))
        self._listener.listen(128)
        worker = [PYTHON, "-m", "soma_bench.worker", str(self.control_path)]
        body = SUPERVISED.format(
            upstream=upstream, worker=json.dumps(worker), max_connections=max(32, runtimes * 2)
        )
        body += "".join(
            IDLE.format(n=n, worker=json.dumps([*worker, "--idle"])) for n in range(1, runtimes)
        )
        config = directory / "soma.toml"
        # The Prometheus endpoint on, as in production.
        config.write_text(body + f'\n[metrics]\nlisten = "unix:{directory / "metrics.sock"}"\n')
        subprocess.run(
            [PYTHON, "-m", "soma_cli", "secrets", "set", "bench", "--config", str(config)],
            input=f"sk-bench-{secrets.token_hex(8)}\n",
            text=True,
            capture_output=True,
            check=True,
        )
        argv = [PYTHON, "-m", "soma_cli", "supervise", "--config", str(config)]
        self.supervisor = Server(argv, directory / "supervisor.log")
        self._workers: list[socket.socket] = []
        self._measuring: tuple[socket.socket, Any] | None = None
        self.sidecar_pid = 0
        try:
            self._accept(runtimes)
        except BaseException:
            self.stop()
            raise

    def _accept(self, runtimes: int) -> None:
        """Wait until every worker has made a call and said hello."""
        deadline = time.monotonic() + 60 + runtimes
        while len(self._workers) < runtimes:
            self.supervisor.check("soma supervise")
            self._listener.settimeout(max(0.1, min(1.0, deadline - time.monotonic())))
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{len(self._workers)} of {runtimes} runtimes connected in time; "
                        f"see {self.supervisor.log}"
                    ) from None
                continue
            conn.settimeout(max(1.0, deadline - time.monotonic()))
            reader = conn.makefile("r")
            try:
                hello = json.loads(reader.readline())
            except (TimeoutError, ValueError):
                conn.close()
                continue
            conn.settimeout(MEASURE_TIMEOUT)
            self._workers.append(conn)
            if not hello["idle"]:
                self._measuring = (conn, reader)
        status = fetch_status(self.directory / "run" / "supervisor.sock")
        self.sidecar_pid = next(c["pid"] for c in status["children"] if c["name"] == "sidecar")
        settle(self.sidecar_pid)
        settle(self.supervisor.pid)

    def measure(self, plan: dict[str, Any]) -> list[dict[str, Any]]:
        """Hand the measuring worker a plan; its results."""
        assert self._measuring is not None
        conn, reader = self._measuring
        conn.sendall(json.dumps(plan).encode() + b"\n")
        try:
            line = reader.readline()
        except TimeoutError:
            raise BenchError(f"the bench worker took over {MEASURE_TIMEOUT}s for a group") from None
        if not line:
            self.supervisor.check("soma supervise")
            raise BenchError(f"the bench worker went away; see {self.supervisor.log}")
        answer = json.loads(line)
        if "error" in answer:
            raise BenchError(f"the bench worker failed: {answer['error']}")
        return answer["results"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        for conn in self._workers:
            conn.close()
        self._listener.close()
        self.supervisor.stop()
