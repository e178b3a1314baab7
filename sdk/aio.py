"""`sdk.AsyncClient`: the asyncio client, same calls as `sdk.Client`, awaited."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import grpc

from sdk import _wire
from sdk._proto.soma.v1 import sidecar_pb2 as pb
from sdk._proto.soma.v1 import sidecar_pb2_grpc as pb_grpc
from sdk.client import DEFAULT_TIMEOUT, address_from_env
from sdk.types import FunctionMatch, Response


class AsyncClient:
    """One grpc.aio channel to the sidecar, opened on first use inside the running loop.

    grpc.aio channels belong to the event loop that creates them, so construction does no I/O
    and the channel is made by the first call (or by `async with`).
    """

    def __init__(self, target: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.target = target
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.SidecarAsyncStub | None = None

    @classmethod
    def from_env(cls, *, timeout: float | None = DEFAULT_TIMEOUT) -> AsyncClient:
        """A client for the sidecar named by `$SOMA_SIDECAR_ADDRESS`."""
        return cls(address_from_env(), timeout=timeout)

    def _ensure_stub(self) -> pb_grpc.SidecarAsyncStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=_wire.CHANNEL_OPTIONS)
            self._stub = pb_grpc.SidecarStub(self._channel)
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
        return _wire.response_from(await self._invoke(stub.Stimulate, request, timeout))

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

    async def _invoke(self, rpc: Any, request: Any, timeout: float | None) -> Any:
        deadline = timeout if timeout is not None else self.timeout
        try:
            return await rpc(request, timeout=deadline, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise _wire.transport_error(exc) from None

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
