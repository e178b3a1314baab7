"""`soma mcp stdio --bridge NAME`: what an MCP client launches to reach a bridge instance over
stdio.

It is an MCP stdio server (the `mcp` SDK) whose handlers forward each request to the running
instance's Streamable HTTP endpoint, authenticated with the key in `SOMA_BRIDGE_KEY` as a
Bearer token. Forwarding requests through the SDK on both sides, rather than relaying raw
JSON-RPC lines, lets each side negotiate its own protocol revision (a stdio client speaking
2025-11-25 meets an instance speaking 2026-07-28 and its per-request headers), and the
instance's guard, tool isolation, validation, idempotency and audit apply unchanged: the relay
adds no policy.

The relay outlives the sidecar it forwards to. The instance is stateless, so a restarted
sidecar serves the relay's next request like any other: each request is sent to the URL
published at that moment, and a sidecar that is down, or goes away during a call, fails only
that call, with a JSON-RPC error that says so (see `Upstream`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import mcp.types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

from sidecar.bridge.published import published_url
from sidecar.bridge.tools import META
from sidecar.upstream.session import leaf
from soma_cli.bridge import KEY_ENV
from soma_cli.errors import RUNTIME_FAILURE, CommandError
from soma_runtime import __version__

T = TypeVar("T")

# The MCP SDK's own timeouts for its HTTP client: a tool call may take minutes.
_TIMEOUT = httpx2.Timeout(30.0, read=300.0)
_WHY = "not started, or restarting"


class Upstream(httpx2.AsyncBaseTransport):
    """The relay's HTTP transport to the instance.

    Each request goes where the instance serves now: the URL its sidecar published, which a
    restarted sidecar may have changed. A sidecar that cannot be reached, or that goes away
    before answering, becomes that request's JSON-RPC error: raised, it would end the SDK's
    client for good, and the relay with it. The refusals met tell a refused key apart (the
    SDK reports a 401 as a bare "error response").
    """

    def __init__(self, runtime_dir: Path, bridge: str) -> None:
        self._runtime_dir, self.bridge = runtime_dir, bridge
        self._http = httpx2.AsyncHTTPTransport()
        self.refusals = 0  # answers that refused the key (401, 403), for the relay's life

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = published_url(self._runtime_dir, self.bridge)
        if url is None:
            return _failure(f"no sidecar serves bridge {self.bridge!r} ({_WHY})")
        target = httpx2.URL(url)
        if request.url != target:
            request.url = target
            request.headers["Host"] = target.netloc.decode("ascii")
        try:
            response = await self._http.handle_async_request(request)
        except (httpx2.ConnectError, httpx2.ConnectTimeout):  # nothing was sent
            return _failure(f"no sidecar answers for bridge {self.bridge!r} at {url} ({_WHY})")
        except httpx2.TransportError:
            return _failure(self.gone())
        if response.status_code in (401, 403):
            self.refusals += 1
        response.stream = _Ending(response.stream)
        return response

    async def aclose(self) -> None:
        await self._http.aclose()

    def gone(self) -> str:
        return (
            f"the sidecar serving bridge {self.bridge!r} went away before answering ({_WHY});"
            " whether the call ran is unknown"
        )

    def refused_since(self, mark: int = 0) -> bool:
        """Whether the key was refused since `refusals` read `mark` (ever, by default)."""
        return self.refusals > mark

    def refused(self) -> str:
        return f"bridge {self.bridge!r} refused {KEY_ENV} (unknown, expired or revoked key)"

    async def forward(self, call: Awaitable[T]) -> T:
        """`call`'s answer. A refused key, or a sidecar gone mid-call, becomes an error that
        says so; errors of the instance itself (an unknown tool...) and the relay's own (no
        sidecar answers) pass through as they are."""
        mark = self.refusals
        try:
            return await call
        except MCPError as exc:
            if self.refused_since(mark):
                raise MCPError(types.INTERNAL_ERROR, self.refused()) from None
            # The SDK's answer for a response stream that ended without the response.
            if exc.error.code == types.CONNECTION_CLOSED:
                raise MCPError(types.INTERNAL_ERROR, self.gone()) from None
            raise


class _Ending(httpx2.AsyncByteStream):
    """A body that ends, rather than raises, when the sidecar goes away mid-answer: the SDK
    then answers its request "stream ended" (`CONNECTION_CLOSED`), where an error raised
    while it reads the body of an error status would end its client."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except httpx2.TransportError:
            return

    async def aclose(self) -> None:
        await self._stream.aclose()


def _failure(message: str) -> httpx2.Response:
    """An answer as the instance would give an error: the SDK hands it to the caller."""
    error = {"code": types.INTERNAL_ERROR, "message": message}
    return httpx2.Response(502, json={"jsonrpc": "2.0", "id": None, "error": error})


@asynccontextmanager
async def _connect(
    bridge: str, runtime_dir: Path, url: str, key: str
) -> AsyncIterator[tuple[Client, Upstream]]:
    """A connected client of the instance; `CommandError` (exit 1) when nothing answers there
    or the instance refuses the key."""
    upstream = Upstream(runtime_dir, bridge)
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            httpx2.AsyncClient(
                transport=upstream,
                headers={"Authorization": f"Bearer {key}"},
                timeout=_TIMEOUT,
            )
        )
        try:
            client = await stack.enter_async_context(
                Client(streamable_http_client(url, http_client=http), mode="auto")
            )
        except Exception as exc:
            cause = leaf(exc)  # the SDK's task groups wrap what went wrong
            if upstream.refused_since():
                reason = upstream.refused()
            elif isinstance(cause, MCPError):
                reason = cause.error.message
            else:
                reason = f"bridge {bridge!r} at {url}: {type(cause).__name__}"
            raise CommandError(reason, RUNTIME_FAILURE) from None
        yield client, upstream


async def relay(bridge: str, runtime_dir: Path, url: str, key: str) -> None:
    """Serve MCP on stdin/stdout, forwarding every request to the instance (first at `url`)."""
    async with _connect(bridge, runtime_dir, url, key) as (client, upstream):

        async def list_tools(
            ctx: Any, params: types.PaginatedRequestParams | None
        ) -> types.ListToolsResult:
            cursor = params.cursor if params is not None else None
            return await upstream.forward(client.list_tools(cursor=cursor, cache_mode="bypass"))

        async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
            # Only our own `_meta` keys (the idempotency key) travel on: the reserved
            # `io.modelcontextprotocol/` ones describe this hop, not the next.
            meta = {k: v for k, v in (params.meta or {}).items() if k.startswith(META)}
            return await upstream.forward(
                client.call_tool(params.name, params.arguments, meta=meta or None)  # type: ignore[arg-type]
            )

        async def list_resources(
            ctx: Any, params: types.PaginatedRequestParams | None
        ) -> types.ListResourcesResult:
            cursor = params.cursor if params is not None else None
            return await upstream.forward(client.list_resources(cursor=cursor, cache_mode="bypass"))

        async def read_resource(
            ctx: Any, params: types.ReadResourceRequestParams
        ) -> types.ReadResourceResult:
            return await upstream.forward(
                client.read_resource(str(params.uri), cache_mode="bypass")
            )

        server: Server[Any] = Server(
            f"soma-{bridge}",
            version=__version__,
            on_list_tools=list_tools,
            on_call_tool=call_tool,
            on_list_resources=list_resources,
            on_read_resource=read_resource,
        )
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
