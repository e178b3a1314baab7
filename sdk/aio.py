"""`sdk.AsyncClient`: the asyncio client, same calls and guarantees as `sdk.Client`, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import grpc

from sdk import _auth, _wire
from sdk._core import DEFAULT_TIMEOUT, ClientCore, Retry, arguments_from_env
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from sdk.types import FunctionMatch, Response


class AsyncClient:
    """One grpc.aio channel to the sidecar, opened on first use inside the running loop.

    grpc.aio channels belong to the event loop that creates them, so construction does no I/O
    and the channel is made by the first call (or by `async with`). See `sdk.Client` for the
    arguments and for what happens while the sidecar restarts.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        token_file: str | None = None,
        auth_socket: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._core = ClientCore(target, token, token_file, auth_socket, timeout)
        self._lock: asyncio.Lock | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.SidecarAsyncStub | None = None

    @classmethod
    def from_env(cls, *, timeout: float | None = DEFAULT_TIMEOUT) -> AsyncClient:
        """The client of a supervised runtime, configured from its environment."""
        target, auth = arguments_from_env()
        return cls(target, **auth, timeout=timeout)

    def _ensure_stub(self) -> pb_grpc.SidecarAsyncStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self._core.target, options=_wire.CHANNEL_OPTIONS
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
                    metadata=core.metadata(),
                    wait_for_ready=True,
                )
            except grpc.RpcError as exc:
                retry = core.after_failure(call, exc)
                if retry is Retry.ASK_CARDS:
                    core.learn_cards(await self.describe(timeout=call.remaining()))
                    retry = core.after_failure(call, exc)
                if retry is Retry.RAISE:
                    raise _wire.transport_error(exc) from None
                continue
            core.succeeded()
            return reply

    async def close(self) -> None:
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
