"""`tools/call` of `system.echo` through an MCP bridge instance, against a bare `mcp` SDK server
answering the same call over the same transport (stateless Streamable HTTP, uvicorn on
loopback).

Both servers run in one thread of the driver with its own event loop, and the official
Python client in the driver's loop; CPU per call is that server thread's (the bridge's
vault and logging threads aside), RSS the whole driver's. The bridge authenticates an API
key, checks the rate limit, validates, goes through the executive and writes an audit event
(JSON logs to /dev/null).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx2
import mcp.types as types
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server

from sidecar.bridge.instance import ReadyServer, serve_bridges
from sidecar.bridge.keys import KeyStore
from sidecar.credentials import CredentialBroker
from sidecar.organs.system import SystemOrgan
from sidecar.vault.async_vault import AsyncVault
from sidecar.vault.open import open_vault
from soma_bench.clients import payload_of
from soma_bench.deploy import BenchError
from soma_bench.measure import Case
from soma_runtime import Executive
from soma_runtime.config import parse_config
from soma_runtime.listeners import tcp_listener
from soma_runtime.logs import configure_logging

BARE = "mcp: bare SDK server"
BRIDGE = "mcp: tools/call via bridge"


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


class Servers:
    """Both servers in a thread: their URLs, the bridge's key, the thread's stat path."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(mode=0o700)
        self._sink = open(os.devnull, "w")  # noqa: SIM115 - closed by stop()
        configure_logging("info", "json", self._sink)
        config = parse_config(
            {
                "soma": {"state_dir": str(directory / "state")},
                "bridge": [{"name": "bench", "expose": ["system.echo"]}],
            }
        )
        _, self.key = KeyStore(config.state_dir).create("bench")
        self.urls: dict[str, str] = {}
        self.stat = Path()
        self._started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None

        async def main() -> None:
            self.stat = Path(f"/proc/{os.getpid()}/task/{threading.get_native_id()}")
            sock = tcp_listener("127.0.0.1", 0)  # the bridge's kind of listener
            app = bare_server().streamable_http_app(stateless_http=True)
            bare = ReadyServer(uvicorn.Config(app, log_config=None, access_log=False))
            bare_task = asyncio.create_task(bare.serve(sockets=[sock]))
            self.urls["bare"] = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
            vault = AsyncVault(lambda: open_vault(config, durable=False))
            executive = Executive([SystemOrgan()])
            async with serve_bridges(config, executive, CredentialBroker([], vault)) as bridges:
                self.urls["bridge"] = bridges[0].url
                await bare.ready.wait()
                self._started.set()
                await self._stop.wait()
            bare.should_exit = True
            await bare_task
            await vault.close()

        def run() -> None:
            try:
                self._loop.run_until_complete(main())
            except BaseException as exc:
                self._failure = exc
                self._started.set()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not self._started.wait(30) or self._failure is not None:
            raise BenchError(f"the MCP servers did not start: {self._failure!r}")

    async def cases(self, stack: AsyncExitStack, payload: int) -> list[Case]:
        data = payload_of(payload)
        bare_http = await stack.enter_async_context(httpx2.AsyncClient())
        bridge_http = await stack.enter_async_context(
            httpx2.AsyncClient(headers={"x-api-key": self.key})
        )
        bare = await stack.enter_async_context(
            Client(streamable_http_client(self.urls["bare"], http_client=bare_http))
        )
        bridge = await stack.enter_async_context(
            Client(streamable_http_client(self.urls["bridge"], http_client=bridge_http))
        )
        pid = os.getpid()
        return [
            Case(
                name=BARE,
                call=lambda: bare.call_tool("system_echo", data),
                server=self.stat,
                rss_pid=pid,
                params={"kind": "mcp", "bare": True, "payload": payload},
            ),
            Case(
                name=BRIDGE,
                call=lambda: bridge.call_tool("system_echo", data),
                server=self.stat,
                rss_pid=pid,
                baseline=BARE,
                params={"kind": "mcp", "bare": False, "payload": payload},
            ),
        ]

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._sink.close()
