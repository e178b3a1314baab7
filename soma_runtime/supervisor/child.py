"""One supervised process: start, watch, restart with backoff within a budget, or give up.

States: starting → running → (exit) → stopping → backoff → starting ... ; `stopping` while
what the process left behind is ended; `fatal` once the restart budget is spent, `stopped`
when it exits and is not to be restarted, or when the supervisor stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from soma_runtime.config import RestartPolicy
from soma_runtime.exit_status import SETUP_ERROR
from soma_runtime.supervisor.policy import backoff_delay, wants_restart
from soma_runtime.supervisor.process import ChildProcess, Command
from soma_runtime.supervisor.reaper import describe_exit

log = structlog.get_logger(component="supervisor")


class State(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FATAL = "fatal"
    STOPPED = "stopped"


# Seconds the output of a process that refused its setup gets to reach its end, where the
# reason is (it has exited; only a helper still holding its pipes could delay that).
_LAST_WORDS = 2.0


class StartFailed(Exception):
    """The process started but did not become ready; it is stopped and counted as a failure."""


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How one start ended."""

    returncode: int
    ran_for: float  # seconds
    ready: bool
    process: ChildProcess | None  # None: it could not be executed
    refused: str | None = None  # why its setup cannot work: restarting is pointless


class Supervised:
    """Runs one process under a restart policy. Subclasses add what happens around a start."""

    kind = "process"
    # Whether an exit with `SETUP_ERROR` before the process became ready is final (only for
    # our own processes: for an agent's command, 2 may mean anything).
    final_setup_error = False

    def __init__(self, name: str, policy: RestartPolicy, rng: random.Random | None = None) -> None:
        self.name = name
        self.policy = policy
        self.state = State.STOPPED
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self.setup_error = False  # it refused its setup: given up on at once
        self.on_change: Callable[[], None] = lambda: None
        self.first_start = asyncio.Event()  # set once the first start attempt is over
        self._started_at: float | None = None
        self._child: ChildProcess | None = None
        self._stopping = asyncio.Event()
        # Past processes' output still being logged: a helper may write to their pipes long
        # after they exited, and a restart does not wait for that.
        self._drains: set[asyncio.Task[None]] = set()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    # -- hooks ------------------------------------------------------------------------------

    async def prepare(self) -> Command:
        """The command for the next start."""
        raise NotImplementedError

    async def started(self, child: ChildProcess) -> None:
        """After the spawn; raise `StartFailed` if the process did not become ready."""

    async def exited(self) -> None:
        """After the process is gone (whatever the reason)."""

    # -- lifecycle -------------------------------------------------------------------------

    def _set_state(self, state: State) -> None:
        self.state = state
        self.on_change()

    async def run(self) -> None:
        """Start and restart until stopped, fatal, or not to be restarted."""
        consecutive = 0
        while not self._stopping.is_set():
            self._set_state(State.STARTING)
            outcome = await self._run_once()
            # Decided at the spawn, before anyone could stop it, or else read from its output.
            refused = outcome.refused
            if refused is None and not self._stopping.is_set():
                refused = await self._refusal(outcome)
            if refused is not None:
                log.error(
                    "setup_error",
                    child=self.name,
                    exit=self.last_exit,
                    cause=refused,
                    restart=False,
                )
                self.setup_error = True
                self._set_state(State.FATAL)
                return
            if self._stopping.is_set() or not wants_restart(self.policy, outcome.returncode):
                log.info("exited", child=self.name, exit=self.last_exit, restart=False)
                self._set_state(State.STOPPED)
                return
            if outcome.ran_for >= self.policy.stable_after:
                consecutive = 0
            if consecutive >= self.policy.max_restarts:
                log.error("fatal", child=self.name, exit=self.last_exit, restarts=consecutive)
                self._set_state(State.FATAL)
                return
            consecutive += 1
            self.restarts += 1
            delay = backoff_delay(self.policy, consecutive, self._rng)
            log.warning(
                "backoff",
                child=self.name,
                exit=self.last_exit,
                attempt=consecutive,
                delay_s=round(delay, 3),
            )
            self._set_state(State.BACKOFF)
            try:
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            except TimeoutError:
                pass
        self._set_state(State.STOPPED)

    async def _refusal(self, outcome: _Outcome) -> str | None:
        """Why the process refused its setup (exit 2 before it became ready, for our own
        processes): the last line it wrote to stderr, once its output is read to the end."""
        if not (self.final_setup_error and outcome.returncode == SETUP_ERROR):
            return None
        if outcome.ready or outcome.process is None:
            return None
        await self.drain(_LAST_WORDS)
        return outcome.process.last_error_line or "exit 2 before it served, without a reason"

    async def _run_once(self) -> _Outcome:
        """One start, until the process is gone."""
        command = await self.prepare()
        started = time.monotonic()
        try:
            child = await ChildProcess.spawn(self.name, command)
        except OSError as exc:
            # The file named says which was missing: the command or its working directory.
            missing = "" if exc.filename is None else f": {exc.filename}"
            cause = f"cannot execute {command.argv[0]!r} in {command.cwd}: {exc.strerror}{missing}"
            self.last_exit = describe_exit(127)
            # At the first start, the configuration names a command that cannot run (a typo,
            # a missing file): no restart will find it (`run` logs the setup error). Later it
            # may be a moment of an upgrade, and counts as any failed start. Decided before
            # `first_start` is set: whoever waits on that reads `setup_error` next.
            refused = None if self.first_start.is_set() else cause
            self.setup_error = refused is not None
            if refused is None:
                log.error("spawn_failed", child=self.name, argv=command.argv, error=cause)
            await self.exited()
            self.first_start.set()
            return _Outcome(127, 0.0, False, None, refused)
        finally:
            for fd in command.close_after_spawn:  # the child has its own copies now
                _close_quietly(fd)
        self._child = child
        self.pid = child.pid
        self._started_at = started
        log.info("started", child=self.name, pid=child.pid)
        ready = False
        try:
            if self._stopping.is_set():  # stop() came while we were spawning
                raise StartFailed("stopping")
            await self.started(child)
        except StartFailed as exc:
            if not self._stopping.is_set():
                log.error("start_failed", child=self.name, pid=child.pid, reason=str(exc))
            await child.stop(self.policy.stop_timeout)
        else:
            ready = True
            self._set_state(State.RUNNING)
        self.first_start.set()
        returncode = await child.wait()
        ran_for = time.monotonic() - started
        self.last_exit = describe_exit(returncode)
        self.pid = None
        self._started_at = None
        self._set_state(State.STOPPING)
        # Its identity dies with it, at once: the helpers it left behind must not use it.
        await self.exited()
        await child.stop(self.policy.stop_timeout)  # what it left behind, if anything
        self._child = None
        drain = asyncio.create_task(child.close(), name=f"drain {self.name} {child.pid}")
        self._drains.add(drain)
        drain.add_done_callback(self._drains.discard)
        return _Outcome(returncode, ran_for, ready, child)

    async def stop(self) -> None:
        """Stop for good: no more restarts; SIGTERM to the process and every process that
        belongs to it, then SIGKILL after `stop_timeout`."""
        self._stopping.set()
        child = self._child
        if child is not None:
            await child.stop(self.policy.stop_timeout)

    async def drain(self, timeout: float) -> None:
        """Finish logging what past processes wrote: up to EOF, or cut off after `timeout`."""
        drains = list(self._drains)
        if drains:
            await asyncio.wait(drains, timeout=timeout)
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        uptime = None if self._started_at is None else round(time.monotonic() - self._started_at, 1)
        return {
            "name": self.name,
            "kind": self.kind,
            "state": str(self.state),
            "pid": self.pid,
            "uptime_s": uptime,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
        }


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
