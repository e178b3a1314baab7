"""The Stream RPC: many calls multiplexed by id on one bidirectional gRPC stream.

Each call frame runs as its own task through the channel's `Dispatcher` (the same work as
unary Stimulate) and is answered under its id as it completes, in any order. The task that
completes writes its answer itself unless another is writing, which then writes it too: one
writer at a time (grpc.aio writes must not interleave), without a hop to a writer task.

Memory is bounded per stream: a frame is read only when one of `max_in_flight` slots is free,
and a slot is freed once its call's answer has been written (not when the call ends), so a
client that sends without reading, or reads without end, stops being read and HTTP/2 flow
control pushes back on it; its calls and answers cannot pile up in the sidecar.

A stream is accepted (initial metadata with `protocol.STREAM_ACCEPTED`) before any frame is
read: a client that never saw that knows none of its calls ran (the SDK sends nothing before).

The stream ends with a status only for what concerns all its calls (see sidecar.proto):
UNAUTHENTICATED when the session it opened with is revoked (the call whose frame finds it so
is answered UNAUTHENTICATED, not run: only the calls in flight are cut off), INVALID_ARGUMENT
for a frame that is not a StreamRequest, UNAVAILABLE when the sidecar stops (after the calls
in flight are answered), and OK when the client half-closes and every call is answered. Calls
still running when it ends are cancelled. A call frame whose timeout_s is no duration
(negative, NaN, infinite) is answered INVALID_ARGUMENT: `timeout_s > 0` is false for NaN, which
would otherwise have read it as "no deadline"."""

from __future__ import annotations

import asyncio
import collections
import functools
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from sdk import protocol
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sidecar.dispatch import Dispatcher, Refusal

log = structlog.get_logger(component="sidecar")

Context = grpc.aio.ServicerContext[Any, Any]

_EXPIRED = Refusal(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's timeout_s expired")
_CANCELLED = Refusal(grpc.StatusCode.CANCELLED, "cancelled by the client")
_NOT_RUN = Refusal(grpc.StatusCode.UNAVAILABLE, "the sidecar is stopping; the call was not run")
_FAILED = Refusal(grpc.StatusCode.UNKNOWN, "the sidecar failed to run the call")
_SERVER_GONE = Refusal(grpc.StatusCode.UNAVAILABLE, "the channel's server stopped")
_REVOKED = Refusal(grpc.StatusCode.UNAUTHENTICATED, "the stream's session is no longer valid")
_UNDECODABLE = Refusal(
    grpc.StatusCode.INVALID_ARGUMENT,
    f"the request is not a valid {pb.StreamRequest.DESCRIPTOR.full_name}",
)
_STOPPING = Refusal(grpc.StatusCode.UNAVAILABLE, "the sidecar is stopping; reconnect")
_ACCEPTED = ((protocol.STREAM_ACCEPTED, "1"),)
_BAD_TIMEOUT = Refusal(
    grpc.StatusCode.INVALID_ARGUMENT,
    "timeout_s must be a finite number of seconds, at least 0 (0: no deadline)",
)
_NO_KIND = Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the frame has neither call nor cancel")


def _answer(call_id: int, outcome: pb.StimulateResponse | Refusal) -> pb.StreamResponse:
    if isinstance(outcome, Refusal):
        error = pb.CallError(code=outcome.code.name, message=outcome.message)
        return pb.StreamResponse(id=call_id, error=error)
    return pb.StreamResponse(id=call_id, reply=outcome)


class CallStream:
    """One open stream of one channel."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        context: Context,
        session_live: Callable[[], bool],
        max_in_flight: int,
    ) -> None:
        self._dispatcher = dispatcher
        self._context = context
        self._session_live = session_live
        self._slots = asyncio.Semaphore(max_in_flight)
        # Calls by id, from their frame until their answer is queued: an id in here is in
        # flight (a second call under it is refused) and its task can be cancelled. Freed
        # before the answer is written: a client may reuse an id as soon as it reads it.
        self._calls: dict[int, asyncio.Task[None]] = {}
        # Answers not yet written, each holding a slot (refusals of duplicates included).
        self._unwritten = 0
        self._outbox: collections.deque[pb.StreamResponse] = collections.deque()
        self._writing = False
        self._helpers: set[asyncio.Task[None]] = set()  # tasks that only write an answer
        self._half_closed = False
        self._draining = False
        self._ending: Refusal | None = None  # the status to end with, once decided
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed = False

    async def serve(self, requests: AsyncIterator[Any]) -> None:
        """Tell the client the stream is accepted, then read and run its calls until it
        ends; ends it with its status."""
        # Before any frame is read: a client that never saw this knows none of its calls ran.
        await self._context.send_initial_metadata(_ACCEPTED)
        reader = asyncio.create_task(self._read(requests))
        try:
            await self._done
        finally:
            self._closed = True
            reader.cancel()
            for task in (*self._calls.values(), *self._helpers):
                task.cancel()
        status = _STOPPING if self._draining else self._ending
        if status is not None:
            await self._context.abort(status.code, status.message)

    def drain(self) -> None:
        """The sidecar is stopping: answer the calls in flight, run no new one, then end
        with UNAVAILABLE."""
        self._draining = True
        if not self._unwritten:
            self._finish()

    def _finish(self, status: Refusal | None = None) -> None:
        if self._ending is None:
            self._ending = status
        if not self._done.done():
            self._done.set_result(None)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            await self._read_frames(requests)
        except grpc.aio.BaseError:
            # grpcio ended the RPC under the reader: most often the channel's server stopped
            # (its main loop crashed and the sidecar replaced it). The calls in flight were
            # cut off, as in a restart: UNAVAILABLE, which the SDK resends when it is safe.
            self._finish(_SERVER_GONE)
        except Exception:  # the stream must end, not hang with a dead reader
            log.exception("stream_read_failed")
            self._finish(_FAILED)

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
                    self._finish()
                return
            if type(request) is not pb.StreamRequest:  # what sidecar.server could not decode
                self._finish(_UNDECODABLE)
                return
            kind = request.WhichOneof("kind")
            call_id = request.id
            # Stopping clears the sessions: a call then is answered "not run", not refused.
            if not self._draining and not self._session_live():
                if kind == "call" and call_id not in calls:
                    # Told apart from the calls in flight, which the end cuts off: this one
                    # did not run, so the client may send it again with a new session.
                    self._unwritten += 1
                    await self._send(call_id, _REVOKED)
                self._finish(_REVOKED)
                return
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
                await self._send(call_id, _NO_KIND)
            elif call_id in calls:
                duplicate = Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT, f"call id {call_id} is already in flight"
                )
                await self._send(call_id, duplicate)
            elif self._draining:
                await self._send(call_id, _NOT_RUN)
            elif not 0.0 <= request.timeout_s < math.inf:  # NaN fails both
                await self._send(call_id, _BAD_TIMEOUT)
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
        del self._calls[call_id]
        await self._send(call_id, outcome)

    def _cancelled(self, call_id: int, task: asyncio.Task[None]) -> None:
        # Not when the stream is ending (nothing more is written) or when the organ finished
        # despite the cancellation (then its own answer was sent).
        if task.cancelled() and not self._closed:
            del self._calls[call_id]
            helper = asyncio.create_task(self._send(call_id, _CANCELLED))
            self._helpers.add(helper)
            helper.add_done_callback(self._helpers.discard)

    async def _send(self, call_id: int, outcome: pb.StimulateResponse | Refusal) -> None:
        """Write the answer, or leave it to the task writing already: one writer at a time
        (grpc.aio writes must not interleave), and no hop to a writer task when none is."""
        self._outbox.append(_answer(call_id, outcome))
        if self._writing:
            return
        self._writing = True
        outbox = self._outbox
        try:
            while outbox:
                await self._context.write(outbox.popleft())
                self._unwritten -= 1
                self._slots.release()
        except Exception:  # the RPC is over (the client went away): gRPC ends the handler
            log.debug("stream_write_failed", exc_info=True)
            return
        finally:
            self._writing = False
        if not self._unwritten and (self._half_closed or self._draining):
            self._finish()
