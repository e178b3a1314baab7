"""An upstream MCP server hosted as an organ: its approved tools are the organ's functions.

Every operation (the tool list, a call) is bounded by the upstream's `timeout`: an upstream
that is down, slow or answers garbage fails its own calls (`Unavailable`, `DeadlineExceeded`,
`UpstreamError` for an answer that breaks the tool's approved output schema, which fails only
that call) and nothing else. Over HTTP each operation opens its own stateless MCP connection
with the official client, sending the credential the call was given; after a failure further
operations wait out a backoff (0.5 s doubling to 30 s) and answer `Unavailable` at once
meanwhile, so a dead upstream is not hammered. A stdio upstream is one long-lived subprocess
(see `session`), restarted with the same backoff when it dies; its credential is in its
environment from its start (resolved for the organ itself, audited as `upstream:<name>`), so a
call's injected credential only proves the caller may use it.

The tool list is read at start, every `refresh_interval`, and when the upstream says it changed
(a 2026-07-28 `subscriptions/listen` stream; older servers get the interval only): once for any
number of such events, and at most once per `LIST_CHANGED_GAP_S` while they keep coming, so a
storm of events costs a list a second. A change re-registers the organ's card with the
executive. Tools whose definition is not the pinned one are quarantined (see `pins`); when the
upstream cannot be reached at start, the pinned definitions stand in, so its functions exist
and answer `Unavailable`. A tool whose function name another organ already has is left out,
with a warning (the configuration refuses an upstream named like another organ's functions, see
`sidecar.loading`).

Everything the upstream answers is scrubbed of the credential it was given (see `answers`)
and bounded: what it sends for one operation is read up to twice `max_output` (a result
commonly comes twice, as text and as structured content; see `transport`), and an output
must fit in `max_output`, the sidecar's message limit, like any organ's
(`ResponseTooLarge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from typing import cast

import httpx2
import structlog
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError
from mcp.types import CallToolResult, RequestParamsMeta, Tool

from sidecar.credentials import Credential, CredentialBroker
from sidecar.upstream.answers import Scrub, Unmaskable, response
from sidecar.upstream.cards import declares_output, definition, function_card
from sidecar.upstream.pins import PinStore
from sidecar.upstream.session import (
    Backoff,
    StdioSession,
    UpstreamDown,
    connection_closed,
    leaf,
    reason,
)
from sidecar.upstream.transport import ANSWER_TOO_LARGE, AnswerRefused, Budget, too_large
from soma_runtime import Executive, Organ, OrganEnvironment, tracing
from soma_runtime.cards import FunctionCard, OrganCard
from soma_runtime.contract import Response, Stimulus, unsupported
from soma_runtime.upstream_config import UpstreamSection
from soma_runtime.validation import Validators

log = structlog.get_logger(component="upstream")

MAX_PAGES = 100
# Seconds between two reads of the tool list (the least a storm of list-changed events costs).
LIST_CHANGED_GAP_S = 1.0
OUTPUT_MISMATCH = "the upstream's answer does not match the tool's output schema"
# What one operation may read, in outputs' worth: a result usually comes twice.
ANSWER_FACTOR = 2


class UpstreamOrgan(Organ):
    """The organ `section.name`, whose functions are the upstream's approved tools; an
    output may take `max_output` bytes of JSON."""

    def __init__(self, section: UpstreamSection, env: OrganEnvironment, max_output: int) -> None:
        self.section = section
        self._pins = PinStore(env.state_dir)
        self._executive = env.service(Executive)
        self._broker = env.service(CredentialBroker) if section.credential else None
        self._max_output = max_output
        self._answer_limit = ANSWER_FACTOR * max_output
        self._functions: list[FunctionCard] = []
        self._tools: dict[str, Tool] = {}  # function name -> tool, approved tools
        self._quarantined: dict[str, str] = {}  # function name -> tool name
        self._clashing: dict[str, str] = {}  # function name -> the organ that has it
        self._backoff = Backoff()
        self._down_until = 0.0
        self._changed = asyncio.Event()  # the upstream said its tool list changed
        self._outputs = Validators()  # of the approved tools' output schemas
        self._scrubs: tuple[str, Scrub] | None = None  # the last credential value's
        self._tasks: list[asyncio.Task[None]] = []
        # The credential the stdio subprocess was started with: what it can echo.
        self._given: Credential | None = None
        self._stdio = (
            StdioSession(self.name, self._stdio_parameters, self._answer_limit)
            if section.command
            else None
        )

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
            self._adopt(await self._pinned(), None)
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
        """Read the list every `refresh_interval`, or sooner once the upstream said it
        changed; one read at a time, `LIST_CHANGED_GAP_S` apart at least."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.section.refresh_interval):
                    await self._changed.wait()
            self._changed.clear()  # the events so far: all answered by the read below
            try:
                await self.refresh()
            except UpstreamDown as exc:
                log.warning("upstream_refresh_failed", upstream=self.name, error=str(exc))
            except Exception as exc:  # the next read may work: the reads must go on
                _raise_if_cancelled()
                log.error("upstream_refresh_failed", upstream=self.name, error=reason(exc))
            await asyncio.sleep(LIST_CHANGED_GAP_S)

    async def _listen_forever(self) -> None:
        """Have the list read on tools list-changed events (the events only set a flag: see
        `_refresh_forever`); after a dropped stream, listen again an interval later."""
        while True:
            budget = Budget(None)  # refuses a compressed stream; each event is bounded
            try:
                async with (
                    self._listening_client(budget) as client,
                    client.listen(tools_list_changed=True) as events,
                ):
                    # Read the list once subscribed: a change made before the
                    # subscription was acknowledged sends no event (none are replayed).
                    self._changed.set()
                    async for _ in events:
                        self._changed.set()
            except ListenNotSupportedError:
                log.info("upstream_sends_no_list_changes", upstream=self.name)
                return
            except Exception as exc:
                _raise_if_cancelled()
                # As for an operation, the budget knows whether it refused the stream.
                error = budget.refused.message if budget.refused else reason(exc)
                log.info("upstream_listen_ended", upstream=self.name, error=error)
            await asyncio.sleep(self.section.refresh_interval)

    @contextlib.asynccontextmanager
    async def _listening_client(self, budget: Budget) -> AsyncIterator[Client]:
        """A long-lived client for the listen stream (not bounded by the call timeout)."""
        if self._stdio is not None:
            async with self._stdio.operation() as client:
                yield client
            return
        credential = await self._own_credential()
        async with contextlib.AsyncExitStack() as stack:
            http = self._http_client(credential, stack, budget, listening=True)
            yield await stack.enter_async_context(http)

    async def _pinned(self) -> dict[str, Tool]:
        """`{function name: tool}` as approved."""
        try:
            states = await asyncio.to_thread(self._pins.states, self.name)
        except sqlite3.Error as exc:
            log.error("upstream_pins_unreadable", upstream=self.name, error=str(exc))
            return {}
        return {
            s.function: Tool.model_validate(json.loads(s.pinned))
            for s in states
            if s.pinned is not None and s.function is not None
        }

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
        except (MCPError, TimeoutError, AnswerRefused) as exc:
            raise UpstreamDown(f"tools/list failed: {type(exc).__name__}: {exc}") from None
        # Descriptions and schemas reach models and cards: no echoed credential in them.
        scrub = self._scrub(credential)
        by_name: dict[str, Tool] = {}
        for tool in tools:
            try:
                by_name[tool.name] = scrub.tool(tool)
            except Unmaskable:
                log.warning("upstream_tool_unscrubbable", upstream=self.name, tool=tool.name)
        first_use = self.section.first_use == "approve"
        definitions = [definition(t) for t in by_name.values()]
        try:
            recorded = await asyncio.to_thread(
                self._pins.record, self.name, definitions, first_use=first_use
            )
        except sqlite3.Error as exc:
            # Without the pins no tool can be told approved: keep serving what was.
            raise UpstreamDown(f"the pin database cannot be used: {exc}") from None
        if recorded.pinned_now:
            log.warning(
                "upstream_tools_pinned_first_use", upstream=self.name, tools=recorded.pinned_now
            )
        named = {function: by_name[tool] for function, tool in recorded.names.items()}
        if unnamed := sorted(set(by_name) - set(recorded.names.values())):
            log.warning("upstream_tools_unnamed", upstream=self.name, tools=unnamed)
        self._adopt(named, recorded.approved)

    def _adopt(self, named: dict[str, Tool], approved: set[str] | None) -> None:
        """Make the tools of `named` (`{function name: tool}`; those in `approved`, all when
        None) the organ's functions."""
        elsewhere = {f.name: o for o, f in self._executive.list_functions() if o != self.name}
        functions: list[FunctionCard] = []
        routes: dict[str, Tool] = {}
        quarantined: dict[str, str] = {}
        clashing: dict[str, str] = {}
        for function, tool in sorted(named.items()):
            if approved is not None and tool.name not in approved:
                quarantined[function] = tool.name
                continue
            if function in elsewhere:
                clashing[function] = elsewhere[function]
                continue
            card = function_card(
                function,
                self.name,
                tool,
                self.section.credential,
                self.section.timeout,
                local=self.section.command is not None,
            )
            if card is None:
                log.warning("upstream_tool_unusable", upstream=self.name, tool=tool.name)
                continue
            functions.append(card)
            routes[function] = tool
        if sorted(quarantined.values()) != sorted(self._quarantined.values()):
            log.warning(
                "upstream_tools_quarantined",
                upstream=self.name,
                tools=sorted(quarantined.values()),
                functions=sorted(quarantined),  # the names they get once approved
                hint=f"soma upstream diff {self.name}; soma upstream approve {self.name}",
            )
        for function, organ in clashing.items():
            if function not in self._clashing:
                log.warning(
                    "upstream_tool_name_taken",
                    upstream=self.name,
                    function=function,
                    organ=organ,
                    hint="the tool is left out; rename the [[upstream]]",
                )
        self._quarantined = quarantined
        self._clashing = clashing
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
        scrub = self._scrub(credential)
        answer = await self._call(tool, stimulus, credential, scrub, started)
        return self._handed_on(answer, scrub, stimulus.op)

    async def _call(
        self,
        tool: Tool,
        stimulus: Stimulus,
        credential: Credential | None,
        scrub: Scrub,
        started: float,
    ) -> Response:
        op = stimulus.op
        try:
            async with self._operation(credential) as client:
                result = await client.call_tool(
                    tool.name, stimulus.input, meta=_trace_meta(stimulus)
                )
        except AnswerRefused as exc:
            return Response.failure(exc.kind, _elapsed_ms(started), op=op, message=exc.message)
        except UpstreamDown as exc:
            return Response.failure("Unavailable", _elapsed_ms(started), op=op, message=str(exc))
        except MCPError as exc:
            return Response.failure(
                "UpstreamError", _elapsed_ms(started), op=op, message=exc.error.message
            )
        except TimeoutError:
            return Response.failure(
                "DeadlineExceeded", _elapsed_ms(started), op=op, deadline_s=self.section.timeout
            )
        if self._breaks_output_schema(op, tool, result):
            # A bad answer to this call, not an upstream that is down: no backoff for every
            # caller. The message is ours, never the value.
            return Response.failure(
                "UpstreamError", _elapsed_ms(started), op=op, message=OUTPUT_MISMATCH
            )
        return response(result, declares_output(tool), scrub, _elapsed_ms(started), op)

    def _breaks_output_schema(self, op: str, tool: Tool, result: CallToolResult) -> bool:
        """Whether a successful answer of a tool that declared an output schema lacks
        structured content or breaks the schema: the approved one, that `tool` holds (what
        the upstream lists now may be a changed one, quarantined at the next read)."""
        schema = tool.output_schema
        if result.is_error or not declares_output(tool) or schema is None:
            return False
        content = result.structured_content
        return content is None or self._outputs.first_error(op, schema, content) is not None

    def _handed_on(self, answer: Response, scrub: Scrub, op: str) -> Response:
        """`answer` as it may leave the organ: scrubbed, JSON, within the output limit."""

        def refused(kind: str, message: str) -> Response:
            return Response.failure(kind, answer.latency_ms, op=op, message=message)

        try:
            output, data = scrub.answer(answer.output)
        except Unmaskable:
            return refused(
                "UnscrubbableResponse",
                "the upstream's answer holds the credential where it cannot be masked",
            )
        except ValueError:  # the client's parser takes NaN and Infinity; JSON has neither
            return refused("UpstreamError", "the upstream's answer is not JSON (NaN, Infinity)")
        if len(data) > self._max_output:
            return refused("ResponseTooLarge", f"the output exceeds {self._max_output} bytes")
        return Response(answer.ok, output, answer.latency_ms, answer.cost)

    def _scrub(self, sent: Credential | None) -> Scrub:
        """What masks the credential the upstream was given: the one sent with the operation
        over HTTP, the one its process was started with on stdio. Built once per value (its
        patterns cost far more than a call's check); a rotated value gets its own."""
        given = self._given if self._stdio is not None else sent
        value = given.reveal() if given is not None else ""
        if self._scrubs is None or self._scrubs[0] != value:
            self._scrubs = (value, Scrub([value] if value else []))
        return self._scrubs[1]

    @contextlib.asynccontextmanager
    async def _operation(self, credential: Credential | None) -> AsyncIterator[Client]:
        """A connected client for one operation within the timeout; `UpstreamDown` when the
        upstream cannot be reached or answers what MCP does not allow, `TimeoutError` when
        the deadline passes, `AnswerRefused` when it answers what is not read."""
        now = time.monotonic()
        if now < self._down_until:
            raise UpstreamDown(f"upstream down; retried in {self._down_until - now:.1f} s")
        budget = Budget(self._answer_limit)
        try:
            async with asyncio.timeout(self.section.timeout), contextlib.AsyncExitStack() as stack:
                if self._stdio is not None:
                    client = await stack.enter_async_context(self._stdio.operation())
                else:
                    http = self._http_client(credential, stack, budget)
                    client = await stack.enter_async_context(http)
                yield unchecked(client)
        except (UpstreamDown, AnswerRefused):
            raise
        except Exception as exc:
            _raise_if_cancelled()
            # The client reports a refused read in many ways (a parse error, a stream
            # that ended, a failed task group): the budget knows what happened.
            if budget.refused is not None:
                raise budget.refused from None
            cause = leaf(exc)  # over HTTP, the client's task group wraps its errors
            if isinstance(cause, AnswerRefused):
                raise cause from None  # refused by the operation itself: the upstream is up
            if isinstance(cause, MCPError) and cause.error.code == ANSWER_TOO_LARGE:
                raise too_large(self._answer_limit) from None  # from the stdio transport
            if isinstance(cause, MCPError) and not connection_closed(cause):
                raise cause from None  # the upstream answered, with an error: it is up
            if self._stdio is None:  # the session restarts the process with its own backoff
                self._down_until = time.monotonic() + self._backoff.next()
            if isinstance(exc, TimeoutError):
                raise
            if isinstance(cause, MCPError):
                raise UpstreamDown("the upstream closed the connection") from None
            raise UpstreamDown(f"{type(exc).__name__}: {reason(exc)}") from None
        self._backoff.reset()

    def _http_client(
        self,
        credential: Credential | None,
        stack: contextlib.AsyncExitStack,
        budget: Budget,
        *,
        listening: bool = False,
    ) -> Client:
        """A client for the HTTP upstream whose answers are read within `budget`, with reads
        timing out after `timeout`; `listening`, for a listen stream, which waits for events
        without end (each event bounded)."""
        assert self.section.url is not None
        url, headers = credential.attach(self.section.url) if credential else (self.section.url, {})
        timeout = self.section.timeout
        http = budget.client(headers, httpx2.Timeout(timeout, read=None if listening else timeout))
        stack.push_async_callback(http.aclose)
        transport = streamable_http_client(
            url, http_client=http, max_sse_event_size=self._answer_limit
        )
        return Client(transport, cache=None)

    async def _stdio_parameters(self) -> StdioServerParameters:
        """How to start the subprocess; run at each (re)start, so a rotated credential is
        picked up. The environment is the SDK's minimal default plus the credential."""
        assert self.section.command is not None
        credential = await self._own_credential()
        env = None
        if credential is not None and self.section.credential_env is not None:
            env = {self.section.credential_env: credential.reveal()}
            self._given = credential
        command, *args = self.section.command
        return StdioServerParameters(command=command, args=args, env=env)


def unchecked(client: Client) -> Client:
    """`client`, with the SDK's check of answers against output schemas turned off: the organ
    checks them against the approved schemas (`_breaks_output_schema`). The SDK's check uses
    the schema the upstream lists now (not the pinned one), and lists the tools (one page)
    when it has none cached, as a fresh HTTP client never has: a round trip per call.

    The pinned mcp runs `ClientSession.validate_tool_result` after every successful
    tools/call, whichever way it is made; an attribute of the instance shadows it (unlike
    priming its schema cache, which a concurrent tools/list on a stdio session refills).
    Should an mcp upgrade rename it, the calls list the tools again, and
    tests/test_upstream.py (`..._without_listing`) fails."""
    client.session.validate_tool_result = _accept  # type: ignore[method-assign]
    return client


async def _accept(name: str, result: CallToolResult) -> None:
    """Takes any answer (see `unchecked`)."""


def _raise_if_cancelled() -> None:
    """Cancel again when this task is being cancelled: the MCP client's task groups may turn
    the cancellation into another error (BrokenResourceError), which must not be taken for
    the upstream's (a stop would then wait out a refresh interval)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _trace_meta(stimulus: Stimulus) -> RequestParamsMeta | None:
    """The call's trace context for the upstream, in `_meta` where MCP carries it (SEP-414).
    With OpenTelemetry on, the `mcp` client puts its own span there instead, a child of ours."""
    parent = tracing.incoming(stimulus.context.get(tracing.TRACEPARENT))
    # An extra item of the open TypedDict (PEP 728), which mypy does not read yet.
    return cast("RequestParamsMeta", {tracing.TRACEPARENT: parent}) if parent else None
