"""`sdk.Client`: the blocking client an agent uses to call organs through the sidecar."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from types import TracebackType
from typing import Any

import grpc

from sdk import _auth, _wire, protocol
from sdk._core import DEFAULT_TIMEOUT, Call, ClientCore, Retry, arguments_from_env
from sdk._stream import SyncStream
from sdk.errors import DeadlineExceeded
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

    `stimulate` and `call` travel on one multiplexed `Stream` RPC per client (about half the
    cost of a unary call); `transport="unary"` sends each as a unary `Stimulate` instead.
    `describe` and `search` are unary either way.
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
        self._lock = threading.Lock()  # sessions and streams are made under it
        self._channel = grpc.insecure_channel(target, options=protocol.CHANNEL_OPTIONS)
        self._stub = pb_grpc.SidecarStub(self._channel)
        self._stream: SyncStream | None = None
        self._retired: list[SyncStream] = []  # replaced, still answering calls in flight
        self._closed = False

    @classmethod
    def from_env(
        cls, *, timeout: float | None = DEFAULT_TIMEOUT, transport: str = "stream"
    ) -> Client:
        """The client of a supervised runtime: address, token and handshake socket from the
        environment `soma supervise` gives it ($SOMA_SIDECAR_ADDRESS, $SOMA_TOKEN_FD, ...)."""
        target, auth = arguments_from_env()
        client = cls(target, **auth, timeout=timeout, transport=transport)
        client._core.socket_promised()
        return client

    def stimulate(
        self,
        op: str,
        input: Any,
        context: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send one stimulus; returns what the organ answered, ok or not."""
        request = _wire.stimulate_request(op, input, context)
        if self._core.streaming:
            return _wire.response_from(self._on_stream(request, timeout, op))
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
                    metadata=core.attempt(call),
                    wait_for_ready=True,
                )
            except grpc.RpcError as exc:
                code, details = _wire.status_of(exc)
                self._retry(call, partial(core.after_failure, call, code), code, details)
                continue
            core.succeeded()
            return reply

    def _retry(
        self, call: Call, decide: Callable[[], Retry], code: grpc.StatusCode, details: str
    ) -> None:
        """Returns when the core says to send `call` again; raises its error otherwise."""
        retry = decide()
        if retry is Retry.ASK_CARDS:
            self._core.learn_cards(self.describe(timeout=call.remaining()))
            retry = decide()
        if retry is Retry.RAISE:
            raise _wire.transport_error(code, details) from None

    def _on_stream(
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
                stream = self._reopen(call)
            remaining = call.remaining()
            frame.timeout_s = remaining or 0.0  # the sidecar enforces the deadline too
            waiter = stream.send(frame)
            call.sent_with = stream.session
            if waiter is None:  # not sent: the stream ended or was retired meanwhile
                continue
            try:
                done = waiter.wait(remaining)
            except BaseException:  # interrupted: the sidecar need not finish it
                stream.abandon(frame.id)
                raise
            if not done and stream.abandon(frame.id):
                raise DeadlineExceeded("DEADLINE_EXCEEDED", "the call's deadline passed")
            if not done:  # answered as the deadline passed: the outcome is in the waiter
                waiter.wait(None)
            answer = waiter.answer
            if answer is None:  # the stream ended first
                if self._closed:
                    raise _wire.closed()
                code, details = core.stream_end_status(waiter.code, waiter.details, stream.accepted)
                decide = partial(core.after_stream_end, call, code, stream.session, stream.accepted)
            elif answer.WhichOneof("result") == "reply":
                core.succeeded()
                return answer.reply
            else:
                code, details = _wire.code_named(answer.error.code), answer.error.message
                if core.retires_stream(code):
                    stream.retire()
                decide = partial(core.after_failure, call, code)
            self._retry(call, decide, code, details)

    def _reopen(self, call: Call) -> SyncStream:
        """The client's stream, opened anew (with a fresh session) if it has ended."""
        core = self._core
        with self._lock:
            if self._closed:
                raise _wire.closed()
            stream = self._stream
            if stream is not None and stream.ended is None and not stream.retired:
                return stream
            for old in [s for s in self._retired if s.ended is not None]:
                old.close("replaced")  # ended already: this joins its reader thread
                self._retired.remove(old)
            if stream is not None:
                self._retired.append(stream)
                if pause := core.replace_stream(stream.session, stream.accepted):
                    time.sleep(min(pause, call.remaining() or pause))
            if core.needs_session(call):
                assert core.auth_socket is not None and core.token is not None
                core.session = _auth.handshake(core.auth_socket, core.token, call.deadline)
            self._stream = SyncStream(
                self._stub, core.metadata(), core.session, core.accept_timeout
            )
            return self._stream

    def close(self) -> None:
        """Ends the stream (calls still waiting on it raise `sdk.Unavailable`) and the
        channel; no thread is left behind."""
        with self._lock:
            self._closed = True
            streams = [*self._retired, *([self._stream] if self._stream else [])]
            self._stream, self._retired = None, []
        for stream in streams:
            stream.close("the client was closed")
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
