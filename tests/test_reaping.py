"""A child's exit is seen the moment it happens, and stopping it ends everything it started:
real processes started by `ChildProcess` in this test's own event loop."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from pathlib import Path

from soma_runtime.supervisor.process import ChildProcess, Command
from soma_runtime.supervisor.proctree import snapshot, subtree
from tests.helpers import child_env, pid_alive, wait_until

# A helper in a new session (setsid): out of the child's process group, holding its pipes.
SETSID_HELPER = (
    "import subprocess, sys\n"
    "helper = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
    "print(helper.pid, flush=True)\n"
)


def command(*argv: str) -> Command:
    return Command(list(argv), child_env(), Path.cwd())


async def spawn(*argv: str) -> ChildProcess:
    return await ChildProcess.spawn("test", command(*argv))


def open_fds() -> int:
    # Garbage of earlier tests (event loops, transports) closes its descriptors when collected,
    # which 3.13 does at other moments than 3.11: collect first, so only ours are counted.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


async def test_the_exit_is_seen_while_a_helper_holds_the_pipes() -> None:
    child = await spawn("sh", "-c", "sleep 30 & exit 3")
    try:
        async with asyncio.timeout(2):
            assert await child.wait() == 3
        assert child.returncode == 3
        # the helper is still there, and still counted as the child's (its session)
        helpers = [p.pid for p in child.members()]
        assert len(helpers) == 1 and pid_alive(helpers[0])
        await child.stop(1.0)
        assert not pid_alive(helpers[0])
    finally:
        await child.stop(0)
        await child.close()


async def test_stop_ends_a_setsid_helper_and_is_bounded() -> None:
    """The child ignores SIGTERM; its helper left the process group and holds the pipes."""
    program = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    program += SETSID_HELPER + "time.sleep(60)\n"
    child = await spawn(sys.executable, "-c", program)
    try:
        members = wait_until(lambda: len(child.members()) == 2 and child.members())
        helper = next(p for p in members if p.pid != child.pid)
        assert helper.sid == helper.pid != child.pid  # a session of its own
        began = time.monotonic()
        async with asyncio.timeout(5):
            await child.stop(0.5)
        assert time.monotonic() - began < 3.0
        assert child.returncode == -9  # it ignored SIGTERM
        assert not pid_alive(helper.pid)
    finally:
        await child.stop(0)
        await child.close()


async def test_stop_reaches_what_the_helpers_forked() -> None:
    """A helper's own children are the child's too, however deep, in whatever session."""
    child = await spawn("sh", "-c", "sleep 60 & setsid sh -c 'sleep 60 & wait' & wait")
    try:
        # sh, its sleep, the setsid sh and its sleep
        members = wait_until(lambda: len(child.members()) == 4 and child.members())
        sessions = {p.sid for p in members}
        assert len(sessions) == 2
        await child.stop(1.0)
        assert not any(pid_alive(p.pid) for p in members)
    finally:
        await child.stop(0)
        await child.close()


async def test_output_is_read_until_the_last_writer_is_gone_and_nothing_leaks(
    tmp_path: Path,
) -> None:
    before = open_fds()
    marker = tmp_path / "written"
    # The helper writes after the child exited; had its pipe been closed, the write would
    # fail and the marker would not be made.
    child = await spawn("sh", "-c", f"(sleep 0.3; echo late && touch {marker}) & echo early")
    async with asyncio.timeout(2):
        assert await child.wait() == 0
    async with asyncio.timeout(5):
        await child.close()
    assert marker.exists()
    await child.stop(0)
    assert open_fds() == before


async def test_a_cancelled_close_closes_the_pipes_at_once() -> None:
    before = open_fds()
    child = await spawn("sh", "-c", "sleep 30 & exit 0")
    await child.wait()
    closing = asyncio.create_task(child.close())
    await asyncio.sleep(0)  # one turn of the loop: close() is now waiting for EOF
    closing.cancel()
    await asyncio.gather(closing, return_exceptions=True)
    await child.stop(0)
    assert open_fds() == before


def test_subtree_follows_parents_down_from_the_roots_only() -> None:
    table = snapshot()
    mine = subtree(table, [os.getpid()])
    assert os.getpid() in mine and os.getppid() not in mine
