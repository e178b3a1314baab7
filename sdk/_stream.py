"""One open `Stream` RPC: calls multiplexed by id, for the blocking and the asyncio client.

Each holds the calls sent on it by id; one reader resolves them as answers come (in any
order), and when the stream ends every call still on it learns the stream's status, which
`ClientCore.after_stream_end` turns into "send again on a new stream" or an error.

The blocking client's design, measured: a grpc (sync) stream fed by a queue of frames, and
one reader thread that resolves each caller's waiter by id. The other candidate, an asyncio loop
in a background thread driving a grpc.aio stream, was no faster at one call in flight (both
hop threads twice per call: the caller's frame to grpc's sending thread, the answer from the
reader thread back to the caller) and would be a second event loop in processes that also
run `sdk.AsyncClient` (grpc.aio supports one well: grpc/grpc#25364).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from sdk.protocol.soma.v1 import sidecar_pb2 as pb


class Waiter:
    """Where the reader thread leaves one call's outcome: a lock released once it is there
    (a bare lock is the cheapest wake-up between threads)."""

    __slots__ = ("_lock", "answer", "code", "details")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.answer: pb.StreamResponse | None = None
        self.code = grpc.StatusCode.OK  # the stream's status when it ended first
        self.details = ""

    def wait(self, timeout: float | None) -> bool:
        return self._lock.acquire(timeout=-1 if timeout is None else timeout)

    def answered(self, answer: pb.StreamResponse) -> None:
        self.answer = answer
        self._lock.release()

    def ended(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        self._lock.release()


class SyncStream:
    """A `Stream` RPC and the calls waiting on it. `ended` is None while it serves, then the
    status it ended with; `answered` whether it ever answered a call."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...], session: str | None):
        self.session = session
        self.answered = False
        self.ended: tuple[grpc.StatusCode, str] | None = None
        self._lock = threading.Lock()
        self._calls: dict[int, Waiter] = {}
        self._frames: queue.SimpleQueue[pb.StreamRequest | None] = queue.SimpleQueue()
        self._rpc = stub.Stream(self._outgoing(), metadata=metadata, wait_for_ready=True)
        self._reader = threading.Thread(target=self._read, name="soma-sdk-stream", daemon=True)
        self._reader.start()

    def _outgoing(self) -> Iterator[pb.StreamRequest]:
        """The frames, consumed by grpc's sending thread; None ends them (half-close)."""
        frames = self._frames
        while (frame := frames.get()) is not None:
            yield frame

    def send(self, frame: pb.StreamRequest) -> Waiter:
        """Send a call; its waiter is released by the answer or by the stream's end."""
        waiter = Waiter()
        with self._lock:
            if self.ended is not None:
                waiter.ended(*self.ended)
                return waiter
            self._calls[frame.id] = waiter
        self._frames.put(frame)
        return waiter

    def abandon(self, call_id: int) -> bool:
        """The caller gives up on a call (deadline, interrupt): the sidecar is asked to cancel
        it. False when its outcome is already in its waiter."""
        with self._lock:
            if self._calls.pop(call_id, None) is None:
                return False
            if self.ended is None:
                self._frames.put(pb.StreamRequest(id=call_id, cancel=True))
        return True

    def _read(self) -> None:
        calls = self._calls
        try:
            for answer in self._rpc:
                self.answered = True
                waiter = calls.pop(answer.id, None)
                if waiter is not None:  # None: a call given up on, answered anyway
                    waiter.answered(answer)
            status = (grpc.StatusCode.UNAVAILABLE, "the sidecar ended the stream")
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            status = (code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
                      details or "")  # fmt: skip
        self._end(*status)

    def _end(self, code: grpc.StatusCode, details: str) -> None:
        with self._lock:
            if self.ended is None:
                self.ended = (code, details)
            waiters = list(self._calls.values())
            self._calls.clear()
        self._frames.put(None)  # grpc's sending thread may be waiting for a frame
        for waiter in waiters:
            waiter.ended(*self.ended)

    def close(self, details: str) -> None:
        """End the stream now: waiting calls get CANCELLED with `details`; no thread is left."""
        self._end(grpc.StatusCode.CANCELLED, details)
        self._rpc.cancel()
        self._reader.join()


class AsyncStream:
    """The asyncio twin of `SyncStream`: futures instead of waiters, a reader task, and
    grpc.aio's own task consuming the frames (the one writer: grpc.aio writes must not
    interleave). A future's result is the call's answer, or None when the stream ended
    first (`ended` says how)."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...], session: str | None):
        self.session = session
        self.answered = False
        self.ended: tuple[grpc.StatusCode, str] | None = None
        self._loop = asyncio.get_running_loop()
        self._calls: dict[int, asyncio.Future[pb.StreamResponse | None]] = {}
        self._frames: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
        self._rpc = stub.Stream(self._outgoing(), metadata=metadata, wait_for_ready=True)
        self._reader = self._loop.create_task(self._read())

    async def _outgoing(self) -> AsyncIterator[pb.StreamRequest]:
        frames = self._frames
        while (frame := await frames.get()) is not None:
            yield frame

    def send(self, frame: pb.StreamRequest) -> asyncio.Future[pb.StreamResponse | None]:
        future: asyncio.Future[pb.StreamResponse | None] = self._loop.create_future()
        if self.ended is not None:
            future.set_result(None)
            return future
        self._calls[frame.id] = future
        self._frames.put_nowait(frame)
        return future

    def abandon(self, call_id: int) -> None:
        """The caller gave up on a call (deadline, task cancelled): the sidecar is asked to
        cancel it."""
        if self._calls.pop(call_id, None) is not None and self.ended is None:
            self._frames.put_nowait(pb.StreamRequest(id=call_id, cancel=True))

    async def _read(self) -> None:
        calls = self._calls
        status = (grpc.StatusCode.UNAVAILABLE, "the sidecar ended the stream")
        try:
            async for answer in self._rpc:
                self.answered = True
                future = calls.pop(answer.id, None)
                if future is not None and not future.done():
                    future.set_result(answer)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            status = (code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
                      details or "")  # fmt: skip
        except asyncio.CancelledError:  # the RPC was cancelled by `close`
            status = (grpc.StatusCode.CANCELLED, "the stream was closed")
        self._end(*status)

    def _end(self, code: grpc.StatusCode, details: str) -> None:
        if self.ended is None:
            self.ended = (code, details)
        for future in self._calls.values():
            if not future.done():
                future.set_result(None)
        self._calls.clear()
        self._frames.put_nowait(None)

    async def close(self, details: str) -> None:
        """End the stream now: waiting calls get CANCELLED with `details`; no task is left."""
        self._end(grpc.StatusCode.CANCELLED, details)
        self._rpc.cancel()
        await self._reader
