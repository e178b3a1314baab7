"""The calls a case makes, built from a plain description (a `Spec`) so that the driver and
the worker inside a supervised runtime build them the same way.

The bare clients use the SDK's channel options (`sdk.protocol.CHANNEL_OPTIONS`), so a baseline
differs from the SDK only in what the SDK and the sidecar do, not in how the channel is tuned.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import grpc
import httpx2

import sdk
from sdk.protocol import CHANNEL_OPTIONS
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from soma_bench.bare import STREAM_METHOD
from soma_bench.measure import Call, Case

BARE = ("raw", "bare_unary_sync", "bare_unary_aio", "bare_stream_aio", "http_direct")


class Spec(TypedDict, total=False):
    """A case as data. `transport` is the SDK's ("stream" or "unary"; absent: its default).
    Blocking clients (`bare_unary_sync`, `client`) are called from the event loop's thread
    itself, one call at a time, as a plain blocking agent would call them."""

    name: str
    kind: str
    baseline: str | None
    payload: int
    inflight: int
    op: str
    transport: str
    params: dict[str, Any]


@dataclass
class Endpoints:
    """Where the cases' servers are. `target`: a standalone sidecar's (its token is read from
    beside its socket); None: the SDK clients come from the runtime's environment
    (`from_env`), as in a supervised runtime."""

    bare_dir: Path
    bare_pid: int
    http_port: int
    sidecar_pid: int | None = None
    supervisor_pid: int | None = None
    target: str | None = None
    gateway: tuple[str, str] | None = None  # base URL and key handed to the runtime


def payload_of(size: int) -> dict[str, str]:
    """A JSON object whose encoding is `size` bytes: `{"data":"xxx..."}`."""
    return {"data": "x" * max(0, size - 11)}


def stat_path(pid: int) -> Path:
    return Path(f"/proc/{pid}/task")


class BareStream:
    """Calls multiplexed over one grpc.aio bidirectional stream by an 8-byte id: what a
    streaming client would be without anything Soma adds. One writer feeds the stream from a
    queue; one reader resolves the waiting calls by id."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._ids = itertools.count()
        method: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            STREAM_METHOD
        )
        self._call = method(self._frames())
        self._reader = asyncio.create_task(self._read())

    async def _frames(self) -> AsyncIterator[bytes]:
        while True:
            yield await self._queue.get()

    async def _read(self) -> None:
        async for frame in self._call:
            assert isinstance(frame, bytes)
            (call_id,) = struct.unpack_from("<Q", frame)
            self._waiting.pop(call_id).set_result(frame[8:])

    async def echo(self, data: bytes) -> bytes:
        call_id = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        self._queue.put_nowait(struct.pack("<Q", call_id) + data)
        return await future

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


async def build(spec: Spec, endpoints: Endpoints, stack: AsyncExitStack) -> Case:
    """The case `spec` describes, its clients connected and closed by `stack`."""
    kind = spec["kind"]
    size = spec.get("payload", 100)
    data = payload_of(size)
    raw = json.dumps(data, separators=(",", ":")).encode()
    op = spec.get("op", "system.echo")
    call: Call
    if kind == "raw":
        reader, writer = await asyncio.open_unix_connection(endpoints.bare_dir / "raw.sock")
        stack.callback(writer.close)

        async def call() -> object:
            writer.write(raw)
            return await reader.readexactly(len(raw))

    elif kind == "bare_unary_sync":
        channel = stack.enter_context(
            grpc.insecure_channel(f"unix://{endpoints.bare_dir / 'grpc.sock'}", CHANNEL_OPTIONS)
        )
        stimulate = pb_grpc.SidecarStub(channel).Stimulate
        request = pb.StimulateRequest(op=op, input_json=raw)

        async def call() -> object:
            return stimulate(request, timeout=30)

    elif kind in ("bare_unary_aio", "bare_stream_aio"):
        aio = grpc.aio.insecure_channel(
            f"unix://{endpoints.bare_dir / 'grpc.sock'}", options=CHANNEL_OPTIONS
        )
        stack.push_async_callback(aio.close)
        if kind == "bare_unary_aio":
            astimulate = pb_grpc.SidecarStub(aio).Stimulate
            request = pb.StimulateRequest(op=op, input_json=raw)

            async def call() -> object:
                return await astimulate(request, timeout=30)

        else:
            stream = BareStream(aio)
            stack.push_async_callback(stream.close)

            async def call() -> object:
                return await stream.echo(raw)

    elif kind == "client":
        transport = spec.get("transport", "stream")  # the SDK's default
        client = (
            sdk.Client(endpoints.target, transport=transport)
            if endpoints.target
            else sdk.Client.from_env(transport=transport)
        )
        stack.enter_context(client)

        async def call() -> object:
            return client.call(op, data)

    elif kind == "async_client":
        transport = spec.get("transport", "stream")  # the SDK's default
        aclient = (
            sdk.AsyncClient(endpoints.target, transport=transport)
            if endpoints.target
            else sdk.AsyncClient.from_env(transport=transport)
        )
        await stack.enter_async_context(aclient)

        async def call() -> object:
            return await aclient.call(op, data)

    elif kind in ("http_direct", "http_gateway"):
        http = stack.enter_context(httpx2.Client(trust_env=False, timeout=30))
        if kind == "http_direct":
            url = f"http://127.0.0.1:{endpoints.http_port}/v1/chat/completions"
            headers = {"Authorization": "Bearer sk-direct"}
        else:
            assert endpoints.gateway is not None, "the gateway case runs in a runtime"
            url = f"{endpoints.gateway[0]}/chat/completions"
            headers = {"Authorization": f"Bearer {endpoints.gateway[1]}"}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

        async def call() -> object:
            return http.post(url, headers=headers, json=body).raise_for_status()

    else:
        raise ValueError(f"unknown case kind {kind!r}")
    server = endpoints.bare_pid if kind in BARE else endpoints.sidecar_pid
    return Case(
        name=spec["name"],
        call=call,
        server=stat_path(server) if server else None,
        rss_pid=server,
        baseline=spec.get("baseline"),
        inflight=spec.get("inflight", 1),
        scale=max(1, size // 100_000),
        params={"kind": kind, "bare": kind in BARE, "payload": size, **spec.get("params", {})},
        supervisor=stat_path(endpoints.supervisor_pid)
        if endpoints.supervisor_pid and kind not in BARE
        else None,
    )
