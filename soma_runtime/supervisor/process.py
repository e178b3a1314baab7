"""Starting one child process: argv (no shell), its own process group, death with the parent,
and every line it writes logged with its name."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(component="supervisor")

# Lines longer than this are logged in pieces.
MAX_LINE = 64 * 1024
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded here so the forked child only calls it


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
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def describe_exit(returncode: int) -> str:
    """`exit 3` or `signal SIGKILL`."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


class ChildProcess:
    """A started child; `wait()` for its exit, `stop()` to end it politely, then firmly."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self._proc = proc
        self._pumps = [
            asyncio.create_task(_pump(name, stream_name, stream))
            for stream_name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr))
            if stream is not None
        ]

    @classmethod
    async def spawn(cls, name: str, command: Command) -> ChildProcess:
        """Start `command`; `OSError` when it cannot be executed."""
        proc = await asyncio.create_subprocess_exec(
            *command.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=command.env,
            cwd=command.cwd,
            pass_fds=command.pass_fds,
            # Its own process group: a Ctrl-C in the terminal reaches only the supervisor,
            # which then stops children in order (runtimes first, then the sidecar).
            process_group=0,
            preexec_fn=_die_with(os.getpid()),
            limit=MAX_LINE,
        )
        return cls(name, proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    async def stop(self, timeout: float) -> int:
        """SIGTERM, then SIGKILL after `timeout` seconds; the exit code (negative: signal)."""
        if self._proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    return await self._proc.wait()
            except TimeoutError:
                log.warning("kill", child=self.name, pid=self.pid, after_s=timeout)
                self._signal_group(signal.SIGKILL)
        code = await self._proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # helpers that outlived their leader
        return code

    def _signal_group(self, signum: int) -> None:
        """Signal the child's whole process group (it leads its own): helpers it started
        stop with it."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signum)

    async def close(self) -> None:
        """Let the output pumps finish what the child wrote (they end at EOF)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.gather(*self._pumps, return_exceptions=True)
        for pump in self._pumps:
            pump.cancel()


async def _pump(name: str, stream_name: str, reader: asyncio.StreamReader) -> None:
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # longer than MAX_LINE: take what is buffered as one piece
            line = await reader.read(MAX_LINE)
        if not line:
            return
        text = line.decode("utf-8", errors="replace").rstrip("\r\n")
        try:
            _log_line(name, stream_name, text)
        except Exception:  # never stop reading: a full pipe would block the child
            log.exception("output_unloggable", child=name, stream=stream_name)


def _log_line(name: str, stream_name: str, text: str) -> None:
    """Re-emit a child's structured (JSON) log line as ours; log other lines as `output`."""
    fields: dict[str, Any] | None = None
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("event"), str):
            fields = parsed
    if fields is None:
        log.info("output", child=name, stream=stream_name, line=text)
        return
    event = fields.pop("event")
    level = str(fields.pop("level", "info")).lower()
    fields.pop("timestamp", None)
    # The child cannot speak for another child, nor collide with the logger's own parameters.
    fields = {(f"child_{k}" if k in _RESERVED else str(k)): v for k, v in fields.items()}
    method = getattr(log, level, None) if level in _LEVELS else None
    (method or log.info)(event, child=name, **fields)


_LEVELS = frozenset({"debug", "info", "warning", "error", "critical"})
_RESERVED = frozenset({"child", "self", "event"})
