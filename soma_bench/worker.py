"""The bench worker: a runtime `soma bench` starts under `soma supervise`, measuring from the
inside with `sdk.Client.from_env()` like any agent would.

    python -m soma_bench.worker CONTROL_SOCKET [--idle]

It makes one call (so its session and channel are up), connects to the driver's control
socket (Unix, JSON lines) and says so. An idle worker then only holds its connection, to
count as a connected runtime; the measuring one reads plans (a group of case specs, the
settings, where the servers are), measures them and answers with the results. Both leave
when the driver closes the control connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import uvloop

import sdk
from soma_bench.clients import Endpoints, build
from soma_bench.measure import Settings, run_group

GATEWAY_URL_ENV = "BENCH_BASE_URL"
GATEWAY_KEY_ENV = "BENCH_API_KEY"


async def measure(plan: dict[str, Any]) -> list[dict[str, Any]]:
    where = plan["endpoints"]
    gateway = (os.environ[GATEWAY_URL_ENV], os.environ[GATEWAY_KEY_ENV])
    endpoints = Endpoints(
        bare_dir=Path(where["bare_dir"]),
        bare_pid=where["bare_pid"],
        http_port=where["http_port"],
        sidecar_pid=where["sidecar_pid"],
        supervisor_pid=where["supervisor_pid"],
        gateway=gateway if GATEWAY_URL_ENV in os.environ else None,
    )
    async with AsyncExitStack() as stack:
        cases = [await build(spec, endpoints, stack) for spec in plan["specs"]]
        results = await run_group(plan["title"], cases, Settings(**plan["settings"]))
    return [result.as_dict() for result in results]


async def main(control: str, idle: bool) -> None:
    with sdk.Client.from_env() as client:
        client.call("system.echo", {})  # the session and the channel are up
        reader, writer = await asyncio.open_unix_connection(control)
        hello = {"runtime": os.environ.get("SOMA_RUNTIME", ""), "idle": idle}
        writer.write(json.dumps(hello).encode() + b"\n")
        while line := await reader.readline():
            if idle:
                continue
            try:
                answer: dict[str, Any] = {"results": await measure(json.loads(line))}
            except Exception as exc:  # the driver reports it; the runtime stays up
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], "--idle" in sys.argv[2:]))
