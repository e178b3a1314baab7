"""`sdk.AsyncClient`: the asyncio client, same calls and guarantees as `sdk.Client`, awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import grpc

from sdk import _auth, _wire
from sdk._proto.soma.v1 import sidecar_pb2 as pb
from sdk._proto.soma.v1 import sidecar_pb2_grpc as pb_grpc
from sdk.client import DEFAULT_TIMEOUT, ClientAuth, arguments_from_env
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
        self.target = target
        self.timeout = timeout
        self._auth = ClientAuth(target, token, token_file, auth_socket)
        self._session: str | None = None
        self._idempotent: dict[str, bool] | None = None
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
            self._channel = grpc.aio.insecure_channel(self.target, options=_wire.CHANNEL_OPTIONS)
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

    async def _session_for(self, deadline: float | None, stale: str | None) -> str | None:
        auth = self._auth
        if auth.token is None or auth.auth_socket is None or self._lock is None:
            return None
        async with self._lock:
            if self._session is None or self._session == stale:
                self._session = await _auth.handshake_async(auth.auth_socket, auth.token, deadline)
            return self._session

    async def _invoke(
        self, rpc: Any, request: Any, timeout: float | None, op: str | None = None
    ) -> Any:
        deadline = _wire.deadline_after(timeout if timeout is not None else self.timeout)
        stale: str | None = None
        while True:
            session = await self._session_for(deadline, stale)
            metadata = _wire.bearer(session) if session else ()
            try:
                return await rpc(
                    request,
                    timeout=_wire.remaining(deadline),
                    metadata=metadata,
                    wait_for_ready=True,
                )
            except grpc.RpcError as exc:
                if _wire.should_reauthenticate(exc, session, stale):
                    stale = session
                    continue
                if _wire.is_unavailable(exc) and await self._safe_to_repeat(op, deadline):
                    continue
                raise _wire.transport_error(exc) from None

    async def _safe_to_repeat(self, op: str | None, deadline: float | None) -> bool:
        if op is None:
            return True
        if self._idempotent is None:
            stub = self._ensure_stub()
            reply = await self._invoke(
                stub.Describe, pb.DescribeRequest(), _wire.remaining(deadline)
            )
            self._idempotent = _wire.idempotency(_wire.cards_from(reply))
        return self._idempotent.get(op, False)

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
