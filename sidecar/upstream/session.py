"""The long-lived session with a stdio upstream: one subprocess speaking MCP, restarted with
backoff when it dies.

A background task owns the subprocess and its `mcp.Client` (anyio requires a task group to be
left by the task that entered it); calls borrow the connected client. The subprocess is
spoken to through `transport.stdio_transport`, which reads no line longer than the limit. A
call that finds the connection closed marks the session broken: the task lets the process go
and starts another after a backoff of 0.5 s doubling to 30 s (reset once a call succeeds),
and calls meanwhile answer `UpstreamDown` at once instead of waiting. What the process writes
to stderr is logged as its own events (`upstream_stderr`, with its name and the line; a few in
a row, then one with a count every 10 s), never as the sidecar's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from mcp import Client, MCPError, StdioServerParameters
from mcp.types import CONNECTION_CLOSED

from sidecar.upstream.transport import stdio_transport
from soma_runtime.throttle import RepeatedWarnings

log = structlog.get_logger(component="upstream")

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0


class Backoff:
    """The waits after failures in a row: `BACKOFF_MIN_S` doubling to `BACKOFF_MAX_S`, from
    the start again after a success."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = BACKOFF_MIN_S

    def next(self) -> float:
        """The wait after one more failure."""
        delay = self._next
        self._next = min(BACKOFF_MAX_S, delay * 2)
        return delay

    def reset(self) -> None:
        self._next = BACKOFF_MIN_S


class UpstreamDown(Exception):
    """The upstream cannot be used now (connection, protocol, or waiting out a backoff)."""


def connection_closed(exc: MCPError) -> bool:
    return exc.error.code == CONNECTION_CLOSED and exc.error.message == "Connection closed"


class StdioSession:
    """The subprocess of one stdio upstream and its MCP client; a message from it may take
    `limit` bytes."""

    def __init__(
        self,
        upstream: str,
        parameters: Callable[[], Awaitable[StdioServerParameters]],
        limit: int,
    ) -> None:
        self._upstream = upstream
        self._parameters = parameters
        self._limit = limit
        self._client: Client | None = None
        self._settled = asyncio.Event()  # set when a start has succeeded or failed
        self._broken = asyncio.Event()
        self._backoff = Backoff()
        self._restart_at = 0.0
        self._last_error = "not started yet"
        self._task: asyncio.Task[None] | None = None
        self._stderr = RepeatedWarnings(log)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.asynccontextmanager
    async def operation(self) -> AsyncIterator[Client]:
        """The connected client (waiting for a start in progress; the caller bounds the
        wait); `UpstreamDown` when the start failed, while the session waits out its
        backoff, or when the process dies under the operation."""
        await self._settled.wait()
        client = self._client
        if client is None:
            delay = max(0.0, self._restart_at - time.monotonic())
            raise UpstreamDown(f"{self._last_error}; restarted in {delay:.1f} s")
        try:
            yield client
        except MCPError as exc:
            if not connection_closed(exc):
                raise
            self._last_error = "the upstream process exited"
            self._broken.set()
            raise UpstreamDown(self._last_error) from None
        self._backoff.reset()

    async def _run(self) -> None:
        while True:
            self._settled.clear()
            try:
                parameters = await self._parameters()
                transport = stdio_transport(parameters, self._limit, self._stderr_line)
                async with Client(transport, cache=None) as client:
                    self._client = client
                    self._broken.clear()
                    self._settled.set()
                    log.info("upstream_process_started", upstream=self._upstream)
                    await self._broken.wait()
            except Exception as exc:
                self._last_error = f"{type(exc).__name__}: {reason(exc)}"
            finally:
                self._client = None
            delay = self._backoff.next()
            self._restart_at = time.monotonic() + delay
            self._settled.set()
            log.warning(
                "upstream_process_restarting",
                upstream=self._upstream,
                error=self._last_error,
                in_s=delay,
            )
            await asyncio.sleep(delay)

    def _stderr_line(self, line: str) -> None:
        """A line the process wrote to stderr: its text, in an event of the upstream's (a
        few in a row, then a count every while: it may write as fast as it likes)."""
        self._stderr.warning("upstream_stderr", self._upstream, upstream=self._upstream, line=line)


def leaf(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (anyio task groups wrap what fails inside them,
    the MCP client's errors included)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def reason(exc: BaseException) -> str:
    exc = leaf(exc)
    return str(exc) or type(exc).__name__
