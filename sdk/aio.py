"""`sdk.AsyncClient`: the asyncio client, same calls and guarantees as `sdk.Client`, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from functools import partial
from types import TracebackType
from typing import Any

import grpc

from sdk import _auth, _wire, protocol
from sdk._core import DEFAULT_TIMEOUT, Call, ClientCore, Retry, arguments_from_env
from sdk._stream import AsyncStream
from sdk.errors import DeadlineExceeded
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from sdk.types import FunctionMatch, Response


class AsyncClient:
    """One grpc.aio channel to the sidecar, opened on first use inside the running loop.

    grpc.aio channels belong to the event loop that creates them, so construction does no I/O
    and the channel is made by the first call (or by `async with`). See `sdk.Client` for the
    arguments, the transports and what happens while the sidecar restarts. Cancelling the task
    awaiting a call cancels the call in the sidecar too.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        token_file: str | None = None,
        auth_socket: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        transport: str = "stream",
    ) -> None:
        self._core = ClientCore(target, token, token_file, auth_socket, timeout, transport)
        self._lock: asyncio.Lock | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.SidecarAsyncStub | None = None
        self._stream: AsyncStream | None = None
        self._retired: list[AsyncStream] = []  # replaced, still answering calls in flight
        self._closed = False

    @classmethod
    def from_env(
        cls, *, timeout: float | None = DEFAULT_TIMEOUT, transport: str = "stream"
    ) -> AsyncClient:
        """The client of a supervised runtime, configured from its environment."""
        target, auth = arguments_from_env()
        client = cls(target, **auth, timeout=timeout, transport=transport)
        client._core.socket_promised()
        return client

    def _ensure_stub(self) -> pb_grpc.SidecarAsyncStub:
        if self._closed:
            raise _wire.closed()
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self._core.target, options=protocol.CHANNEL_OPTIONS
            )
            self._stub = pb_grpc.SidecarStub(self._channel)
            self._lock = asyncio.Lock()
        return self._stub

    async def stimulate(
        self,
        op: str,
        input: Any,
        context: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send one stimulus; returns what the organ answered, ok or not."""
        request = _wire.stimulate_request(op, input, context)
        stub = self._ensure_stub()
        if self._core.streaming:
            return _wire.response_from(await self._on_stream(request, timeout, op))
        return _wire.response_from(await self._invoke(stub.Stimulate, request, timeout, op))

    async def call(
        self,
        op: str,
        input: Any,
        context: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The organ's output; raises the typed `OrganError` when it answered `ok=false`."""
        response = await self.stimulate(op, input, context, timeout)
        response.raise_for_error(op)
        return response.output

    async def describe(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """The capability cards of the organs this channel may call."""
        stub = self._ensure_stub()
        return _wire.cards_from(await self._invoke(stub.Describe, pb.DescribeRequest(), timeout))

    async def search(
        self, query: str = "", tag: str | None = None, timeout: float | None = None
    ) -> list[FunctionMatch]:
        """Functions matching every word of `query` (and `tag`), best first."""
        stub = self._ensure_stub()
        request = pb.SearchRequest(query=query, tag=tag or "")
        return _wire.matches_from(await self._invoke(stub.Search, request, timeout))

    @property
    def target(self) -> str:
        return self._core.target

    @property
    def timeout(self) -> float | None:
        return self._core.timeout

    async def _invoke(
        self, rpc: Any, request: Any, timeout: float | None, op: str | None = None
    ) -> Any:
        """Call `rpc` with a session, sending it again when the core says it is safe."""
        core = self._core
        call = core.start(op, timeout)
        while True:
            if core.needs_session(call):
                assert self._lock is not None
                async with self._lock:
                    if core.needs_session(call):
                        assert core.auth_socket is not None and core.token is not None
                        core.session = await _auth.handshake_async(
                            core.auth_socket, core.token, call.deadline
                        )
            try:
                reply = await rpc(
                    request,
                    timeout=call.remaining(),
                    metadata=core.attempt(call),
                    wait_for_ready=True,
                )
            except grpc.RpcError as exc:
                code, details = _wire.status_of(exc)
                await self._retry(call, partial(core.after_failure, call, code), code, details)
                continue
            core.succeeded()
            return reply

    async def _retry(
        self, call: Call, decide: Callable[[], Retry], code: grpc.StatusCode, details: str
    ) -> None:
        """Returns when the core says to send `call` again; raises its error otherwise."""
        retry = decide()
        if retry is Retry.ASK_CARDS:
            self._core.learn_cards(await self.describe(timeout=call.remaining()))
            retry = decide()
        if retry is Retry.RAISE:
            raise _wire.transport_error(code, details) from None

    async def _on_stream(
        self, request: pb.StimulateRequest, timeout: float | None, op: str
    ) -> pb.StimulateResponse:
        """One call on the client's stream, sent again on a new stream when the core says
        it is safe."""
        core = self._core
        call = core.start(op, timeout)
        frame = _wire.stream_frame(core.next_id(), request)  # built once, sent again as is
        while True:
            stream = self._stream
            if stream is None or stream.ended is not None or stream.retired:
                stream = await self._reopen(call)
            remaining = call.remaining()
            frame.timeout_s = remaining or 0.0  # the sidecar enforces the deadline too
            future = stream.send(frame)
            call.sent_with = stream.session
            if future is None:  # not sent: the stream ended or was retired meanwhile
                continue
            try:
                if remaining is None:
                    answer = await future
                else:
                    async with asyncio.timeout(remaining):
                        answer = await future
            except TimeoutError:
                stream.abandon(frame.id)
                raise DeadlineExceeded("DEADLINE_EXCEEDED", "the call's deadline passed") from None
            except asyncio.CancelledError:  # the caller's task: cancel the call in the sidecar
                stream.abandon(frame.id)
                raise
            if answer is None:  # the stream ended first
                if self._closed:
                    raise _wire.closed()
                assert stream.ended is not None
                code, details = core.stream_end_status(*stream.ended, stream.accepted)
                decide = partial(core.after_stream_end, call, code, stream.session, stream.accepted)
            elif answer.WhichOneof("result") == "reply":
                core.succeeded()
                return answer.reply
            else:
                code, details = _wire.code_named(answer.error.code), answer.error.message
                if core.retires_stream(code):
                    stream.retire()
                decide = partial(core.after_failure, call, code)
            await self._retry(call, decide, code, details)

    async def _reopen(self, call: Call) -> AsyncStream:
        """The client's stream, opened anew (with a fresh session) if it has ended."""
        core = self._core
        stub = self._ensure_stub()
        assert self._lock is not None
        async with self._lock:
            if self._closed:
                raise _wire.closed()
            stream = self._stream
            if stream is not None and stream.ended is None and not stream.retired:
                return stream
            for old in [s for s in self._retired if s.ended is not None]:
                await old.close("replaced")  # ended already: this awaits its reader
                self._retired.remove(old)
            if stream is not None:
                self._retired.append(stream)
                if pause := core.replace_stream(stream.session, stream.accepted):
                    await asyncio.sleep(min(pause, call.remaining() or pause))
            if core.needs_session(call):
                assert core.auth_socket is not None and core.token is not None
                core.session = await _auth.handshake_async(
                    core.auth_socket, core.token, call.deadline
                )
            self._stream = AsyncStream(stub, core.metadata(), core.session, core.accept_timeout)
            return self._stream

    async def close(self) -> None:
        """Ends the stream (calls still waiting on it raise `sdk.Unavailable`) and the
        channel; no task is left behind."""
        self._closed = True
        streams = [*self._retired, *([self._stream] if self._stream else [])]
        self._stream, self._retired = None, []
        for stream in streams:
            await stream.close("the client was closed")
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def __aenter__(self) -> AsyncClient:
        self._ensure_stub()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
