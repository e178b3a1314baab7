"""Starting one child process: argv (no shell), its own session, death with the parent, every
line it writes logged with its name, and its exit noticed the moment it happens.

Not asyncio's subprocess: on Python 3.11 `Process.wait()` resolves only once the child's
pipes are closed as well, and a helper the child started may hold them for ever. Here the
child is started with `subprocess.Popen`, its exit is watched on a pidfd (readable when the
process exits, whoever holds its pipes) and reaped at once, and its output is read from the
pipes with asyncio streams for as long as anyone writes to them.

Whose lines pass through here. The sidecar is trusted and writes one event per call: re-parsed
and re-rendered here, that cost the supervisor about 90 µs of CPU per call (now none:
`python -m benchmarks.supervisor_lines` measures it against a baseline). So the sidecar
gets a copy of the supervisor's own log stream (stderr: a terminal, a file, or journald's
stream socket under systemd) and writes its events there itself, in the configured format,
each carrying `child=sidecar` (soma_runtime.logs); the supervisor never reads them. Each line
is one write(2), so lines do not interleave (atomic on a pipe up to PIPE_BUF, and in practice
on a stream socket or a file). Its stdout and stderr stay pipes to this reader: what reaches
them bypassed its logging (gRPC's C core, a fatal error, a stray print) and is logged here as
`output` with its name, as before. Runtimes are not trusted: everything they write comes
through here; a line is re-emitted as an event only when it is a strict JSON object with an
`event`, marked `component=output`, with the keys that would speak for someone else or that
the redactor trusts renamed (`child` -> `child_child`), and any other line is an `output`
event. A runtime cannot write to the stream directly, so
it cannot forge a line of the supervisor or the sidecar. Exits are watched on the pidfd,
never through the pipes.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from soma_runtime import strict_json
from soma_runtime.logs import TO_SUPERVISOR_ENV
from soma_runtime.redaction import STRUCTURAL
from soma_runtime.supervisor.ending import KILL_WAIT, end
from soma_runtime.supervisor.proctree import Proc, has_environ_entry, read_proc, snapshot, subtree
from soma_runtime.supervisor.reaper import REAPER, libc

log = structlog.get_logger(component="supervisor")

# Lines longer than this are logged in pieces.
MAX_LINE = 64 * 1024
# A child's JSON event nested deeper than this is logged as a plain `output` line.
_MAX_EVENT_DEPTH = 16
_PR_SET_PDEATHSIG = 1
# Set in a runtime's environment (children.py) and inherited by the helpers it starts: it
# names the runtime an orphaned helper came from, once its parent is gone.
_OWNER_VARIABLE = "SOMA_RUNTIME"


@dataclass(frozen=True, slots=True)
class Command:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    # Descriptors the child inherits; those in `close_after_spawn` are this start's alone
    # (the supervisor closes its copies once the child has its own).
    pass_fds: tuple[int, ...] = field(default=())
    close_after_spawn: tuple[int, ...] = field(default=())


def _die_with(parent: int) -> Callable[[], None]:
    """Runs in the forked child: SIGKILL it when the supervisor dies, even by SIGKILL."""

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class ChildProcess:
    """A started child; `wait()` for its exit, `stop()` to end it and everything it started."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], owner: bytes | None) -> None:
        self.name = name
        self._popen = popen
        self._owner = owner  # b"NAME=value" in the environment of its helpers, if any
        self._loop = asyncio.get_running_loop()
        self._exit: asyncio.Future[int] = self._loop.create_future()
        self._pidfd = os.pidfd_open(popen.pid)  # works on a zombie too: nothing is missed
        started = read_proc(popen.pid)
        self._start = None if started is None else started.start
        self._loop.add_reader(self._pidfd, self._reap)
        REAPER.started(popen.pid, self._reap)
        self._pipes: list[asyncio.ReadTransport] = []
        self._pumps: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Future[None] | None = None
        # The last line it wrote to stderr: why it refused its setup, if it did (`soma`
        # prints its one-line reason there before exiting 2).
        self.last_error_line: str | None = None

    @classmethod
    async def spawn(cls, name: str, command: Command) -> ChildProcess:
        """Start `command`; `OSError` when it cannot be executed."""
        # Popen only forks and execs here, as asyncio's own subprocess does inside the loop;
        # nothing blocks on the child afterwards (its exit is watched on a pidfd).
        popen = subprocess.Popen(  # noqa: ASYNC220
            command.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            # Its events come to the pump as JSON, and are rendered once, by the supervisor.
            env={**command.env, TO_SUPERVISOR_ENV: "1"},
            cwd=command.cwd,
            pass_fds=command.pass_fds,
            # Its own session and process group: a Ctrl-C in the terminal reaches only the
            # supervisor, which then stops children in order (runtimes first, then the
            # sidecar); and what the child starts stays in its session unless it calls setsid.
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()),
        )
        owner = command.env.get(_OWNER_VARIABLE)
        child = cls(name, popen, None if owner is None else f"{_OWNER_VARIABLE}={owner}".encode())
        for stream_name, pipe in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            assert pipe is not None
            reader = asyncio.StreamReader(limit=MAX_LINE)
            protocol = functools.partial(asyncio.StreamReaderProtocol, reader)
            transport, _ = await child._loop.connect_read_pipe(protocol, pipe)
            child._pipes.append(transport)
            child._pumps.append(asyncio.create_task(child._pump(stream_name, reader)))
        return child

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def _reap(self) -> None:
        """Collect the exit status once the process has exited (its pidfd is readable, or
        the reaper saw it first)."""
        if self._exit.done() or self._popen.poll() is None:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        REAPER.reaped(self.pid)
        self._exit.set_result(self._popen.returncode)

    async def wait(self) -> int:
        """The exit code (negative: the signal), as soon as the process has exited."""
        return await asyncio.shield(self._exit)

    def members(self) -> list[Proc]:
        """The live processes that belong to this child: the child, the members of its
        session, the orphans the supervisor adopted whose environment names this child's
        runtime, and all their descendants."""
        table = snapshot()
        leader = table.get(self.pid)
        roots: list[int] = []
        if leader is None or leader.start == self._start:
            # Otherwise the pid was recycled, which it is only once the session is empty.
            roots.append(self.pid)
            roots.extend(p.pid for p in table.values() if p.sid == self.pid)
        if self._owner is not None:
            owner = self._owner
            roots.extend(p.pid for p in REAPER.adopted(table) if has_environ_entry(p.pid, owner))
        return [table[pid] for pid in subtree(table, roots)]

    async def stop(self, timeout: float) -> None:
        """SIGTERM the child and every process that belongs to it (see `members`), SIGKILL
        what is left after `timeout` seconds. After the child exited by itself, this ends
        what it left behind. Returns within `timeout` plus a few seconds whatever happens."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._end(timeout))
        await asyncio.shield(self._stopping)

    async def _end(self, timeout: float) -> None:
        await end(self.members, timeout, child=self.name)
        try:
            async with asyncio.timeout(KILL_WAIT):
                await self.wait()
        except TimeoutError:
            log.error("not_reaped", child=self.name, pid=self.pid)

    async def _pump(self, stream_name: str, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # longer than MAX_LINE: take what is buffered as one piece
                line = await reader.read(MAX_LINE)
            if not line:
                return
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            if stream_name == "stderr" and text.strip():
                self.last_error_line = text
            try:
                _log_line(self.name, stream_name, text)
            except Exception:  # never stop reading: a full pipe would block the child
                log.exception("output_unloggable", child=self.name, stream=stream_name)

    async def close(self) -> None:
        """Log the child's output until every process that holds its pipes is gone (EOF),
        then close them. Cancelled, close them at once: the end of the supervisor's stop
        cancels what is still open then."""
        try:
            await asyncio.gather(*self._pumps)
        finally:
            for pipe in self._pipes:
                pipe.close()
            for pump in self._pumps:
                pump.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)


def _log_line(name: str, stream_name: str, text: str) -> None:
    """Re-emit a child's structured (JSON) log line in our format, at its level and with its
    timestamp, marked as the child's (`child=NAME component=output`); log other lines as
    `output`. Strict JSON: what the child wrote as NaN is not re-logged as a number no JSON
    reader takes."""
    fields: dict[str, Any] | None = None
    if text.startswith("{"):
        try:
            parsed = strict_json.loads(text.encode(), _MAX_EVENT_DEPTH)
        except strict_json.JsonError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("event"), str):
            fields = parsed
    if fields is None:
        log.info("output", child=name, stream=stream_name, line=text)
        return
    event = fields.pop("event")
    level = str(fields.pop("level", "info")).lower()
    stamp = fields.pop("timestamp", None)
    # The child cannot speak for another child or another component, put text in a field the
    # redactor trusts, nor collide with the logger's own parameters.
    fields = {(f"child_{k}" if k in _RESERVED else k): v for k, v in fields.items()}
    if _is_time(stamp):
        fields["timestamp"] = stamp  # kept by the pipeline's stamper (soma_runtime.logs)
    elif stamp is not None:
        fields["child_timestamp"] = stamp  # text the redactor scans (not a structural field)
    method = getattr(log, level, None) if level in _LEVELS else None
    (method or log.info)(event, child=name, component=CHILD_COMPONENT, **fields)


# The component of every event a child wrote and the supervisor re-emits: none of the
# supervisor's or the sidecar's own loggers uses it, so a runtime's `{"event": "exited"}`
# never reads as the supervisor's line about it.
CHILD_COMPONENT = "output"
_LEVELS = frozenset({"debug", "info", "warning", "error", "critical"})
# Also the fields the redactor does not scan: in a child's event, they are its text.
_RESERVED = frozenset({"self", "event"}) | STRUCTURAL


def _is_time(stamp: object) -> bool:
    """Whether a child's `timestamp` is an ISO 8601 time (then it holds no text to redact)."""
    if not isinstance(stamp, str) or len(stamp) > 40:
        return False
    try:
        datetime.fromisoformat(stamp)
    except ValueError:
        return False
    return True
