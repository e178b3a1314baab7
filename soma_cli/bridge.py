"""`soma bridge keys create|list|revoke` and `soma mcp stdio`: MCP clients' access to the
bridge instances of the configuration.

`soma mcp stdio --bridge NAME` is what an MCP client launches for stdio. It is an MCP stdio
server (the `mcp` SDK) whose handlers forward each request to the running instance's
Streamable HTTP endpoint, authenticated with the key in `SOMA_BRIDGE_KEY` as a Bearer token.
Forwarding requests through the SDK on both sides, rather than relaying raw JSON-RPC lines,
lets each side negotiate its own protocol revision (a stdio client speaking 2025-11-25 meets
an instance speaking 2026-07-28 and its per-request headers), and the instance's guard, tool
isolation, validation, idempotency and audit apply unchanged: the relay adds no policy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from soma_cli.errors import RUNTIME_FAILURE, SETUP_ERROR, CommandError, load

if TYPE_CHECKING:
    import httpx2
    from mcp import Client

    from soma_runtime.bridge_config import BridgeSection
    from soma_runtime.config import SomaConfig

KEY_ENV = "SOMA_BRIDGE_KEY"
T = TypeVar("T")


def _section(config: SomaConfig, name: str) -> BridgeSection:
    """The `[[bridge]]` named `name`, with API keys on; else exit 2."""
    for section in config.bridge:
        if section.name == name:
            if not section.auth.api_keys:
                raise CommandError(f"bridge {name!r} has api_keys = false", SETUP_ERROR)
            return section
    known = ", ".join(b.name for b in config.bridge) or "none"
    raise CommandError(f"no [[bridge]] named {name!r} (configured: {known})", SETUP_ERROR)


def create_key(args: argparse.Namespace) -> int:
    """The key goes alone to stdout (so `> file` captures exactly it), the rest to stderr."""
    from sidecar.bridge.keys import KeyStore

    config = load(args.config)
    _section(config, args.bridge)
    if args.expires is not None and not 0 < args.expires <= 36500:
        raise CommandError("--expires: a number of days from 0 to 36500", SETUP_ERROR)
    info, key = KeyStore(config.state_dir).create(args.bridge, args.label, args.expires)
    expiry = f"expires {_when(info.expires)}" if info.expires is not None else "never expires"
    print(
        f"key {info.id} for bridge {info.bridge} ({expiry}); shown once, keep it now:",
        file=sys.stderr,
    )
    print(key)
    return 0


def list_keys(args: argparse.Namespace) -> int:
    from sidecar.bridge.keys import KeyStore

    config = load(args.config)
    keys = KeyStore(config.state_dir).list(args.bridge)
    now = time.time()
    rows = [
        {
            "id": k.id,
            "bridge": k.bridge,
            "label": k.label,
            "created": _when(k.created),
            "expires": _when(k.expires) if k.expires is not None else None,
            "status": "revoked"
            if k.revoked is not None
            else "expired"
            if k.expires is not None and k.expires <= now
            else "valid",
        }
        for k in keys
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("id", "bridge", "label", "created", "expires", "status")
    table = [tuple(c.upper() for c in columns)]
    table += [tuple(row[c] or "-" for c in columns) for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return 0


def revoke_key(args: argparse.Namespace) -> int:
    from sidecar.bridge.keys import KeyStore

    config = load(args.config)
    if not KeyStore(config.state_dir).revoke(args.key_id):
        raise CommandError(f"no valid key {args.key_id!r}", RUNTIME_FAILURE)
    print(f"key {args.key_id} revoked (a running sidecar refuses it within a second)")
    return 0


def _when(timestamp: float | None) -> str:
    assert timestamp is not None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def mcp_stdio(args: argparse.Namespace) -> int:
    import anyio

    from sidecar.bridge.published import published_url

    config = load(args.config)
    section = _section(config, args.bridge)
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise CommandError(
            f"{KEY_ENV} is not set: put one of bridge {section.name!r}'s API keys there"
            f" (`soma bridge keys create --bridge {section.name}`)",
            SETUP_ERROR,
        )
    url = published_url(config.runtime_dir, section.name)
    if url is None:
        raise CommandError(
            f"no sidecar serves bridge {section.name!r} (start it with `soma supervise`)",
            RUNTIME_FAILURE,
        )
    anyio.run(_relay, section.name, url, key)
    return 0


class _Upstream:
    """An MCP client of the instance at `url`, and the HTTP statuses it met: the SDK reports
    a 401 as a bare "error response", the status says why."""

    def __init__(self, bridge: str, url: str) -> None:
        self.bridge, self.url = bridge, url
        self.statuses: list[int] = []

    async def seen(self, response: httpx2.Response) -> None:
        self.statuses.append(response.status_code)

    def known(self, exc: BaseException, since: int = 0) -> str | None:
        """What went wrong in words when it is the key or a missing sidecar; never the key."""
        import httpx2

        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if {401, 403} & set(self.statuses[since:]):
            return f"bridge {self.bridge!r} refused {KEY_ENV} (unknown, expired or revoked key)"
        if isinstance(exc, httpx2.ConnectError):
            return f"no sidecar answers for bridge {self.bridge!r} at {self.url}"
        return None

    async def forward(self, call: Awaitable[T]) -> T:
        """`call`'s answer; a refused key or a gone sidecar becomes an error that says so,
        and errors of the instance itself (an unknown tool...) pass through as they are."""
        import mcp.types as types
        from mcp.shared.exceptions import MCPError

        since = len(self.statuses)
        try:
            return await call
        except Exception as exc:
            reason = self.known(exc, since)
            if reason is None:
                raise
            raise MCPError(types.INTERNAL_ERROR, reason) from None


@asynccontextmanager
async def _connect(bridge: str, url: str, key: str) -> AsyncIterator[tuple[Client, _Upstream]]:
    """A connected client of the instance; `CommandError` (exit 1) when nothing answers there
    or the instance refuses the key."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    upstream = _Upstream(bridge, url)
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            httpx2.AsyncClient(
                headers={"Authorization": f"Bearer {key}"},
                event_hooks={"response": [upstream.seen]},
            )
        )
        try:
            client = await stack.enter_async_context(
                Client(streamable_http_client(url, http_client=http), mode="auto")
            )
        except Exception as exc:
            reason = upstream.known(exc) or f"bridge {bridge!r} at {url}: {type(exc).__name__}"
            raise CommandError(reason, RUNTIME_FAILURE) from None
        yield client, upstream


async def _relay(bridge: str, url: str, key: str) -> None:
    import mcp.types as types
    from mcp.server import Server
    from mcp.server.stdio import stdio_server

    from sidecar.bridge.tools import META
    from soma_runtime import __version__

    async with _connect(bridge, url, key) as (client, upstream):

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
