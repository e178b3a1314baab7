"""Ending a set of processes: SIGTERM, a grace period, then SIGKILL, with every wait bounded.

Processes are held by pidfd from the moment they are found, so a signal never reaches a
process that took over a recycled pid, and their exit is awaited on the pidfd (readable once
the process has exited), whoever its parent is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from soma_runtime.supervisor.proctree import Proc, read_proc

log = structlog.get_logger(component="supervisor")

# Seconds SIGKILLed processes get to vanish; only one in uninterruptible sleep takes longer.
KILL_WAIT = 2.0
# Rounds of SIGKILL, each finding the processes again: one may have forked before it died.
_KILL_ROUNDS = 3


class Held:
    """Live processes, each held by a pidfd."""

    def __init__(self, procs: Iterable[Proc]) -> None:
        self._fds: dict[int, int] = {}
        for proc in procs:
            if proc.zombie:
                continue
            try:
                fd = os.pidfd_open(proc.pid)
            except ProcessLookupError:
                continue
            now = read_proc(proc.pid)
            if now is None or now.start != proc.start:  # gone, or the pid was recycled
                os.close(fd)
                continue
            self._fds[proc.pid] = fd

    @property
    def pids(self) -> list[int]:
        return sorted(self._fds)

    def signal(self, signum: int) -> None:
        for pid, fd in self._fds.items():
            try:
                signal.pidfd_send_signal(fd, signum)
            except ProcessLookupError:
                continue
            except PermissionError:  # e.g. a set-uid program a runtime started
                log.warning("signal_refused", pid=pid, signal=signal.Signals(signum).name)

    async def wait(self, timeout: float) -> set[int]:
        """Wait up to `timeout` seconds for every process to exit; the pids still running."""
        loop = asyncio.get_running_loop()
        exits: dict[int, asyncio.Future[None]] = {}
        try:
            for pid, fd in self._fds.items():
                exits[pid] = loop.create_future()
                loop.add_reader(fd, _resolve, exits[pid])
            if exits:
                await asyncio.wait(exits.values(), timeout=timeout)
        finally:
            for fd in self._fds.values():
                loop.remove_reader(fd)
        return {pid for pid, exited in exits.items() if not exited.done()}

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def end(find: Callable[[], Iterable[Proc]], timeout: float, **context: Any) -> None:
    """SIGTERM every process `find()` lists, wait up to `timeout` seconds for them to exit,
    then SIGKILL whatever `find()` lists then (processes forked meanwhile included).

    Returns after `timeout + _KILL_ROUNDS * KILL_WAIT` seconds at the latest.
    """
    held = Held(find())
    try:
        held.signal(signal.SIGTERM)
        held.signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        await held.wait(timeout)
    finally:
        held.close()
    for _ in range(_KILL_ROUNDS):
        held = Held(find())
        try:
            if not held.pids:
                return
            log.warning("kill", pids=held.pids, after_s=timeout, **context)
            held.signal(signal.SIGKILL)
            left = await held.wait(KILL_WAIT)
        finally:
            held.close()
        if left:
            log.error("unkillable", pids=sorted(left), **context)
            return
