"""What one runtime's socket receives never stops that channel for good, nor touches another.

Attacks come from this test process: the same user as the sidecar, like another runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from sdk import protocol
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from sidecar.access import AllowList
from sidecar.channels import socket_paths
from sidecar.server import OUTSIDER_MAX_CONNECTIONS
from sidecar.sweep import close_foreign_connections
from soma_runtime.jsonline import HANDSHAKE_MAX_CONNECTIONS
from tests.attack import h2
from tests.helpers import (
    Process,
    SupervisorRun,
    channel_registry,
    health_status,
    read_report,
    session_metadata,
    wait_async,
    wait_until,
)

# Not UTF-8: grpcio 1.85 decodes the path in its server's main loop, and this ends that loop.
BAD_PATH = b"/soma.v1.Sidecar/\xff\xfe"

TWO_RUNTIMES = """
[[runtime]]
name = "alpha"
command = ["python", "-m", "tests.fixtures.agents", "probe", "alpha.jsonl"]
allow = ["system.*", "acme.greet"]

[[runtime]]
name = "beta"
command = ["python", "-m", "tests.fixtures.agents", "probe", "beta.jsonl"]
allow = ["system.*", "acme.greet"]
"""


def echo_ok(target: str, metadata: tuple[tuple[str, str], ...]) -> bool:
    """One `system.echo` over a new connection with a short deadline."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = pb_grpc.SidecarStub(channel).Stimulate(
                pb.StimulateRequest(op="system.echo", input_json=b'{"n":1}'),
                metadata=metadata,
                timeout=1.0,
            )
        except grpc.RpcError:
            return False
    return reply.ok


def socket_of(target: str) -> str:
    path = protocol.socket_path(target)
    assert path is not None
    return path


def test_a_path_that_is_not_utf8_does_not_stop_the_channel(
    sidecar: tuple[Process, str],
) -> None:
    proc, target = sidecar
    metadata = session_metadata(target)
    assert echo_ok(target, metadata)

    h2.exchange(socket_of(target), h2.connection_start() + h2.grpc_request(BAD_PATH, b""))

    # The same session works on the server that replaced the crashed one.
    wait_until(lambda: echo_ok(target, metadata), timeout=10, what="the channel to serve again")
    assert "channel_server_revived" in proc.output()
    assert health_status(target) == "SERVING"


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SupervisorRun]:
    tmp = tmp_path_factory.mktemp("two")
    run = SupervisorRun(tmp, TWO_RUNTIMES, sidecar="liveness_interval = 0.2")
    run.wait_ready()
    wait_until(
        lambda: all(
            any(r.get("ready") for r in read_report(tmp / f"{n}.jsonl")) for n in ("alpha", "beta")
        ),
        what="both runtimes to report",
    )
    yield run
    assert run.stop() == 0, run.proc.output()


def test_a_crashed_channel_is_replaced_and_its_neighbour_never_notices(
    two: SupervisorRun,
) -> None:
    alpha = f"unix://{two.run_dir / 'rt' / 'alpha.sock'}"
    beta = f"unix://{two.run_dir / 'rt' / 'beta.sock'}"
    for _ in range(5):
        attack = h2.connection_start() + h2.grpc_request(BAD_PATH, b"")
        h2.exchange(socket_of(alpha), attack, timeout=0.2)
        # At once, every time: never polled for (the timeout only tolerates a busy machine;
        # a beta hit by alpha's crash would fail or refuse, not be slow).
        assert health_status(beta, timeout=5.0) == "SERVING"
    wait_until(lambda: health_status(alpha) == "SERVING", timeout=10, what="alpha to serve")
    revived = [e for e in two.events("channel_server_revived") if e.get("runtime") == "alpha"]
    assert revived
    assert not [e for e in two.events("channel_server_revived") if e.get("runtime") == "beta"]
    assert two.child("alpha")["state"] == "running"


def sidecar_fds(run: SupervisorRun) -> int:
    pid = run.child("sidecar")["pid"]
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_one_peer_cannot_hold_more_than_a_socket_s_share_of_descriptors(
    two: SupervisorRun,
) -> None:
    alpha = two.run_dir / "rt" / "alpha.sock"
    alpha_auth = two.run_dir / "rt" / "alpha.auth.sock"
    before = sidecar_fds(two)
    held = []
    try:
        for path in (alpha, alpha_auth):
            for _ in range(200):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                held.append(sock)
                sock.connect(str(path))
        # From outside the runtime's tree: 8 on the gRPC socket (its outsider server's cap),
        # none on the handshake socket (turned away at once); a little room for the watcher's
        # own probes.
        wait_until(
            lambda: sidecar_fds(two) <= before + OUTSIDER_MAX_CONNECTIONS + 4,
            timeout=10,
            what="connections over the caps to be closed",
        )
        # The other runtime's channel, handshake socket included, is untouched.
        assert health_status(f"unix://{two.run_dir / 'rt' / 'beta.sock'}") == "SERVING"
        assert refusal(two.run_dir / "rt" / "beta.auth.sock")["error"] == "refused"
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: sidecar_fds(two) <= before + 4, timeout=10, what="descriptors released")


def refusal(auth: Path) -> dict[str, str]:
    """What a supervised runtime's handshake socket answers a process outside its tree."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(auth))
        answer: dict[str, str] = json.loads(sock.makefile("rb").readline())
    return answer


def test_runtime_tree_gate_refuses_other_processes_at_connect(two: SupervisorRun) -> None:
    answer = refusal(two.run_dir / "rt" / "alpha.auth.sock")
    assert answer["error"] == "refused"
    assert "not the runtime's process" in answer["message"]


def test_a_hung_sidecar_is_restarted_by_the_liveness_check(tmp_path: Path) -> None:
    run = SupervisorRun(
        tmp_path,
        TWO_RUNTIMES,
        sidecar="liveness_interval = 0.2\nliveness_failures = 2\nstop_timeout = 1.0",
    )
    try:
        run.wait_ready()
        hung = run.child("sidecar")["pid"]
        os.kill(hung, signal.SIGSTOP)
        wait_until(
            lambda: (
                (c := run.child("sidecar"))["pid"] not in (hung, None) and c["state"] == "running"
            ),
            timeout=30,
            what="a new sidecar",
        )
        assert run.events("sidecar_unresponsive")
        beta = f"unix://{run.run_dir / 'rt' / 'beta.sock'}"
        wait_until(lambda: health_status(beta) == "SERVING", timeout=10, what="beta again")
    finally:
        assert run.stop() == 0, run.proc.output()


def closed_by_peer(socks: list[socket.socket]) -> int:
    """How many of `socks` the other end has closed (reading, without blocking, whatever
    the server wrote first)."""

    def closed(sock: socket.socket) -> bool:
        try:
            while sock.recv(65536, socket.MSG_DONTWAIT):
                pass
        except BlockingIOError:
            return False
        except ConnectionError:
            return True
        return True

    return sum(closed(sock) for sock in socks)


def test_handshake_socket_caps_its_connections(sidecar: tuple[Process, str]) -> None:
    _, target = sidecar
    auth = protocol.auth_socket_for(socket_of(target))
    held = []
    try:
        for _ in range(HANDSHAKE_MAX_CONNECTIONS * 3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(sock)
            sock.connect(auth)
        # Those over the cap are closed by the server as soon as they are accepted.
        wait_until(
            lambda: closed_by_peer(held) >= HANDSHAKE_MAX_CONNECTIONS * 2,
            timeout=10,
            what="connections over the cap to be closed",
        )
    finally:
        for sock in held:
            sock.close()
    # Those it held are still answered once the flood is over.
    assert echo_ok(target, session_metadata(target))


SQUATTER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.sendall(bytes.fromhex(sys.argv[2]))
print("connected", flush=True)
while sock.recv(65536):
    pass
print("closed", flush=True)
"""


async def test_connections_made_before_the_runtime_s_pid_was_known_are_shut_down_when_it_is(
    tmp_path: Path,
) -> None:
    """A runtime is registered before it starts (handshakes are answered "retry"), and any
    process of the user may connect meanwhile. Once its pid is known, a connection from
    outside its tree is shut down at once, before a session of the runtime can exist."""
    directory = tmp_path / "rt"
    directory.mkdir(mode=0o700)
    grpc_path, auth_path = socket_paths(directory, "alpha")
    async with channel_registry(tmp_path) as registry:
        channel = await registry.open("alpha", grpc_path, auth_path, AllowList(["*"]))
        channel.identify(b"t" * 32, None, True, None)
        squatter = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SQUATTER,
            str(grpc_path),
            h2.connection_start().hex(),
            stdout=asyncio.subprocess.PIPE,
        )
        runtime = await asyncio.create_subprocess_exec("sleep", "60")
        try:
            assert squatter.stdout is not None
            assert await squatter.stdout.readline() == b"connected\n"
            await wait_async(lambda: len(connections_to(grpc_path)) == 1, "the connection")
            channel.identify(b"t" * 32, runtime.pid, False, None)
            async with asyncio.timeout(10):
                assert await squatter.stdout.readline() == b"closed\n"
        finally:
            for process in (squatter, runtime):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


async def test_the_sweep_at_a_new_pid_does_not_hold_the_event_loop(tmp_path: Path) -> None:
    """Finding the connections to shut down reads every descriptor of the sidecar (about
    10 µs each): a runtime that restarts in a loop must not stall every channel that long at
    each restart. Registering the new pid returns at once; the sweep still happens."""
    directory = tmp_path / "rt"
    directory.mkdir(mode=0o700)
    grpc_path, auth_path = socket_paths(directory, "alpha")
    held = [socket.socketpair() for _ in range(3000)]  # a busy sidecar's descriptors
    async with channel_registry(tmp_path) as registry:
        channel = await registry.open("alpha", grpc_path, auth_path, AllowList(["*"]))
        channel.identify(b"t" * 32, None, True, None)
        squatter = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SQUATTER,
            str(grpc_path),
            h2.connection_start().hex(),
            stdout=asyncio.subprocess.PIPE,
        )
        runtime = await asyncio.create_subprocess_exec("sleep", "60")
        try:
            assert squatter.stdout is not None
            assert await squatter.stdout.readline() == b"connected\n"
            await wait_async(lambda: len(connections_to(grpc_path)) == 1, "the connection")
            started = time.perf_counter()
            close_foreign_connections({})  # the baseline: one scan of these descriptors
            scan = time.perf_counter() - started
            started = time.perf_counter()
            channel.identify(b"t" * 32, runtime.pid, False, None)
            on_the_loop = time.perf_counter() - started
            print(f"scan {scan * 1e3:.1f} ms, registering the pid {on_the_loop * 1e3:.3f} ms")
            assert on_the_loop < scan / 10
            async with asyncio.timeout(10):
                assert await squatter.stdout.readline() == b"closed\n"
        finally:
            for process in (squatter, runtime):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            for pair in held:
                for end in pair:
                    end.close()


# A process may name itself anything (prctl PR_SET_NAME, or the file it runs): /proc shows
# these bytes as its name.
NOT_UTF8_NAME = """
import ctypes
ctypes.CDLL(None).prctl(15, b"soma\\xff\\xfe", 0, 0, 0)
"""


async def test_a_peer_whose_name_is_not_utf8_does_not_stop_the_socket_accepting(
    tmp_path: Path,
) -> None:
    """The gate reads a peer's process from /proc, where its name is whatever bytes it chose:
    a process of the user named in bytes that are not UTF-8 connects (and is turned away to
    the outsider server), and the socket goes on accepting: the next connection is served."""
    directory = tmp_path / "rt"
    directory.mkdir(mode=0o700)
    grpc_path, auth_path = socket_paths(directory, "alpha")
    async with channel_registry(tmp_path) as registry:
        channel = await registry.open("alpha", grpc_path, auth_path, AllowList(["*"]))
        runtime = await asyncio.create_subprocess_exec("sleep", "60")
        channel.identify(b"t" * 32, runtime.pid, False, None)
        squatter = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            NOT_UTF8_NAME + SQUATTER,
            str(grpc_path),
            h2.connection_start().hex(),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert squatter.stdout is not None
            assert await squatter.stdout.readline() == b"connected\n"
            # Its connection waits in the backlog before the probe's: accepted first.
            assert await registry.probe() == {"alpha": "ok"}
        finally:
            for process in (squatter, runtime):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


def connections_to(path: Path) -> set[str]:
    """The inodes of this process's accepted connections on the socket at `path`."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    fields = [line.split() for line in lines]
    return {f[6] for f in fields if len(f) == 8 and f[7] == str(path) and f[5] == "03"}


async def test_the_liveness_probe_keeps_its_connection_and_still_sees_a_socket_go(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "rt"
    directory.mkdir(mode=0o700)
    grpc_path, auth_path = socket_paths(directory, "alpha")
    async with channel_registry(tmp_path) as registry:
        await registry.open("alpha", grpc_path, auth_path, AllowList(["*"]))
        assert await registry.probe() == {"alpha": "ok"}
        first = connections_to(grpc_path)
        assert len(first) == 1
        assert await registry.probe() == {"alpha": "ok"}
        assert connections_to(grpc_path) == first  # the same connection, not a new one
        moved = directory / "moved.sock"
        grpc_path.rename(moved)  # no runtime could connect now
        assert await registry.probe() == {"alpha": "unresponsive"}
        moved.rename(grpc_path)
        assert await registry.probe() == {"alpha": "ok"}
