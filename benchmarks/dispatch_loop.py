"""The sidecar's own work per call, without gRPC: `Dispatcher.call` for `system.echo` with a
100-byte object in a hot loop, and its JSON steps alone.

.venv/bin/python -m benchmarks.dispatch_loop [--calls N] [--rounds N] [--profile]

What the Stream and unary Stimulate both do once a call is read: allow-list, strict JSON
decoding, validation, the executive and its SLO accounting, the organ, encoding and the reply
(the per-call log event is off, as by default). Each round times every step in turn; the
figures are the best and the median round. `--profile` prints cProfile's top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from collections.abc import Awaitable, Callable

import structlog
import uvloop

from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sidecar.access import AllowList, Channel
from sidecar.credentials import CredentialBroker
from sidecar.dispatch import Dispatcher
from sidecar.organs.system import SystemOrgan
from sidecar.wire import decode_input, encode_output
from soma_runtime import Executive
from soma_runtime.throttle import RepeatedWarnings

VALUE = {"data": "x" * 88}
PAYLOAD = json.dumps(VALUE).encode()  # 100 bytes of JSON


def dispatcher() -> Dispatcher:
    """A channel allowed `system.*` on an executive with the system organ; no vault is opened
    (echo asks for no credential)."""
    executive = Executive([SystemOrgan()])
    channel = Channel(name="bench", allow=AllowList(["system.*"]))
    broker = CredentialBroker([], None)  # type: ignore[arg-type]
    return Dispatcher(
        executive,
        channel,
        broker,
        max_input_depth=64,
        max_message_bytes=4 << 20,
        warnings=RepeatedWarnings(structlog.get_logger()),
        call_level=None,
    )


async def run(args: argparse.Namespace) -> None:
    core = dispatcher()
    request = pb.StimulateRequest(op="system.echo", input_json=PAYLOAD)

    async def call() -> None:
        await core.call(request)

    async def decode() -> None:
        decode_input(PAYLOAD, 64)

    async def encode() -> None:
        encode_output(VALUE)

    steps: dict[str, Callable[[], Awaitable[None]]] = {
        "Dispatcher.call": call,
        "decode_input": decode,
        "encode_output": encode,
    }
    for step in steps.values():  # warm-up
        for _ in range(2000):
            await step()
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            await call()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
        return
    rounds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.calls):
                await step()
            rounds[name].append((time.perf_counter() - started) / args.calls * 1e6)
    print(f"{'step (100 B echo)':<20}{'best µs':>9}{'median µs':>11}")
    for name, times in rounds.items():
        print(f"{name:<20}{min(times):9.2f}{statistics.median(times):11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
