"""Hostile lines on the line-protocol sockets (the handshake sockets, the sidecar's admin
socket, the supervisor's status socket): each gets an error answer, and the server keeps
serving. In process, and on the real sockets of running processes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import sdk
from soma_runtime import jsonline
from soma_runtime.unix import Peer
from tests.helpers import Process, SupervisorRun, start_sidecar, wait_until

# Each fits in one line (MAX_LINE); the first is the one that used to kill the connection.
HOSTILE = {
    b"[" * 60_000: "nests deeper than the limit",
    b'{"op": NaN}': "not valid JSON: NaN, Infinity and -Infinity",
    b'{"op": "ping", "n": 1e400}': "beyond the range of a 64-bit float",
    b'{"op": "ping", "n": -Infinity}': "not valid JSON: NaN, Infinity and -Infinity",
    b'{"op": "ping"': "not valid JSON",
}


async def exchange(path: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    """Send each line on one connection and read its answer (itself strict JSON)."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=jsonline.MAX_LINE)
    answers = []
    try:
        for line in lines:
            writer.write(line + b"\n")
            await writer.drain()
            async with asyncio.timeout(10):
                answer = await reader.readline()
            assert answer, f"the connection closed instead of answering {line[:20]!r}"
            answers.append(jsonline.decode(answer))
    finally:
        writer.close()
    return answers


async def assert_refused_one_by_one(path: Path) -> None:
    answers = await exchange(path, list(HOSTILE))
    for answer, reason in zip(answers, HOSTILE.values(), strict=True):
        assert answer["ok"] is False and answer["error"] == "bad_request", answer
        assert reason in answer["message"]


async def test_hostile_lines_get_error_answers_and_the_server_keeps_serving(
    tmp_path: Path,
) -> None:
    async def echo(message: jsonline.Message, peer: Peer) -> jsonline.Message:
        return {"ok": True, "echo": message}

    path = tmp_path / "run" / "echo.sock"
    server = await jsonline.serve(path, echo, lambda peer: None)
    try:
        await assert_refused_one_by_one(path)
        # the same connection, after every hostile line, and a new one, are still answered
        *_, answer = await exchange(path, [*HOSTILE, b'{"op": "ping"}'])
        assert answer == {"ok": True, "echo": {"op": "ping"}}
    finally:
        server.close()
        await server.wait_closed()


async def test_the_handshake_socket_answers_hostile_lines(tmp_path: Path) -> None:
    proc, target = start_sidecar(tmp_path, ["system"])
    try:
        await assert_refused_one_by_one(tmp_path / "run" / "sidecar.auth.sock")
        async with sdk.AsyncClient(target) as client:  # a handshake still gets its session
            assert await client.call("system.echo", {"still": "serving"}) == {"still": "serving"}
    finally:
        assert proc.stop() == 0


async def test_the_admin_socket_answers_hostile_lines(tmp_path: Path) -> None:
    """Only the sidecar's parent may use its admin socket: this test starts it."""
    config = tmp_path / "soma.toml"
    config.write_text('[soma]\nruntime_dir = "run"\nstate_dir = "state"\n')
    argv = [sys.executable, "-m", "soma_cli", "sidecar", "--supervised", "--config", str(config)]
    sidecar = Process(argv, tmp_path / "sidecar.log")
    admin = tmp_path / "run" / "admin.sock"
    try:
        wait_until(lambda: '"event": "serving"' in sidecar.output(), 20, "the sidecar to serve")
        await assert_refused_one_by_one(admin)
        assert (await jsonline.request(admin, {"op": "ping"}))["ok"] is True
    finally:
        assert sidecar.stop() == 0


async def test_the_supervisor_socket_answers_hostile_lines(tmp_path: Path) -> None:
    run = SupervisorRun(tmp_path, "")
    try:
        run.wait_ready()
        await assert_refused_one_by_one(run.run_dir / "supervisor.sock")
        status = await jsonline.request(run.run_dir / "supervisor.sock", {"op": "status"})
        assert [c["name"] for c in status["children"]] == ["sidecar"]
    finally:
        assert run.stop() == 0
    assert "RecursionError" not in run.proc.output()
