"""The Stream against its baselines, with the same asyncio client code and interleaved batches.

.venv/bin/python -m benchmarks.stream [--batches N] [--per-batch N]

Three servers: a bare grpc.aio bidi stream that echoes frames multiplexed by id (the floor for
a stream), and `soma sidecar` serving `system.echo` over its Stream and over unary Stimulate.
Sequential calls (one in flight) give p50 and p90; then 32 calls in flight give throughput.
Each batch runs every path in turn, so machine noise hits them alike; the figures are medians
over batches, and ratios to the baselines of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import uvloop

from benchmarks.vault_and_gateway import cpu_seconds
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from tests.helpers import REPO, Process, session_metadata, start_sidecar, wait_until

PAYLOAD = json.dumps({"data": "x" * 88}).encode()  # 100 bytes of JSON
IN_FLIGHT = 32


class BareStream(pb_grpc.SidecarServicer):
    """Echoes each call under its id, in order, with nothing else."""

    async def Stream(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: Any
    ) -> AsyncIterator[pb.StreamResponse]:
        async for request in request_iterator:
            reply = pb.StimulateResponse(ok=True, output_json=request.call.input_json)
            yield pb.StreamResponse(id=request.id, reply=reply)


async def serve_bare(path: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_SidecarServicer_to_server(BareStream(), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    await server.wait_for_termination()


class Multiplexer:
    """The client side of a stream: calls by id, answers routed to their waiters."""

    def __init__(self, channel: grpc.aio.Channel, metadata: Any) -> None:
        self._rpc = pb_grpc.SidecarStub(channel).Stream(metadata=metadata)
        self._waiting: dict[int, asyncio.Future[pb.StreamResponse]] = {}
        self._next = 0
        self._writing = asyncio.Lock()  # grpc.aio writes must not interleave
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while (answer := await self._rpc.read()) is not grpc.aio.EOF:
            self._waiting.pop(answer.id).set_result(answer)

    async def call(self, request: pb.StimulateRequest) -> pb.StreamResponse:
        self._next += 1
        call_id = self._next
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = waiter
        async with self._writing:
            await self._rpc.write(pb.StreamRequest(id=call_id, call=request))
        return await waiter

    def close(self) -> None:
        self._reader.cancel()
        self._rpc.cancel()


Call = Callable[[], Awaitable[object]]


async def sequential(call: Call, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1e6)
    return times


async def concurrent(call: Call, count: int) -> float:
    """Calls per second with IN_FLIGHT calls kept in flight."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return count / (time.perf_counter() - started)


def quantile(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[int(len(ordered) * q)]


async def run(
    bare_target: str, target: str, pids: dict[str, int], args: argparse.Namespace
) -> None:
    metadata = session_metadata(target)
    request = pb.StimulateRequest(op="system.echo", input_json=PAYLOAD)
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with (
        grpc.aio.insecure_channel(bare_target, options=options) as bare_channel,
        grpc.aio.insecure_channel(target, options=options) as stream_channel,
        grpc.aio.insecure_channel(target, options=options) as unary_channel,
    ):
        bare = Multiplexer(bare_channel, ())
        stream = Multiplexer(stream_channel, metadata)
        unary = pb_grpc.SidecarStub(unary_channel).Stimulate
        paths: dict[str, Call] = {
            "bare bidi stream": lambda: bare.call(request),
            "sidecar Stream": lambda: stream.call(request),
            "sidecar unary": lambda: unary(request, metadata=metadata),
        }
        figures: dict[str, dict[str, list[float]]] = {
            name: {"p50": [], "p90": [], "rate": [], "cpu": []} for name in paths
        }
        for call in paths.values():  # warm-up
            await sequential(call, 200)
        for batch in range(args.batches):
            for name, call in paths.items():
                pid = pids["bare" if name.startswith("bare") else "sidecar"]
                cpu = cpu_seconds(pid)
                times = await sequential(call, args.per_batch)
                figures[name]["cpu"].append((cpu_seconds(pid) - cpu) * 1e6 / args.per_batch)
                figures[name]["p50"].append(quantile(times, 0.5))
                figures[name]["p90"].append(quantile(times, 0.9))
                figures[name]["rate"].append(await concurrent(call, args.per_batch * 4))
            print(f"batch {batch + 1}/{args.batches}", file=sys.stderr)
        bare.close()
        stream.close()
    med = {
        n: {k: statistics.median(v) if v else 0.0 for k, v in f.items()} for n, f in figures.items()
    }
    spread = {n: (min(f["p50"]), max(f["p50"])) for n, f in figures.items()}
    base_stream, base_unary = med["bare bidi stream"], med["sidecar unary"]
    print(
        f"{'path (100 B echo, asyncio client)':<36}{'p50 µs':>8}{'(min-max)':>14}{'p90 µs':>8}"
        f"{'calls/s @32':>12}{'server CPU µs':>14}{'p50/bare bidi':>14}{'p50/unary':>10}"
        f"{'rate/unary':>11}"
    )
    for name, m in med.items():
        low, high = spread[name]
        print(
            f"{name:<36}{m['p50']:8.0f}{f'({low:.0f}-{high:.0f})':>14}{m['p90']:8.0f}"
            f"{m['rate']:12.0f}{m['cpu']:14.0f}{m['p50'] / base_stream['p50']:14.2f}"
            f"{m['p50'] / base_unary['p50']:10.2f}{m['rate'] / base_unary['rate']:11.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=7)
    parser.add_argument("--per-batch", type=int, default=1000)
    parser.add_argument("--serve-bare", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        uvloop.run(serve_bare(args.serve_bare))
        return
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        (tmp / "bare").mkdir(mode=0o700)
        bare_path = tmp / "bare" / "stream.sock"
        bare = Process(
            [sys.executable, "-m", "benchmarks.stream", "--serve-bare", str(bare_path)],
            tmp / "bare.log",
            cwd=REPO,
        )
        sidecar, target = start_sidecar(tmp, ["system"])
        try:
            wait_until(bare_path.exists, 20, "the bare server")
            pids = {"bare": bare.pid, "sidecar": sidecar.pid}
            uvloop.run(run(f"unix://{bare_path}", target, pids, args))
        finally:
            sidecar.stop()
            bare.stop()


if __name__ == "__main__":
    main()
