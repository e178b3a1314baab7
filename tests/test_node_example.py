"""The Node example (examples/node/, README "Other languages") against real sidecars: as the
README's `[[runtime]]` under `soma supervise`, reading its token from SOMA_TOKEN_FD, and beside
a standalone `soma sidecar`, reading the token file; with a handshake socket that answers
`retry` and then nothing before the real answer, and with a wrong token, which is final."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdk import protocol
from soma_runtime.config import load_config
from tests.helpers import REPO, SupervisorRun, child_env, npm_install, start_sidecar, wait_until
from tests.test_readme import CLAIMS, the

EXAMPLE = REPO / "examples" / "node"
ECHOED = [
    {"rpc": "Stimulate", "ok": True, "output": {"from": "node", "via": "Stimulate"}},
    {"rpc": "Stream", "ok": True, "output": {"from": "node", "via": "Stream"}},
]


@pytest.fixture(scope="module")
def client() -> Path:
    """examples/node/client.mjs beside its pinned packages, laid out as in the repository (the
    script in examples/node/, the proto it loads in proto/ two levels up)."""
    installed = npm_install(EXAMPLE)
    for source in (EXAMPLE / "client.mjs", REPO / "proto" / "soma" / "v1" / "sidecar.proto"):
        copy = installed / source.relative_to(REPO)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, copy)
    return installed / "examples" / "node" / "client.mjs"


def answers(stdout: str) -> list[dict[str, object]]:
    """The printed answers, without their latency."""
    lines = [json.loads(line) for line in stdout.splitlines()]
    for line in lines:
        assert isinstance(line.pop("latency_ms"), float)
    return lines


def run_client(client: Path, target: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(client), target],
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_readme_runtime_table_under_the_supervisor(tmp_path: Path, client: Path) -> None:
    """The README's `[[runtime]]` as written, started where the example sits (its `cwd`): the
    token comes from SOMA_TOKEN_FD, the rest from the environment."""
    table = the(CLAIMS["node_runtime"]).body
    root = client.parents[2]  # what the command's relative path is relative to
    run = SupervisorRun(tmp_path, f'{table}cwd = "{root}"\nrestart = "never"\n')
    try:
        run.wait_ready()
        exited = wait_until(
            lambda: [e for e in run.events("exited") if e.get("child") == "node-agent"],
            timeout=30,
            what="the Node runtime to finish",
        )
        printed = [e["line"] for e in run.events("output") if e.get("child") == "node-agent"]
        assert exited[0]["exit"] == "exit 0", printed
        assert answers("\n".join(printed)) == ECHOED
    finally:
        assert run.stop() == 0


def test_the_readme_command_names_the_socket_of_the_repository_s_config() -> None:
    """`node client.mjs "unix://$PWD/../../.soma/run/sidecar.sock"`, run in examples/node, is
    where `soma sidecar --config soma.toml` serves."""
    (line,) = [line for line in the("node client.mjs").body.splitlines() if "client.mjs" in line]
    (target,) = [w for w in shlex.split(line) if w.startswith("unix://")]
    path = Path(target.removeprefix("unix://").replace("$PWD", str(EXAMPLE))).resolve()
    config = load_config(REPO / "soma.toml")
    assert config.sidecar.socket is not None
    assert path == config.resolve(config.sidecar.socket)


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[str]:
    """A standalone `soma sidecar`; its target."""
    proc, target = start_sidecar(tmp_path, ["system"])
    try:
        yield target
    finally:
        assert proc.stop() == 0, proc.output()


def test_against_a_standalone_sidecar_with_its_token_file(sidecar: str, client: Path) -> None:
    result = run_client(client, sidecar)
    assert result.returncode == 0, result.stderr
    assert answers(result.stdout) == ECHOED


class Relay:
    """A handshake socket that answers the first connection `retry`, closes the second without
    an answer (what a sidecar that is stopping does), and relays the rest to the real one."""

    def __init__(self, path: Path, real: str) -> None:
        self.path, self.real = path, real
        self.connections = 0
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as reader:
                self.connections += 1
                line = reader.readline(protocol.MAX_HANDSHAKE_LINE)
                if self.connections == 1:
                    conn.sendall(b'{"ok": false, "error": "retry", "message": "registering"}\n')
                elif self.connections > 2:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as real:
                        real.connect(self.real)
                        real.sendall(line)
                        with real.makefile("rb") as answer:
                            conn.sendall(answer.readline(protocol.MAX_HANDSHAKE_LINE))

    def close(self) -> None:
        self._server.close()
        self._thread.join(5)


def test_asks_again_after_retry_and_after_no_answer(
    tmp_path: Path, sidecar: str, client: Path
) -> None:
    real = protocol.auth_socket_for(protocol.socket_path(sidecar) or "")
    relay = Relay(tmp_path / "relay.auth.sock", real)
    try:
        result = run_client(client, sidecar, SOMA_AUTH_SOCKET=str(relay.path))
    finally:
        relay.close()
    assert result.returncode == 0, result.stderr
    assert answers(result.stdout) == ECHOED
    assert relay.connections == 3


def test_a_wrong_token_is_final(tmp_path: Path, sidecar: str, client: Path) -> None:
    wrong = tmp_path / "wrong.token"
    wrong.write_text("0" * 64 + "\n")
    result = run_client(client, sidecar, SOMA_TOKEN_FILE=str(wrong))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "node client: handshake refused (unauthenticated): wrong token for this channel"
    )
    assert result.stdout == ""
