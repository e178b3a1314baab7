"""`sdk.Client`: the blocking client an agent uses to call organs through the sidecar."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import grpc

from sdk import _auth, _wire
from sdk._core import DEFAULT_TIMEOUT, ClientCore, Retry, arguments_from_env
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from sdk.types import FunctionMatch, Response


class Client:
    """One channel to the sidecar, reused by every call; thread-safe. Use it as a context manager.

    `target` is a gRPC address such as `unix:///run/soma/rt/claims.sock`; `token` (or
    `token_file`) is the runtime's token. Calls made while the sidecar is (re)starting wait for
    it, up to their deadline (`timeout` seconds, default 30; None waits forever). A call cut off
    by a sidecar restart is sent again only when its function is idempotent; otherwise it
    raises `sdk.Unavailable`, because it may already have run.
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
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(target, options=_wire.CHANNEL_OPTIONS)
        self._stub = pb_grpc.SidecarStub(self._channel)

    @classmethod
    def from_env(cls, *, timeout: float | None = DEFAULT_TIMEOUT) -> Client:
        """The client of a supervised runtime: address, token and handshake socket from the
        environment `soma supervise` gives it ($SOMA_SIDECAR_ADDRESS, $SOMA_TOKEN_FD, ...)."""
        target, auth = arguments_from_env()
        return cls(target, **auth, timeout=timeout)

    def stimulate(
        self,
        op: str,
        input: Any,
        context: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send one stimulus; returns what the organ answered, ok or not."""
        request = _wire.stimulate_request(op, input, context)
        return _wire.response_from(self._invoke(self._stub.Stimulate, request, timeout, op))

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

    @property
    def target(self) -> str:
        return self._core.target

    @property
    def timeout(self) -> float | None:
        return self._core.timeout

    def _invoke(self, rpc: Any, request: Any, timeout: float | None, op: str | None = None) -> Any:
        """Call `rpc` with a session, sending it again when the core says it is safe."""
        core = self._core
        call = core.start(op, timeout)
        while True:
            if core.needs_session(call):
                with self._lock:
                    if core.needs_session(call):
                        assert core.auth_socket is not None and core.token is not None
                        core.session = _auth.handshake(core.auth_socket, core.token, call.deadline)
            try:
                reply = rpc(
                    request,
                    timeout=call.remaining(),
                    metadata=core.metadata(),
                    wait_for_ready=True,
                )
            except grpc.RpcError as exc:
                retry = core.after_failure(call, exc)
                if retry is Retry.ASK_CARDS:
                    core.learn_cards(self.describe(timeout=call.remaining()))
                    retry = core.after_failure(call, exc)
                if retry is Retry.RAISE:
                    raise _wire.transport_error(exc) from None
                continue
            core.succeeded()
            return reply

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
