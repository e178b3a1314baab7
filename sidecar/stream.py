"""The Stream RPC: many calls multiplexed by id on one bidirectional gRPC stream.

Each call frame runs as its own task through the channel's `Dispatcher` (the same work as
unary Stimulate) and is answered under its id as it completes, in any order. One writer, the
RPC's own response generator, sends every answer: grpc.aio writes must not interleave.

Memory is bounded per stream: a frame is read only when one of `max_in_flight` slots is free,
and a slot is freed once its call's answer has been written (not when the call ends), so a
client that sends without reading, or reads without end, stops being read and HTTP/2 flow
control pushes back on it; its calls and answers cannot pile up in the sidecar.

The stream ends with a status only for what concerns all its calls (see sidecar.proto):
UNAUTHENTICATED when the session it opened with is revoked, INVALID_ARGUMENT for a frame that
is not a StreamRequest, UNAVAILABLE when the sidecar stops (after the calls in flight are
answered), and OK when the client half-closes and every call is answered. Calls still running
when it ends are cancelled.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sidecar.dispatch import Dispatcher, Refusal

log = structlog.get_logger(component="sidecar")

Context = grpc.aio.ServicerContext[Any, Any]

_EXPIRED = Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's timeout_s expired")
_CANCELLED = Refusal(grpc.StatusCode.CANCELLED, "cancelled by the client")
_NOT_RUN = Refusal(grpc.StatusCode.UNAVAILABLE, "the sidecar is stopping; the call was not run")
_FAILED = Refusal(grpc.StatusCode.UNKNOWN, "the sidecar failed to run the call")
_REVOKED = Refusal(grpc.StatusCode.UNAUTHENTICATED, "the stream's session is no longer valid")
_UNDECODABLE = Refusal(
    grpc.StatusCode.INVALID_ARGUMENT,
    f"the request is not a valid {pb.StreamRequest.DESCRIPTOR.full_name}",
)
_STOPPING = Refusal(grpc.StatusCode.UNAVAILABLE, "the sidecar is stopping; reconnect")
_NO_KIND = Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the frame has neither call nor cancel")


def _answer(call_id: int, outcome: pb.StimulateResponse | Refusal) -> pb.StreamResponse:
    if isinstance(outcome, Refusal):
        error = pb.CallError(code=outcome.code.name, message=outcome.message)
        return pb.StreamResponse(id=call_id, error=error)
    return pb.StreamResponse(id=call_id, reply=outcome)


class CallStream:
    """One open stream of one channel."""

    def __init__(
        self, dispatcher: Dispatcher, session_live: Callable[[], bool], max_in_flight: int
    ) -> None:
        self._dispatcher = dispatcher
        self._session_live = session_live
        self._slots = asyncio.Semaphore(max_in_flight)
        # Calls by id, from their frame until their answer is queued: an id in here is in
        # flight (a second call under it is refused) and its task can be cancelled. Freed
        # before the answer is written: a client may reuse an id as soon as it reads it.
        self._calls: dict[int, asyncio.Task[None]] = {}
        # Answers not yet written, each holding a slot (refusals of duplicates included).
        self._unwritten = 0
        # The answers to write, or None: stop writing.
        self._answers: asyncio.Queue[pb.StreamResponse | None] = asyncio.Queue()
        self._half_closed = False
        self._draining = False
        self._ending: Refusal | None = None  # the status to end with, once decided
        self._closed = False

    async def serve(
        self, requests: AsyncIterator[Any], context: Context
    ) -> AsyncIterator[pb.StreamResponse]:
        """The stream's answers; the only writer. Ends with the stream's status."""
        reader = asyncio.create_task(self._read(requests))
        answers = self._answers
        try:
            while (answer := await answers.get()) is not None:
                yield answer
                self._unwritten -= 1
                self._slots.release()
                if not self._unwritten and (self._half_closed or self._draining):
                    break
        finally:
            self._closed = True
            reader.cancel()
            for task in self._calls.values():
                task.cancel()
        if self._draining:
            await context.abort(_STOPPING.code, _STOPPING.message)
        if self._ending is not None:
            await context.abort(self._ending.code, self._ending.message)

    def drain(self) -> None:
        """The sidecar is stopping: answer the calls in flight, run no new one, then end
        with UNAVAILABLE."""
        self._draining = True
        if not self._unwritten:
            self._answers.put_nowait(None)

    def _end(self, status: Refusal | None) -> None:
        if self._ending is None:
            self._ending = status
        self._answers.put_nowait(None)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            await self._read_frames(requests)
        except Exception:  # the stream must end, not hang with a dead reader
            log.exception("stream_read_failed")
            self._end(_FAILED)

    async def _read_frames(self, requests: AsyncIterator[Any]) -> None:
        slots = self._slots
        calls = self._calls
        while True:
            await slots.acquire()  # no frame is read while every slot is taken
            try:
                request = await anext(requests)
            except StopAsyncIteration:
                self._half_closed = True
                if not self._unwritten:
                    self._end(None)
                return
            if type(request) is not pb.StreamRequest:  # what sidecar.server could not decode
                self._end(_UNDECODABLE)
                return
            if not self._session_live():
                self._end(_REVOKED)
                return
            kind = request.WhichOneof("kind")
            call_id = request.id
            if kind == "cancel":
                slots.release()
                task = calls.get(call_id)
                if task is not None and not task.done() and task.cancel():
                    # Answered once cancelled: a task cancelled before it started never
                    # runs its body, so the answer cannot come from inside it.
                    task.add_done_callback(functools.partial(self._cancelled, call_id))
                continue
            self._unwritten += 1
            if kind != "call":
                self._send(call_id, _NO_KIND, owns_id=False)
            elif call_id in calls:
                duplicate = Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT, f"call id {call_id} is already in flight"
                )
                self._send(call_id, duplicate, owns_id=False)
            elif self._draining:
                self._send(call_id, _NOT_RUN, owns_id=False)
            else:
                calls[call_id] = asyncio.create_task(
                    self._run(call_id, request.call, request.timeout_s)
                )

    async def _run(self, call_id: int, request: pb.StimulateRequest, timeout_s: float) -> None:
        outcome: pb.StimulateResponse | Refusal
        try:
            if timeout_s > 0.0:
                deadline = asyncio.timeout(timeout_s)
                try:
                    async with deadline:
                        outcome = await self._dispatcher.call(request)
                except TimeoutError:
                    if not deadline.expired():
                        raise
                    outcome = _EXPIRED
            else:
                outcome = await self._dispatcher.call(request)
        except Exception:
            log.exception("stream_call_failed", op=request.op)
            outcome = _FAILED
        self._send(call_id, outcome, owns_id=True)

    def _cancelled(self, call_id: int, task: asyncio.Task[None]) -> None:
        # Not when the stream is ending (nothing more is written) or when the organ finished
        # despite the cancellation (then its own answer was sent).
        if task.cancelled() and not self._closed:
            self._send(call_id, _CANCELLED, owns_id=True)

    def _send(self, call_id: int, outcome: pb.StimulateResponse | Refusal, owns_id: bool) -> None:
        """Queue the answer; `owns_id`: it answers the call registered under the id (not a
        refusal of a duplicate), whose id is then free again."""
        if owns_id:
            del self._calls[call_id]
        self._answers.put_nowait(_answer(call_id, outcome))
