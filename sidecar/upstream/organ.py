"""An upstream MCP server hosted as an organ: its approved tools are the organ's functions.

Every operation (the tool list, a call) is bounded by the upstream's `timeout`: an upstream
that is down, slow or answers garbage fails its own calls (`Unavailable`, `DeadlineExceeded`)
and nothing else. Over HTTP each operation opens its own stateless MCP connection with the
official client, sending the credential the call was given; after a failure further
operations wait out a backoff (0.5 s doubling to 30 s) and answer `Unavailable` at once
meanwhile, so a dead upstream is not hammered. A stdio upstream is one long-lived subprocess
(see `session`), restarted with the same backoff when it dies; its credential is in its
environment from its start (resolved for the organ itself, audited as `upstream:<name>`), so a
call's injected credential only proves the caller may use it.

The tool list is read at start, every `refresh_interval`, and whenever the upstream says it
changed (a 2026-07-28 `subscriptions/listen` stream; older servers get the interval only); a
change re-registers the organ's card with the executive. Tools whose definition is not the
pinned one are quarantined (see `pins`); when the upstream cannot be reached at start, the
pinned definitions stand in, so its functions exist and answer `Unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx2
import structlog
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError
from mcp.types import CallToolResult, RequestParamsMeta, Tool

from sidecar.credentials import Credential, CredentialBroker
from sidecar.upstream.cards import definition, function_card, function_names
from sidecar.upstream.pins import PinStore
from sidecar.upstream.session import (
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    StdioSession,
    UpstreamDown,
    connection_closed,
    reason,
)
from soma_runtime import Executive, Organ, OrganEnvironment, tracing
from soma_runtime.cards import FunctionCard, OrganCard
from soma_runtime.contract import Response, Stimulus, unsupported
from soma_runtime.upstream_config import UpstreamSection

log = structlog.get_logger(component="upstream")

MAX_PAGES = 100


class UpstreamOrgan(Organ):
    """The organ `section.name`, whose functions are the upstream's approved tools."""

    def __init__(self, section: UpstreamSection, env: OrganEnvironment) -> None:
        self.section = section
        self._pins = PinStore(env.state_dir)
        self._executive = env.service(Executive)
        self._broker = env.service(CredentialBroker) if section.credential else None
        self._functions: list[FunctionCard] = []
        self._tools: dict[str, str] = {}  # function name -> tool name, approved tools
        self._quarantined: dict[str, str] = {}  # function name -> tool name
        self._backoff = 0.0
        self._down_until = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._stdio = StdioSession(self.name, self._stdio_parameters) if section.command else None

    @property
    def name(self) -> str:
        return self.section.name

    def describe(self) -> OrganCard:
        where = self.section.url or (self.section.command or ["?"])[0]
        return OrganCard(
            name=self.name,
            version="upstream",
            description=f"The approved tools of the upstream MCP server {self.name!r} ({where})",
            division="upstream",
            subsystem="mcp",
            tags=["upstream", "mcp"],
            execution_modes=["async"],
            functions=self._functions,
        )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._stdio is not None:
            self._stdio.start()
        try:
            await self.refresh()
        except UpstreamDown as exc:
            log.warning("upstream_down_at_start", upstream=self.name, error=str(exc))
            self._adopt([Tool.model_validate(d) for d in await self._pinned()], None)
        self._tasks = [
            asyncio.create_task(self._refresh_forever()),
            asyncio.create_task(self._listen_forever()),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._stdio is not None:
            await self._stdio.stop()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.section.refresh_interval)
            try:
                await self.refresh()
            except UpstreamDown as exc:
                log.warning("upstream_refresh_failed", upstream=self.name, error=str(exc))

    async def _listen_forever(self) -> None:
        """Refresh on each tools list-changed event; after a dropped stream, listen again
        an interval later."""
        while True:
            try:
                async with (
                    self._listening_client() as client,
                    client.listen(tools_list_changed=True) as events,
                ):
                    # Read the list once subscribed: a change made before the
                    # subscription was acknowledged sends no event (none are replayed).
                    await self.refresh()
                    async for _ in events:
                        await self.refresh()
            except ListenNotSupportedError:
                log.info("upstream_sends_no_list_changes", upstream=self.name)
                return
            except Exception as exc:
                log.info("upstream_listen_ended", upstream=self.name, error=reason(exc))
            await asyncio.sleep(self.section.refresh_interval)

    @contextlib.asynccontextmanager
    async def _listening_client(self) -> AsyncIterator[Client]:
        """A long-lived client for the listen stream (not bounded by the call timeout)."""
        if self._stdio is not None:
            async with self._stdio.operation() as client:
                yield client
            return
        credential = await self._own_credential()
        async with contextlib.AsyncExitStack() as stack:
            yield await stack.enter_async_context(self._http_client(credential, stack, stream=True))

    async def _pinned(self) -> list[dict[str, Any]]:
        try:
            states = await asyncio.to_thread(self._pins.states, self.name)
        except sqlite3.Error as exc:
            log.error("upstream_pins_unreadable", upstream=self.name, error=str(exc))
            return []
        return [json.loads(s.pinned) for s in states if s.pinned is not None]

    # -- the tool list ------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the tool list, record it against the pins and update the card;
        `UpstreamDown` when the upstream cannot be asked."""
        credential = await self._own_credential()
        tools: list[Tool] = []
        try:
            async with self._operation(credential) as client:
                cursor: str | None = None
                for _ in range(MAX_PAGES):
                    page = await client.list_tools(cursor=cursor, cache_mode="refresh")
                    tools.extend(page.tools)
                    cursor = page.next_cursor
                    if cursor is None:
                        break
        except (MCPError, TimeoutError) as exc:
            raise UpstreamDown(f"tools/list failed: {type(exc).__name__}: {exc}") from None
        first_use = self.section.first_use == "approve"
        try:
            approved, pinned_now = await asyncio.to_thread(
                self._pins.record, self.name, [definition(t) for t in tools], first_use=first_use
            )
        except sqlite3.Error as exc:
            # Without the pins no tool can be told approved: keep serving what was.
            raise UpstreamDown(f"the pin database cannot be used: {exc}") from None
        if pinned_now:
            log.warning("upstream_tools_pinned_first_use", upstream=self.name, tools=pinned_now)
        self._adopt(tools, approved)

    def _adopt(self, tools: list[Tool], approved: set[str] | None) -> None:
        """Make `tools` (those in `approved`; all when None) the organ's functions."""
        by_name = {t.name: t for t in tools}
        names = function_names(self.name, sorted(by_name))
        functions: list[FunctionCard] = []
        routes: dict[str, str] = {}
        quarantined: dict[str, str] = {}
        for function, tool_name in names.items():
            if approved is not None and tool_name not in approved:
                quarantined[function] = tool_name
                continue
            card = function_card(
                function,
                self.name,
                by_name[tool_name],
                self.section.credential,
                self.section.timeout,
                local=self.section.command is not None,
            )
            if card is None:
                log.warning("upstream_tool_unusable", upstream=self.name, tool=tool_name)
                continue
            functions.append(card)
            routes[function] = tool_name
        if sorted(quarantined.values()) != sorted(self._quarantined.values()):
            log.warning(
                "upstream_tools_quarantined",
                upstream=self.name,
                tools=sorted(quarantined.values()),
                hint=f"soma upstream diff {self.name}; soma upstream approve {self.name}",
            )
        self._quarantined = quarantined
        self._tools = routes
        if functions != self._functions:
            self._functions = functions
            self._executive.refresh(self.name)

    async def _own_credential(self) -> Credential | None:
        """The organ's credential for reading the tool list (audited as `upstream:<name>`)."""
        if self._broker is None or self.section.credential is None:
            return None
        name = self.section.credential
        try:
            resolved = await self._broker.resolve(
                [name],
                runtime=f"upstream:{self.name}",
                allowed=frozenset({name}),
                organ=self.name,
                op=f"{self.name}.tools/list",
            )
        except Exception as exc:  # VaultError: the vault cannot give it now
            raise UpstreamDown(f"credential {name!r} unavailable: {exc}") from None
        return resolved[name]

    # -- calls --------------------------------------------------------------------------

    async def stimulate(self, stimulus: Stimulus) -> Response:
        started = time.perf_counter()
        if stimulus.op in self._quarantined:
            return Response.failure(
                "Quarantined",
                _elapsed_ms(started),
                op=stimulus.op,
                message=f"the tool's definition changed; see `soma upstream diff {self.name}`",
            )
        tool = self._tools.get(stimulus.op)
        if tool is None:
            return unsupported(stimulus.op, _elapsed_ms(started))
        credential = None
        if self.section.credential is not None:
            # Only a caller the credential was injected for (its channel or bridge may use
            # it) reaches the upstream, on either transport.
            credential = stimulus.credentials.get(self.section.credential)
            if credential is None:
                return Response.failure(
                    "CredentialUnavailable",
                    _elapsed_ms(started),
                    op=stimulus.op,
                    message=f"the call carries no credential {self.section.credential!r}",
                )
        try:
            async with self._operation(credential) as client:
                result = await client.call_tool(tool, stimulus.input, meta=_trace_meta(stimulus))
        except UpstreamDown as exc:
            return Response.failure(
                "Unavailable", _elapsed_ms(started), op=stimulus.op, message=str(exc)
            )
        except MCPError as exc:
            return Response.failure(
                "UpstreamError", _elapsed_ms(started), op=stimulus.op, message=exc.error.message
            )
        except TimeoutError:
            return Response.failure(
                "DeadlineExceeded",
                _elapsed_ms(started),
                op=stimulus.op,
                deadline_s=self.section.timeout,
            )
        # The client has checked structured content against the tool's output schema
        # (a mismatch raised above: Unavailable).
        return _response(result, _elapsed_ms(started), stimulus.op)

    @contextlib.asynccontextmanager
    async def _operation(self, credential: Credential | None) -> AsyncIterator[Client]:
        """A connected client for one operation within the timeout; `UpstreamDown` when the
        upstream cannot be reached or answers what MCP does not allow, `TimeoutError` when
        the deadline passes."""
        now = time.monotonic()
        if now < self._down_until:
            raise UpstreamDown(f"upstream down; retried in {self._down_until - now:.1f} s")
        try:
            async with asyncio.timeout(self.section.timeout), contextlib.AsyncExitStack() as stack:
                if self._stdio is not None:
                    client = await stack.enter_async_context(self._stdio.operation())
                else:
                    client = await stack.enter_async_context(self._http_client(credential, stack))
                yield client
        except UpstreamDown:
            raise
        except MCPError as exc:
            if connection_closed(exc):
                self._failed()
                raise UpstreamDown("the upstream closed the connection") from None
            raise  # the upstream answered, with an error: it is up
        except TimeoutError:
            self._failed()
            raise
        except Exception as exc:
            self._failed()
            raise UpstreamDown(f"{type(exc).__name__}: {reason(exc)}") from None
        self._backoff = 0.0

    def _failed(self) -> None:
        if self._stdio is not None:
            return  # the session restarts the process with its own backoff
        self._backoff = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, self._backoff * 2))
        self._down_until = time.monotonic() + self._backoff

    def _http_client(
        self,
        credential: Credential | None,
        stack: contextlib.AsyncExitStack,
        *,
        stream: bool = False,
    ) -> Client:
        """A client for the HTTP upstream; reads time out after `timeout` except on a
        `stream` (a listen stream waits for events without end)."""
        assert self.section.url is not None
        url, headers = credential.attach(self.section.url) if credential else (self.section.url, {})
        timeout = self.section.timeout
        limits = httpx2.Timeout(timeout, read=None if stream else timeout)
        http = httpx2.AsyncClient(headers=headers, timeout=limits)
        stack.push_async_callback(http.aclose)
        return Client(streamable_http_client(url, http_client=http), cache=None)

    async def _stdio_parameters(self) -> StdioServerParameters:
        """How to start the subprocess; run at each (re)start, so a rotated credential is
        picked up. The environment is the SDK's minimal default plus the credential."""
        assert self.section.command is not None
        credential = await self._own_credential()
        env = None
        if credential is not None and self.section.credential_env is not None:
            env = {self.section.credential_env: credential.reveal()}
        command, *args = self.section.command
        return StdioServerParameters(command=command, args=args, env=env)


def _response(result: CallToolResult, latency_ms: float, op: str) -> Response:
    content = [
        block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content
    ]
    if result.is_error:
        text = " ".join(b.get("text", "") for b in content if b.get("type") == "text")
        return Response.failure("UpstreamError", latency_ms, op=op, message=text, content=content)
    if result.structured_content is not None:
        return Response(ok=True, output=result.structured_content, latency_ms=latency_ms)
    return Response(ok=True, output={"content": content}, latency_ms=latency_ms)


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _trace_meta(stimulus: Stimulus) -> RequestParamsMeta | None:
    """The call's trace context for the upstream, in `_meta` where MCP carries it (SEP-414).
    With OpenTelemetry on, the `mcp` client puts its own span there instead, a child of ours."""
    parent = tracing.incoming(stimulus.context.get(tracing.TRACEPARENT))
    # An extra item of the open TypedDict (PEP 728), which mypy does not read yet.
    return cast("RequestParamsMeta", {tracing.TRACEPARENT: parent}) if parent else None
