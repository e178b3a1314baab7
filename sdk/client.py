"""`sdk.Client`: the blocking client an agent uses to call organs through the sidecar."""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import grpc

from sdk import _wire
from sdk._proto.soma.v1 import sidecar_pb2 as pb
from sdk._proto.soma.v1 import sidecar_pb2_grpc as pb_grpc
from sdk.errors import SomaError
from sdk.types import FunctionMatch, Response

ADDRESS_ENV = "SOMA_SIDECAR_ADDRESS"
DEFAULT_TIMEOUT = 30.0


def address_from_env() -> str:
    target = os.environ.get(ADDRESS_ENV)
    if not target:
        raise SomaError(
            f"{ADDRESS_ENV} is not set; is this process running under `soma supervise`?"
        )
    return target


class Client:
    """One channel to the sidecar, reused by every call. Use it as a context manager.

    `target` is a gRPC address such as `unix:///run/soma/rt/claims.sock`. Calls made while
    the sidecar is (re)starting wait for it, up to their deadline (`timeout` seconds, default
    30; None waits forever).
    """

    def __init__(self, target: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target, options=_wire.CHANNEL_OPTIONS)
        self._stub = pb_grpc.SidecarStub(self._channel)

    @classmethod
    def from_env(cls, *, timeout: float | None = DEFAULT_TIMEOUT) -> Client:
        """A client for the sidecar named by `$SOMA_SIDECAR_ADDRESS`."""
        return cls(address_from_env(), timeout=timeout)

    def stimulate(
        self,
        op: str,
        input: Any,
        context: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send one stimulus; returns what the organ answered, ok or not."""
        request = _wire.stimulate_request(op, input, context)
        return _wire.response_from(self._invoke(self._stub.Stimulate, request, timeout))

    def call(
        self,
        op: str,
        input: Any,
        context: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The organ's output; raises the typed `OrganError` when it answered `ok=false`."""
        response = self.stimulate(op, input, context, timeout)
        response.raise_for_error(op)
        return response.output

    def describe(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """The capability cards of the organs this channel may call."""
        return _wire.cards_from(self._invoke(self._stub.Describe, pb.DescribeRequest(), timeout))

    def search(
        self, query: str = "", tag: str | None = None, timeout: float | None = None
    ) -> list[FunctionMatch]:
        """Functions matching every word of `query` (and `tag`), best first."""
        request = pb.SearchRequest(query=query, tag=tag or "")
        return _wire.matches_from(self._invoke(self._stub.Search, request, timeout))

    def _invoke(self, rpc: Any, request: Any, timeout: float | None) -> Any:
        deadline = timeout if timeout is not None else self.timeout
        try:
            return rpc(request, timeout=deadline, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise _wire.transport_error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
