"""Bridge instances: one MCP server per `[[bridge]]` table, each on its own port with only
its own tools, served with the `mcp` SDK's Streamable HTTP machinery under uvicorn.

Stateless: no session is kept between requests, so any number of bridge processes can sit
behind one balancer. The SDK answers both protocol eras: 2026-07-28 (`server/discover`, no
sessions) and the `initialize` handshake of 2025-11-25 / 2025-06-18.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mcp.types as types
import structlog
import uvicorn
from mcp.server import Server
from mcp.server.streamable_http import REQUEST_CANCELLED
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ToolsListChanged
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError

from sidecar.bridge.calls import Principal, ToolCalls, audit, error_result
from sidecar.bridge.cancels import InFlight
from sidecar.bridge.discovery import (
    CALL_TOOL,
    CALL_TOOL_TOOL,
    SEARCH_TOOL,
    SEARCH_TOOLS,
    call_target,
)
from sidecar.bridge.guard import PRINCIPAL, Guard
from sidecar.bridge.keys import KeyCache, KeyCounts, KeyStore
from sidecar.bridge.names import tool_name
from sidecar.bridge.oauth import Jwks, TokenVerifier
from sidecar.bridge.published import publish
from sidecar.bridge.tools import Exposure, effects, to_tool
from sidecar.credentials import CredentialBroker
from sidecar.http_server import EmbeddedServer, HttpLimits, bounded_http
from sidecar.wire import encode_output
from soma_runtime import ErrorKind, Executive, FunctionCard, Response, __version__, tracing
from soma_runtime.bridge_config import BridgeSection
from soma_runtime.card_files import function_to_json
from soma_runtime.config import ConfigError, SomaConfig
from soma_runtime.gateway_sockets import bridge_listener
from soma_runtime.tracing import CallSpan, new_trace
from soma_runtime.validation import InputValidator

log = structlog.get_logger(component="bridge")

MCP_PATH = "/mcp"
CARD_URI = "soma://cards/"  # + function name: the function's card as JSON
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


@dataclass(frozen=True, slots=True)
class RunningBridge:
    name: str
    url: str
    port: int


class BridgeTools:
    """One instance's MCP handlers: its tools, derived from the cards at each request."""

    def __init__(
        self, section: BridgeSection, executive: Executive, broker: CredentialBroker
    ) -> None:
        self._bridge = section.name
        self._executive = executive
        self._search = section.discovery == "search"
        self.exposure = Exposure(section)
        self._calls = ToolCalls(section.name, frozenset(section.credentials), executive, broker)
        self.in_flight = InFlight()
        self._validators = {
            tool.name: InputValidator(tool.input_schema) for tool in (SEARCH_TOOL, CALL_TOOL_TOOL)
        }

    def _functions(self) -> list[FunctionCard]:
        return [card for _, card in self._executive.list_functions()]

    def target(
        self, tool: str, arguments: dict[str, Any]
    ) -> tuple[str, FunctionCard, dict[str, Any]] | None:
        """The exposed function a `tools/call` reaches (directly, or through `call_tool` in
        search mode), with its tool name and arguments; None when it reaches none."""
        if self._search:
            if tool != CALL_TOOL or self._validators[CALL_TOOL].first_error(arguments):
                return None
            tool, arguments = call_target(arguments)
        card = self.exposure.resolve(tool, self._functions())
        return (tool, card, arguments) if card is not None else None

    def write_card(self, tool: str, arguments: dict[str, Any]) -> FunctionCard | None:
        """The card of an exposed function that is not read-only (write scopes apply)."""
        found = self.target(tool, arguments)
        return found[1] if found is not None and not effects(found[1]).read_only else None

    async def list_tools(
        self, ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        if self._search:
            return types.ListToolsResult(tools=[SEARCH_TOOL, CALL_TOOL_TOOL])
        tools = self.exposure.tools(self._functions())
        return types.ListToolsResult(tools=[to_tool(name, card) for name, card in tools])

    async def call_tool(
        self, ctx: Any, params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        principal = ctx.request.scope["state"][PRINCIPAL]
        arguments = dict(params.arguments or {})
        if self._search and params.name in self._validators:
            problem = self._validators[params.name].first_error(arguments)
            if problem is not None:
                return error_result(
                    Response.failure(
                        ErrorKind.INVALID_INPUT, path=problem.path, message=problem.message
                    )
                )
            if params.name == SEARCH_TOOLS:
                return self._search_tools(arguments, principal)
        found = self.target(params.name, arguments)
        # The same answer for a tool that does not exist and one this instance does not
        # expose, whatever the spelling: nothing reveals the other instances' tools.
        if found is None and self._search and params.name == CALL_TOOL:
            # `call_tool` itself exists: the function it names is what is unknown, and the
            # model can search again.
            return error_result(
                Response.failure(
                    ErrorKind.UNSUPPORTED_OPERATION,
                    tool=arguments["name"],
                    message=f"no such tool here: find tools with {SEARCH_TOOLS}",
                )
            )
        if found is None:
            raise MCPError(types.INVALID_PARAMS, f"unknown tool: {params.name}")
        tool, card, arguments = found
        # The trace to join: `_meta.traceparent` (where the MCP SDK puts it, SEP-414), else
        # the HTTP header; either only when valid.
        parent = tracing.incoming(
            (params.meta or {}).get(tracing.TRACEPARENT),
            ctx.request.headers.get(tracing.TRACEPARENT),
        )
        call = self._calls.call(tool, card, arguments, params.meta, principal, parent)
        result = await self.in_flight.run(principal.id, ctx.request_id, call)
        if result is None:
            # What the SDK answers a cancelled request on the 2025-era wire; the client has
            # stopped waiting for it.
            raise MCPError(REQUEST_CANCELLED, "Request cancelled")
        return result

    async def list_resources(
        self, ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        """The card of each exposed function, as a resource (in search mode too)."""
        return types.ListResourcesResult(
            resources=[
                types.Resource(
                    name=card.name,
                    uri=CARD_URI + card.name,
                    description=card.description,
                    mime_type="application/json",
                )
                for card in sorted(self._exposed(), key=lambda c: c.name)
            ]
        )

    async def read_resource(
        self, ctx: Any, params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)
        card = next((c for c in self._exposed() if CARD_URI + c.name == uri), None)
        if card is None:  # not exposed and missing look alike
            raise MCPError(types.INVALID_PARAMS, f"unknown resource: {uri}")
        text = function_to_json(card)
        return types.ReadResourceResult(
            contents=[types.TextResourceContents(uri=uri, mime_type="application/json", text=text)]
        )

    def _exposed(self) -> list[FunctionCard]:
        return [card for card in self._functions() if self.exposure.exposes(card)]

    def _search_tools(
        self, arguments: dict[str, Any], principal: Principal
    ) -> types.CallToolResult:
        started = time.perf_counter()
        matches = self._executive.search_functions(arguments["query"], arguments.get("tag"))
        form = self.exposure.form
        named = ((tool_name(card.name, form), card) for _, card in matches)
        found = [
            to_tool(name, card).model_dump(mode="json", by_alias=True, exclude_none=True)
            for name, card in named
            if name is not None and self.exposure.exposes(card)
        ][: arguments.get("limit", 10)]
        output = {"tools": found}
        audit(
            self._bridge,
            principal,
            SEARCH_TOOLS,
            SEARCH_TOOLS,
            "ok",
            started,
            CallSpan(new_trace()),
        )
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=encode_output(output).decode())],
            structured_content=output,
        )


def build_app(
    section: BridgeSection,
    executive: Executive,
    broker: CredentialBroker,
    keys: KeyCache | None,
    resource_url: str,
    jwks_source: str | None,
    max_input_depth: int,
) -> Guard:
    """The ASGI app of one instance: the guard in front of the SDK's Streamable HTTP app."""
    tools = BridgeTools(section, executive, broker)
    # Tools list-changed events for 2026-07-28 clients (`subscriptions/listen`): whenever an
    # organ's functions change (an upstream MCP server's tools), every listening client of
    # every instance hears it and lists again (what it may see is decided per instance then).
    changes = InMemorySubscriptionBus()
    publishing: set[asyncio.Task[None]] = set()

    def changed() -> None:  # the executive calls it from the event loop's thread
        task = asyncio.get_running_loop().create_task(changes.publish(ToolsListChanged()))
        publishing.add(task)
        task.add_done_callback(publishing.discard)

    executive.on_change(changed)
    server: Server[Any] = Server(
        f"soma-{section.name}",
        version=__version__,
        on_list_tools=tools.list_tools,
        on_call_tool=tools.call_tool,
        on_list_resources=tools.list_resources,
        on_read_resource=tools.read_resource,
        on_subscriptions_listen=CallerStreams(
            ListenHandler(changes, max_subscriptions=section.max_listen_streams),
            section.max_listen_streams_per_caller,
        ),
    )
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,
        # SSE answers: a listen request's answer is the stream of its events.
        json_response=False,
        max_request_body_size=section.max_request_bytes,
        transport_security=_transport_security(section, resource_url),
    )
    oauth = section.auth.oauth
    verifier = None
    if oauth is not None:
        assert jwks_source is not None
        verifier = TokenVerifier(
            oauth, resource_url, Jwks(jwks_source, oauth.jwks_refresh_interval)
        )
    return Guard(
        app,
        section,
        resource_url,
        keys=keys if section.auth.api_keys else None,
        verifier=verifier,
        writes=tools.write_card,
        max_input_depth=max_input_depth,
        cancel=tools.in_flight.cancel,
    )


class CallerStreams:
    """`subscriptions/listen` with at most `per_caller` streams open per API key or token
    subject (the SDK's handler bounds the instance's), so that one caller cannot hold every
    stream, nor the connections they keep."""

    def __init__(self, handler: ListenHandler, per_caller: int) -> None:
        self._handler = handler
        self._per_caller = per_caller
        self._open: Counter[str] = Counter()

    async def __call__(
        self, ctx: Any, params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        caller = ctx.request.scope["state"][PRINCIPAL].id
        if self._open[caller] >= self._per_caller:
            # The code the SDK's handler answers when the instance's streams are all taken.
            raise MCPError(
                types.INTERNAL_ERROR,
                f"too many listen streams open for this caller (at most {self._per_caller}); "
                "close one, or retry later",
            )
        self._open[caller] += 1
        try:
            return await self._handler(ctx, params)
        finally:
            self._open[caller] -= 1
            if not self._open[caller]:
                del self._open[caller]


def _transport_security(section: BridgeSection, resource_url: str) -> TransportSecuritySettings:
    """DNS-rebinding protection: only our own Host names and Origins are accepted."""
    host = section.host
    ip = ipaddress.ip_address(host)
    shown = f"[{host}]" if ip.version == 6 else host
    hosts = list(_LOOPBACK_HOSTS) if ip.is_loopback else [shown]
    public = resource_url.split("/")[2]  # the netloc of the resource URL
    allowed_hosts = [f"{h}:*" for h in hosts] + [public]
    allowed_origins = [f"http://{h}:*" for h in hosts] + [f"{resource_url.split('/')[0]}//{public}"]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=allowed_hosts,
        allowed_origins=allowed_origins,
    )


class ReadyServer(EmbeddedServer):
    """uvicorn in the sidecar's loop, telling when it has started."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


def _check(config: SomaConfig, section: BridgeSection) -> None:
    known = {c.name for c in config.credential}
    for name in section.credentials:
        if name not in known:
            raise ConfigError(f"bridge {section.name!r}: credential {name!r} is not configured")


@contextlib.asynccontextmanager
async def serve_bridges(
    config: SomaConfig,
    executive: Executive,
    broker: CredentialBroker,
    key_counts: KeyCounts | None = None,
    sockets: Mapping[str, socket.socket] | None = None,
) -> AsyncIterator[list[RunningBridge]]:
    """Serve every `[[bridge]]` of `config` while the block runs; yields where each listens.
    Requests per API key are counted in `key_counts` (for the metrics endpoint). An instance
    serves on its listening socket in `sockets` (the supervisor's, kept across sidecar
    restarts) if there is one, else on one bound here."""
    for section in config.bridge:
        _check(config, section)
    running: list[RunningBridge] = []
    async with contextlib.AsyncExitStack() as stack:
        keys = None
        if any(b.auth.api_keys for b in config.bridge):
            store = KeyStore(config.state_dir)
            stack.callback(store.close)
            keys = KeyCache(store, counts=key_counts)
        for section in config.bridge:
            handed = (sockets or {}).get(section.name)
            sock = handed if handed is not None else bridge_listener(section)
            stack.callback(sock.close)
            port = sock.getsockname()[1]
            host = f"[{section.host}]" if ":" in section.host else section.host
            url = section.public_url or f"http://{host}:{port}{MCP_PATH}"
            oauth = section.auth.oauth
            jwks = None
            if oauth is not None:
                jwks = (
                    oauth.jwks
                    if oauth.jwks.startswith("https://")
                    else str(config.resolve(Path(oauth.jwks)))
                )
            app = build_app(
                section, executive, broker, keys, url, jwks, config.sidecar.max_input_depth
            )
            limits = HttpLimits(
                "bridge", section.max_connections, section.max_header_bytes, section.request_timeout
            )
            server = ReadyServer(
                uvicorn.Config(
                    app,
                    http=bounded_http(limits),
                    ws="none",
                    # The TCP peer is the client: an X-Forwarded-For, which any local process
                    # can write, must not choose the address failed logins are counted under.
                    proxy_headers=False,
                    lifespan="on",
                    access_log=False,
                    log_config=None,
                    # In-flight calls get the sidecar's grace period at shutdown.
                    timeout_graceful_shutdown=math.ceil(config.sidecar.grace_period),
                )
            )
            task = asyncio.create_task(server.serve(sockets=[sock]))
            stack.push_async_callback(_stop, server, task)
            ready = asyncio.create_task(server.ready.wait())
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if task.done():
                raise ConfigError(f"bridge {section.name!r}: the server failed to start")
            running.append(RunningBridge(section.name, url, port))
            stack.callback(publish(config.runtime_dir, section.name, url).remove)
            log.info("bridge_serving", bridge=section.name, url=url)
        yield running


async def _stop(server: ReadyServer, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    await task
