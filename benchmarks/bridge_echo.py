"""`tools/call` of `system.echo` through an MCP bridge instance, next to a bare `mcp` SDK
server answering the same call over the same transport (stateless Streamable HTTP, JSON
responses, uvicorn on loopback), measured in the same run in interleaved batches.

Both servers run in one server thread with its own event loop; the official Python client
runs in the main thread. The bridge authenticates an API key, checks the rate limit, derives
the tool list from the cards, validates, goes through the executive and writes an audit
event (JSON logs to /dev/null).

.venv/bin/python -m benchmarks.bridge_echo
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2
import mcp.types as types
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server

from sidecar.bridge import serve_bridges
from sidecar.bridge.instance import ReadyServer
from sidecar.bridge.keys import KeyStore
from sidecar.credentials import CredentialBroker
from sidecar.organs.system import SystemOrgan
from sidecar.vault.async_vault import AsyncVault
from sidecar.vault.open import open_vault
from soma_runtime import Executive
from soma_runtime.config import parse_config
from soma_runtime.listeners import tcp_listener
from soma_runtime.logs import configure_logging

PAYLOAD = {"data": "x" * 88}  # 100 bytes of JSON
BATCHES, PER_BATCH = 10, 200


def bare_server() -> Server[Any]:
    tool = types.Tool(name="system_echo", input_schema={"type": "object"})

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[tool])

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=json.dumps(params.arguments))],
            structured_content=params.arguments,
        )

    return Server("bare", on_list_tools=list_tools, on_call_tool=call_tool)


def serve_in_thread(tmp: Path) -> tuple[str, str, str, Callable[[], None]]:
    """Start both servers; returns the bare URL, the bridge URL, a key and a stop function."""
    config = parse_config(
        {
            "soma": {"state_dir": str(tmp / "state")},
            "bridge": [{"name": "bench", "expose": ["system.echo"]}],
        }
    )
    _, key = KeyStore(config.state_dir).create("bench")
    urls: dict[str, str] = {}
    started = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        sock = tcp_listener("127.0.0.1", 0)  # the bridge's kind of listener: a fair baseline
        app = bare_server().streamable_http_app(stateless_http=True)  # SSE, as the bridge
        bare = ReadyServer(uvicorn.Config(app, log_config=None, access_log=False))
        bare_task = asyncio.create_task(bare.serve(sockets=[sock]))
        urls["bare"] = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
        executive = Executive([SystemOrgan()])
        vault = AsyncVault(lambda: open_vault(config, durable=False))
        async with serve_bridges(config, executive, CredentialBroker([], vault)) as bridges:
            urls["bridge"] = bridges[0].url
            await bare.ready.wait()
            started.set()
            await stop.wait()
        bare.should_exit = True
        await bare_task
        await vault.close()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    started.wait(30)

    def halt() -> None:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)

    return urls["bare"], urls["bridge"], key, halt


async def measure(calls: dict[str, Callable[[], Awaitable[object]]]) -> dict[str, float]:
    """p50 in ms of each call: the median of each batch's p50, batches interleaved."""
    for call in calls.values():
        for _ in range(50):
            await call()
    p50s: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(BATCHES):
        for name, call in calls.items():
            times = []
            for _ in range(PER_BATCH):
                began = time.perf_counter()
                await call()
                times.append((time.perf_counter() - began) * 1000)
            p50s[name].append(statistics.median(times))
    return {name: statistics.median(values) for name, values in p50s.items()}


async def run(bare_url: str, bridge_url: str, key: str) -> dict[str, float]:
    async with (
        httpx2.AsyncClient() as bare_http,
        httpx2.AsyncClient(headers={"x-api-key": key}) as bridge_http,
        Client(streamable_http_client(bare_url, http_client=bare_http)) as bare,  # type: ignore[arg-type]
        Client(streamable_http_client(bridge_url, http_client=bridge_http)) as bridge,  # type: ignore[arg-type]
    ):
        return await measure(
            {
                "bare mcp SDK server (baseline)": lambda: bare.call_tool("system_echo", PAYLOAD),
                "system.echo via the bridge": lambda: bridge.call_tool("system_echo", PAYLOAD),
            }
        )


def main() -> None:
    with open("/dev/null", "w") as sink, tempfile.TemporaryDirectory() as raw:
        configure_logging("info", "json", sink)
        bare_url, bridge_url, key, halt = serve_in_thread(Path(raw))
        try:
            figures = asyncio.run(run(bare_url, bridge_url, key))
        finally:
            halt()
    baseline = next(iter(figures.values()))
    print("tools/call over Streamable HTTP, 100-byte payload     p50 ms   p50 / bare")
    for name, p50 in figures.items():
        print(f"  {name:<48} {p50:7.3f}   {p50 / baseline:6.2f}x")


if __name__ == "__main__":
    main()
