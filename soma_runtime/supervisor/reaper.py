"""The supervisor as a child subreaper: processes orphaned anywhere below it become its
children instead of init's, so it can find them, stop them and reap them.

Each started child is reaped through its own `process.ChildProcess` (woken by its pidfd),
which keeps the exit code; the reaper reaps everything else that exits while the supervisor
is its parent: helpers whose runtime died before them. SIGCHLD wakes it; `waitid(WNOWAIT)`
shows whose exit is pending without consuming it, so that a started child's exit is handed
to its own reaping and only orphans are reaped here.

Subreaping and SIGCHLD are per process, hence one `REAPER`, installed by the supervisor.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
from collections.abc import Callable

import structlog

from soma_runtime.supervisor.proctree import Proc, snapshot, subtree

log = structlog.get_logger(component="supervisor")

_PR_SET_CHILD_SUBREAPER = 36
# Loaded at import, so that a forked child (see process.py) only calls it.
libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, value: int) -> None:
    """prctl(2) with one argument; `OSError` when the kernel refuses."""
    if libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


class Reaper:
    def __init__(self) -> None:
        # Started children: pid -> what reaps it (each child reaps itself; see module doc).
        self._started: dict[int, Callable[[], None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def installed(self) -> bool:
        return self._loop is not None

    def install(self) -> None:
        """Become a subreaper and reap orphans from now on (in the running event loop)."""
        loop = asyncio.get_running_loop()
        prctl(_PR_SET_CHILD_SUBREAPER, 1)
        loop.add_signal_handler(signal.SIGCHLD, self.sweep)
        self._loop = loop
        self.sweep()

    def uninstall(self) -> None:
        """Reap what is pending and stop adopting: orphans go to init again."""
        if self._loop is not None:
            self.sweep()  # whatever exited before its SIGCHLD was handled
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None
            prctl(_PR_SET_CHILD_SUBREAPER, 0)

    def started(self, pid: int, reap: Callable[[], None]) -> None:
        """`pid` is a started child; `reap()` reaps it (the sweep calls it when it has exited)."""
        self._started[pid] = reap

    def reaped(self, pid: int) -> None:
        self._started.pop(pid, None)

    def adopted(self, table: dict[int, Proc]) -> list[Proc]:
        """Orphans this process adopted (its live children it did not start); none unless
        installed, since then every process of ours it did not start is someone else's."""
        if not self.installed:
            return []
        me = os.getpid()
        started = self._started
        return [p for p in table.values() if p.ppid == me and p.pid not in started and not p.zombie]

    def orphans(self) -> list[Proc]:
        """The adopted orphans and their descendants."""
        table = snapshot()
        return [table[pid] for pid in subtree(table, [p.pid for p in self.adopted(table)])]

    def sweep(self) -> None:
        """Reap every exited child: orphans here, started children through their own reaper."""
        while True:
            try:
                exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # no children at all
                return
            if exited is None:  # none has exited
                return
            pid = exited.si_pid
            reap = self._started.get(pid)
            if reap is not None:
                reap()
                if pid in self._started:  # not reaped after all: leave it to its pidfd
                    return
                continue
            _, status = os.waitpid(pid, 0)  # an exited child: returns at once
            code = os.waitstatus_to_exitcode(status)
            log.info("orphan_reaped", pid=pid, exit=describe_exit(code))


def describe_exit(returncode: int) -> str:
    """`exit 3` or `signal SIGKILL` (a negative return code is the signal)."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


REAPER = Reaper()
