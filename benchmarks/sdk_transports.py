"""The SDK's transports side by side: `sdk.Client` / `sdk.AsyncClient` over the stream and over
unary, against `soma sidecar` and against a bare echo server (which shows what the SDK itself
adds), next to bare gRPC clients of that bare server. Every figure is measured in interleaved
rounds in one run and reported as a ratio to its baseline, because absolute times drift on a
shared machine.

.venv/bin/python -m benchmarks.sdk_transports [--rounds 5] [--calls 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

import sdk
from sdk import protocol
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from tests.helpers import REPO, Process, start_sidecar, wait_until

PAYLOAD = {"data": "x" * 88}  # 100 bytes of JSON
IN_FLIGHT = 32


class BareEcho(pb_grpc.SidecarServicer):
    """Echoes `input_json`, unary and on a stream multiplexed by id; nothing else."""

    async def Stimulate(self, request: pb.StimulateRequest, context: Any) -> pb.StimulateResponse:
        return pb.StimulateResponse(ok=True, output_json=request.input_json)

    async def Stream(
        self, requests: AsyncIterator[pb.StreamRequest], context: Any
    ) -> AsyncIterator[pb.StreamResponse]:
        async for frame in requests:
            reply = pb.StimulateResponse(ok=True, output_json=frame.call.input_json)
            yield pb.StreamResponse(id=frame.id, reply=reply)


async def serve(path: str) -> None:
    server = grpc.aio.server(options=protocol.CHANNEL_OPTIONS)
    pb_grpc.add_SidecarServicer_to_server(BareEcho(), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    await server.wait_for_termination()


def p50_us(times: list[float]) -> float:
    return statistics.median(times) * 1e6


def sequential(fn: Callable[[], object], calls: int, cpu: list[float]) -> float:
    """p50 µs of `calls` calls one after another; appends this process's CPU µs per call
    (every thread's, grpc's included: what the client costs, far less noisy than latency)."""
    times = []
    cpu_started = time.process_time()
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    cpu.append((time.process_time() - cpu_started) / calls * 1e6)
    return p50_us(times)


def threaded(fn: Callable[[], object], calls: int) -> float:
    """Calls per second with IN_FLIGHT threads calling at once."""
    per = max(1, calls // IN_FLIGHT)
    threads = [
        threading.Thread(target=lambda: [fn() for _ in range(per)]) for _ in range(IN_FLIGHT)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return per * IN_FLIGHT / (time.perf_counter() - started)


async def sequential_async(
    fn: Callable[[], Awaitable[object]], calls: int, cpu: list[float]
) -> float:
    times = []
    cpu_started = time.process_time()
    for _ in range(calls):
        started = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - started)
    cpu.append((time.process_time() - cpu_started) / calls * 1e6)
    return p50_us(times)


async def gathered(fn: Callable[[], Awaitable[object]], calls: int) -> float:
    """Calls per second with IN_FLIGHT tasks calling at once."""
    per = max(1, calls // IN_FLIGHT)

    async def worker() -> None:
        for _ in range(per):
            await fn()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return per * IN_FLIGHT / (time.perf_counter() - started)


class BareSyncStream:
    """The least a blocking client can do on a stream: one call at a time, no reader thread."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._frames: queue.SimpleQueue[pb.StreamRequest | None] = queue.SimpleQueue()
        self._answers: Iterator[pb.StreamResponse] = pb_grpc.SidecarStub(channel).Stream(
            iter(self._frames.get, None)
        )
        self._id = 0

    def __call__(self, request: pb.StimulateRequest) -> pb.StreamResponse:
        self._id += 1
        self._frames.put(pb.StreamRequest(id=self._id, call=request))
        return next(self._answers)

    def close(self) -> None:
        self._frames.put(None)


Row = dict[str, list[float]]


def blocking_rows(bare: str, sidecar: str, rounds: int, calls: int) -> tuple[Row, Row, Row]:
    request = pb.StimulateRequest(op="system.echo", input_json=json.dumps(PAYLOAD).encode())
    latency: Row = {}
    throughput: Row = {}
    cpu: Row = {}
    with grpc.insecure_channel(bare, options=protocol.CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.SidecarStub(channel)
        bare_stream = BareSyncStream(channel)
        clients = {
            "sdk stream -> sidecar": sdk.Client(sidecar),
            "sdk unary -> sidecar": sdk.Client(sidecar, transport="unary"),
            "sdk stream -> bare": sdk.Client(bare),
            "sdk unary -> bare": sdk.Client(bare, transport="unary"),
        }
        paths: dict[str, Callable[[], object]] = {
            "bare unary (sync stub)": lambda: stub.Stimulate(request),
            "bare stream (sync, 1 in flight)": lambda: bare_stream(request),
            **{
                name: (lambda c=client: c.call("system.echo", PAYLOAD))
                for name, client in clients.items()
            },
        }
        for fn in paths.values():
            sequential(fn, 200, [])  # warm up
        for round_ in range(rounds):
            for name, fn in paths.items():
                latency.setdefault(name, []).append(sequential(fn, calls, cpu.setdefault(name, [])))
                if name != "bare stream (sync, 1 in flight)":
                    throughput.setdefault(name, []).append(threaded(fn, calls))
            print(f"  blocking round {round_ + 1}/{rounds}", file=sys.stderr)
        bare_stream.close()
        for client in clients.values():
            client.close()
    return latency, throughput, cpu


async def async_rows(bare: str, sidecar: str, rounds: int, calls: int) -> tuple[Row, Row, Row]:
    request = pb.StimulateRequest(op="system.echo", input_json=json.dumps(PAYLOAD).encode())
    latency: Row = {}
    throughput: Row = {}
    cpu: Row = {}
    async with grpc.aio.insecure_channel(bare, options=protocol.CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.SidecarStub(channel)
        bare_stream = stub.Stream()
        ids = iter(range(1, 1 << 62))

        async def bare_stream_call() -> object:
            await bare_stream.write(pb.StreamRequest(id=next(ids), call=request))
            return await bare_stream.read()

        clients = {
            "sdk stream -> sidecar": sdk.AsyncClient(sidecar),
            "sdk unary -> sidecar": sdk.AsyncClient(sidecar, transport="unary"),
            "sdk stream -> bare": sdk.AsyncClient(bare),
            "sdk unary -> bare": sdk.AsyncClient(bare, transport="unary"),
        }
        paths: dict[str, Callable[[], Awaitable[object]]] = {
            "bare unary (grpc.aio stub)": lambda: stub.Stimulate(request),
            "bare stream (grpc.aio, 1 in flight)": bare_stream_call,
            **{
                name: (lambda c=client: c.call("system.echo", PAYLOAD))
                for name, client in clients.items()
            },
        }
        for fn in paths.values():
            await sequential_async(fn, 200, [])
        for round_ in range(rounds):
            for name, fn in paths.items():
                p50 = await sequential_async(fn, calls, cpu.setdefault(name, []))
                latency.setdefault(name, []).append(p50)
                if "1 in flight" not in name:
                    throughput.setdefault(name, []).append(await gathered(fn, calls))
            print(f"  asyncio round {round_ + 1}/{rounds}", file=sys.stderr)
        await bare_stream.done_writing()
        for client in clients.values():
            await client.close()
    return latency, throughput, cpu


def table(title: str, latency: Row, throughput: Row, cpu: Row, baseline: str) -> None:
    base_p50 = statistics.median(latency[baseline])
    base_rate = statistics.median(throughput[baseline])
    print(
        f"\n{title}: p50 µs (min-max of round medians), client CPU µs per call (all its"
        f" threads), calls/s at {IN_FLIGHT} in flight"
    )
    print(
        f"  {'path':<38} {'p50':>6} {'spread':>10} {'p50/base':>8} {'cpu':>5}"
        f" {'calls/s':>8} {'x base':>6}"
    )
    for name, values in latency.items():
        p50 = statistics.median(values)
        spread = f"{min(values):.0f}-{max(values):.0f}"
        line = f"  {name:<38} {p50:6.0f} {spread:>10} {p50 / base_p50:7.2f}x"
        line += f" {statistics.median(cpu[name]):5.0f}"
        if name in throughput:
            rate = statistics.median(throughput[name])
            line += f" {rate:8.0f} {rate / base_rate:5.2f}x"
        print(line)


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        import uvloop

        uvloop.run(serve(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        (tmp / "bare").mkdir(mode=0o700)
        bare_path = tmp / "bare" / "echo.sock"
        bare = Process(
            [sys.executable, "-m", "benchmarks.sdk_transports", "serve", str(bare_path)],
            tmp / "bare.log",
            cwd=REPO,
        )
        sidecar, target = start_sidecar(tmp, ["system"])
        try:
            wait_until(bare_path.exists, 20, "the bare server")
            bare_target = f"unix://{bare_path}"
            sync = blocking_rows(bare_target, target, args.rounds, args.calls)
            aio = asyncio.run(async_rows(bare_target, target, args.rounds, args.calls))
        finally:
            sidecar.stop()
            bare.stop()
    table("sdk.Client (blocking)", *sync, baseline="bare unary (sync stub)")
    table("sdk.AsyncClient", *aio, baseline="bare unary (grpc.aio stub)")


if __name__ == "__main__":
    main()
