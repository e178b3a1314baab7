"""How the sidecar reaches an upstream, with every answer bounded before it is read whole.

Over HTTP the official client reads each response body through the httpx2 client we give it;
a response hook counts the body as it arrives, against one budget per operation. A body past
the budget (or announcing more with Content-Length) ends the read with `AnswerRefused`, and so
does a body in a content coding: the client asks for identity, and a compressed body's decoded
size could not be counted before it is decoded. A listen stream, which lasts, has a budget
without a total (each of its events is bounded by the client) that refuses content codings
all the same.

Over stdio the SDK's transport keeps a line however long (copying it again at every chunk),
so the subprocess is spoken to by `stdio_transport` instead: lines of at most the budget are
parsed, a longer one is skipped to its end, never kept, and the request it answered (its id
read at the line's start or end) gets an error of code `ANSWER_TOO_LARGE`. Process handling
is the SDK's: its own session and process group, the SDK's minimal environment, stdin closed
at the end, then the group terminated and killed after a grace period. Its stderr is a pipe of
its own, read line by line (each cut to `MAX_STDERR_LINE` characters) and handed to the
caller: what it writes there is its text, never the sidecar's own log lines.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import anyio
import httpx2
from anyio.abc import Process
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import StdioServerParameters
from mcp.client.stdio import get_default_environment
from mcp.os.posix.utilities import terminate_posix_process_tree
from mcp.shared.message import SessionMessage
from mcp.types import (
    ErrorData,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    RequestId,
    jsonrpc_message_adapter,
)

from sidecar.mcp_methods import CANCELLED
from sidecar.scrub import content_codings

# A JSON-RPC error code in the range the spec leaves to implementations: the sidecar's own
# answer to a request whose response line exceeded the budget.
ANSWER_TOO_LARGE = -32099
# How many bytes of each end of a line too long to keep are kept to find its request id.
_EDGE = 4096
_ID = re.compile(rb'"id"\s*:\s*(-?\d+|"(?:[^"\\]|\\.)*")')
# Characters of a line a stdio upstream writes to stderr that are kept.
MAX_STDERR_LINE = 1000
# Seconds a stdio upstream gets to exit once its stdin is closed, then to die once terminated.
_EXIT_GRACE_S = 2.0


class AnswerRefused(Exception):
    """The upstream answered what the sidecar does not read: `kind` is the error answered."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def too_large(limit: int) -> AnswerRefused:
    return AnswerRefused("ResponseTooLarge", f"the upstream's answer exceeds {limit} bytes")


class Budget:
    """The bytes one operation may read from an HTTP upstream (None: no total, for a
    listen stream); `refused` once it said no."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._left = limit or 0
        self.refused: AnswerRefused | None = None

    def client(self, headers: dict[str, str], timeout: httpx2.Timeout) -> httpx2.AsyncClient:
        """An httpx2 client whose every response body is counted against this budget."""
        return httpx2.AsyncClient(
            headers={**headers, "Accept-Encoding": "identity"},
            timeout=timeout,
            event_hooks={"response": [self._count]},
        )

    async def _count(self, response: httpx2.Response) -> None:
        assert isinstance(response.stream, httpx2.AsyncByteStream)  # an async client's
        response.stream = _Counted(response.stream, self, response.headers)

    def _refuse(self, refusal: AnswerRefused) -> AnswerRefused:
        self.refused = refusal
        return refusal

    def spend(self, size: int) -> None:
        if self.limit is None:
            return
        self._left -= size
        if self._left < 0:
            raise self._refuse(too_large(self.limit))

    def check(self, headers: httpx2.Headers) -> None:
        """Refuse at once a body announced larger than what is left, or compressed."""
        if content_codings(headers):
            raise self._refuse(
                AnswerRefused(
                    "UnboundedResponse",
                    "the upstream answered in a content coding (its size cannot be bounded "
                    "before it is decoded)",
                )
            )
        length = headers.get("content-length", "")
        if self.limit is not None and length.isdigit() and int(length) > self._left:
            raise self._refuse(too_large(self.limit))


class _Counted(httpx2.AsyncByteStream):
    def __init__(
        self, stream: httpx2.AsyncByteStream, budget: Budget, headers: httpx2.Headers
    ) -> None:
        self._stream = stream
        self._budget = budget
        self._headers = headers

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self._budget.check(self._headers)
        async for chunk in self._stream:
            self._budget.spend(len(chunk))
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


@dataclass(slots=True)
class _Overlong:
    """A line longer than the limit: only its ends are kept."""

    head: bytes
    tail: bytes

    def request_id(self, in_flight: set[RequestId]) -> RequestId | None:
        """The id of a request in flight that the line answers, if its ends say which."""
        for found in [*_ID.findall(self.head)[:1], *_ID.findall(self.tail)[-1:]]:
            with contextlib.suppress(ValueError):
                value = json.loads(found)
                if value in in_flight:
                    return value  # type: ignore[no-any-return]
        return None


class _Lines:
    """Splits a byte stream into lines; a line longer than `limit` is given as `_Overlong`
    once it ends, its middle dropped as it arrives."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._line = bytearray()
        self._overlong: _Overlong | None = None

    def feed(self, chunk: bytes) -> Iterator[bytes | _Overlong]:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if self._overlong is not None:
                self._overlong.tail = (self._overlong.tail + piece)[-_EDGE:]
            else:
                self._line += piece
                if len(self._line) > self._limit:
                    self._overlong = _Overlong(
                        bytes(self._line[:_EDGE]), bytes(self._line[-_EDGE:])
                    )
                    self._line = bytearray()
            if end < 0:
                return
            line: bytes | _Overlong = bytes(self._line)
            if self._overlong is not None:
                line, self._overlong = self._overlong, None
            self._line = bytearray()
            yield line
            start = end + 1


Streams = tuple[
    MemoryObjectReceiveStream[SessionMessage | Exception], MemoryObjectSendStream[SessionMessage]
]


@contextlib.asynccontextmanager
async def stdio_transport(
    parameters: StdioServerParameters, limit: int, on_stderr: Callable[[str], None]
) -> AsyncIterator[Streams]:
    """The MCP streams of a subprocess started from `parameters`, whose every message (one
    line of stdout) is at most `limit` bytes; each line it writes to stderr goes to
    `on_stderr`."""
    process = await anyio.open_process(
        [parameters.command, *parameters.args],
        env=get_default_environment() | (parameters.env or {}),
        stderr=subprocess.PIPE,
        cwd=parameters.cwd,
        start_new_session=True,  # a process group, terminated as one
    )
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    stdin, stdout, stderr = process.stdin, process.stdout, process.stderr
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)
    in_flight: set[RequestId] = set()

    def message(line: bytes | _Overlong) -> SessionMessage | Exception:
        if isinstance(line, _Overlong):
            request = line.request_id(in_flight)
            if request is None:
                return too_large(limit)  # the session logs it; nothing waits for it
            in_flight.discard(request)
            error = ErrorData(code=ANSWER_TOO_LARGE, message=str(too_large(limit)))
            return SessionMessage(JSONRPCError(jsonrpc="2.0", id=request, error=error))
        try:
            parsed = jsonrpc_message_adapter.validate_json(line, by_name=False)
        except ValueError as exc:
            return exc
        if isinstance(parsed, JSONRPCResponse | JSONRPCError) and parsed.id is not None:
            in_flight.discard(parsed.id)
        return SessionMessage(parsed)

    async def read() -> None:
        lines = _Lines(limit)
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            async with read_writer:
                async for chunk in stdout:
                    for line in lines.feed(chunk):
                        if line:
                            await read_writer.send(message(line))

    async def errors() -> None:
        lines = _Lines(MAX_STDERR_LINE)
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            async for chunk in stderr:
                for line in lines.feed(chunk):
                    kept = line if isinstance(line, bytes) else line.head[:MAX_STDERR_LINE]
                    text = kept.decode("utf-8", errors="replace").rstrip("\r")
                    if text.strip():
                        on_stderr(text if isinstance(line, bytes) else text + "...")

    async def write() -> None:
        try:
            async with write_reader:
                async for outgoing in write_reader:
                    sent = outgoing.message
                    if isinstance(sent, JSONRPCRequest):
                        in_flight.add(sent.id)
                    elif isinstance(sent, JSONRPCNotification) and sent.method == CANCELLED:
                        in_flight.discard((sent.params or {}).get("requestId", ""))
                    text = sent.model_dump_json(by_alias=True, exclude_unset=True)
                    await stdin.send(text.encode() + b"\n")
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            # The process no longer reads: the session must see the connection end, not
            # wait on its requests for ever.
            await read_writer.aclose()

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(read)
            tasks.start_soon(errors)
            tasks.start_soon(write)
            try:
                yield read_stream, write_stream
            finally:
                tasks.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(process)
            for stream in (read_stream, write_stream, read_writer, write_reader):
                await stream.aclose()


async def _stop(process: Process) -> None:
    """Close its stdin, give it a grace period to exit, then terminate its process group."""
    assert process.stdin is not None
    with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
        await process.stdin.aclose()
    with anyio.move_on_after(_EXIT_GRACE_S):
        await process.wait()
    if process.returncode is None:
        await terminate_posix_process_tree(process, _EXIT_GRACE_S)
    # Its pipes closed and the process reaped (a descendant holding a pipe: not waited for).
    with (
        anyio.move_on_after(_EXIT_GRACE_S),
        contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError),
    ):
        await process.aclose()
