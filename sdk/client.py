"""`sdk.Client`: the blocking client an agent uses to call organs through the sidecar."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import grpc

from sdk import _auth, _wire
from sdk._proto.soma.v1 import sidecar_pb2 as pb
from sdk._proto.soma.v1 import sidecar_pb2_grpc as pb_grpc
from sdk.errors import SomaError
from sdk.types import FunctionMatch, Response

ADDRESS_ENV = "SOMA_SIDECAR_ADDRESS"
DEFAULT_TIMEOUT = 30.0


def arguments_from_env() -> tuple[str, dict[str, str | None]]:
    """The target, and the token and handshake socket, that `soma supervise` gives a runtime,
    as arguments for `Client` and `AsyncClient`."""
    target = os.environ.get(ADDRESS_ENV)
    if not target:
        raise SomaError(
            f"{ADDRESS_ENV} is not set; is this process running under `soma supervise`?"
        )
    auth = {"token": _auth.token_from_env(), "auth_socket": os.environ.get(_auth.AUTH_SOCKET_ENV)}
    return target, auth


class ClientAuth:
    """How a client proves who it is: a token, exchanged on the handshake socket for a session.

    Without an explicit token, a token file beside the socket (`<name>.token`, which only the
    sidecar's user can read) is used when there is one: that is how `soma sidecar` run on its
    own hands out access.
    """

    def __init__(
        self, target: str, token: str | None, token_file: str | None, auth_socket: str | None
    ) -> None:
        path = _auth.socket_path(target)
        if token is None and token_file is not None:
            token = _auth.read_token_file(token_file)
        if token is None and path is not None and os.path.exists(_auth.token_file_for(path)):
            token = _auth.read_token_file(_auth.token_file_for(path))
        self.token = token
        self.auth_socket = auth_socket or (_auth.auth_socket_for(path) if path else None)


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
        self.target = target
        self.timeout = timeout
        self._auth = ClientAuth(target, token, token_file, auth_socket)
        self._session: str | None = None
        self._idempotent: dict[str, bool] | None = None
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

    def _session_for(self, deadline: float | None, stale: str | None) -> str | None:
        """The current session, making a new one when there is none or it went `stale`."""
        auth = self._auth
        if auth.token is None or auth.auth_socket is None:
            return None
        with self._lock:
            if self._session is None or self._session == stale:
                self._session = _auth.handshake(auth.auth_socket, auth.token, deadline)
            return self._session

    def _invoke(self, rpc: Any, request: Any, timeout: float | None, op: str | None = None) -> Any:
        """Call `rpc` with a session; `op` None marks a call that is always safe to repeat."""
        deadline = _wire.deadline_after(timeout if timeout is not None else self.timeout)
        stale: str | None = None
        while True:
            session = self._session_for(deadline, stale)
            metadata = _wire.bearer(session) if session else ()
            try:
                return rpc(
                    request,
                    timeout=_wire.remaining(deadline),
                    metadata=metadata,
                    wait_for_ready=True,
                )
            except grpc.RpcError as exc:
                if _wire.should_reauthenticate(exc, session, stale):
                    stale = session  # refused before anything ran: safe to send again
                    continue
                if _wire.is_unavailable(exc) and self._safe_to_repeat(op, deadline):
                    continue
                raise _wire.transport_error(exc) from None

    def _safe_to_repeat(self, op: str | None, deadline: float | None) -> bool:
        if op is None:
            return True
        if self._idempotent is None:
            reply = self._invoke(
                self._stub.Describe, pb.DescribeRequest(), _wire.remaining(deadline)
            )
            self._idempotent = _wire.idempotency(_wire.cards_from(reply))
        return self._idempotent.get(op, False)

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
