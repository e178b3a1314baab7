"""Tool calls through the executive: the same validation, admission (`queue_cap`) and
credential injection as a runtime's call, a deadline from the card's SLO, one audit event
per call, and replay of non-idempotent calls that carry an idempotency key."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mcp.types as types
import structlog

from sidecar.bridge.replay import IdempotencyBusy, IdempotencyConflict, ReplayCache
from sidecar.bridge.tools import IDEMPOTENCY_KEY, META, listed_output_schema
from sidecar.credentials import CredentialBroker, CredentialDenied
from sidecar.injection import inject_credentials
from sidecar.wire import encode_output
from soma_runtime import ErrorKind, Executive, FunctionCard, Response, Stimulus, tracing
from soma_runtime.validation import InputError, Validators

log = structlog.get_logger(component="bridge")

# The SLO's p95 is a target that 5% of calls may miss, not a limit: a call is cut off at
# DEADLINE_FACTOR times it, and never sooner than MIN_DEADLINE_S (a loaded machine).
DEADLINE_FACTOR = 10.0
MIN_DEADLINE_S = 1.0
MAX_IDEMPOTENCY_KEY = 256
# Where an error result carries its payload for programs (`_meta`, never structuredContent).
ERROR = META + "error"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an API key (`key:<id>`, not limited by scopes: `scopes` is None) or
    an OAuth token subject (`sub:<sub>`) with the token's scopes."""

    id: str
    scopes: frozenset[str] | None = None


def deadline_s(card: FunctionCard) -> float:
    return max(MIN_DEADLINE_S, card.slo.p95_latency_ms * DEADLINE_FACTOR / 1000.0)


class ToolCalls:
    """Calls for one bridge instance."""

    def __init__(
        self,
        bridge: str,
        credentials: frozenset[str],
        executive: Executive,
        broker: CredentialBroker,
    ) -> None:
        self._bridge = bridge
        self._caller = f"bridge:{bridge}"
        self._credentials = credentials
        self._executive = executive
        self._broker = broker
        self._replay: ReplayCache[types.CallToolResult] = ReplayCache(_result_size)
        self._outputs = Validators()

    async def call(
        self,
        tool: str,
        card: FunctionCard,
        arguments: Mapping[str, Any] | None,
        meta: Mapping[str, Any] | None,
        principal: Principal,
        traceparent: str | None = None,
    ) -> types.CallToolResult:
        """`traceparent`: the (validated) trace context the request carried, if any."""
        started = time.perf_counter()
        context = {"bridge": self._bridge}
        if traceparent is not None:
            context[tracing.TRACEPARENT] = traceparent
        span = tracing.start_call(card.name, context, bridge=self._bridge, tool=tool)
        outcome = "Failed"
        try:
            key = (meta or {}).get(IDEMPOTENCY_KEY)
            if card.idempotent or key is None:
                result = await self._invoke(card, dict(arguments or {}), context)
            elif not isinstance(key, str) or not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
                result = error_result(
                    Response.failure(
                        ErrorKind.INVALID_INPUT,
                        path=f"_meta.{IDEMPOTENCY_KEY}",
                        message=f"must be a string of 1 to {MAX_IDEMPOTENCY_KEY} characters",
                    )
                )
            else:
                args = dict(arguments or {})
                try:
                    result = await self._replay.run(
                        principal.id,
                        (card.name, key),
                        _fingerprint(args),
                        lambda: self._invoke(card, args, context),
                    )
                except IdempotencyConflict as exc:
                    result = error_result(Response.failure("IdempotencyConflict", message=str(exc)))
                except IdempotencyBusy as exc:  # like `queue_cap`: the same error, retry later
                    result = error_result(
                        Response.failure(
                            ErrorKind.OVERLOADED,
                            op=card.name,
                            message=str(exc),
                            retry_after_s=exc.retry_after_s,
                        )
                    )
            outcome = result_outcome(result)
            return result
        except asyncio.CancelledError:
            outcome = "Cancelled"
            raise
        finally:
            span.end(outcome)
            audit(self._bridge, principal, tool, card.name, outcome, started, span)

    async def _invoke(
        self, card: FunctionCard, arguments: dict[str, Any], context: dict[str, str]
    ) -> types.CallToolResult:
        trace_id = context[tracing.TRACE_ID]
        stimulus = Stimulus(card.name, arguments, dict(context), caller=self._caller)
        try:
            async with asyncio.timeout(deadline_s(card)):
                response = await self._executive.stimulate(stimulus, self._inject)
        except TimeoutError:
            response = Response.failure(
                "DeadlineExceeded", op=card.name, deadline_s=deadline_s(card)
            )
        except CredentialDenied as exc:
            log.warning(
                "credential_denied",
                bridge=self._bridge,
                op=card.name,
                credential=exc.credential,
                trace_id=trace_id,
            )
            response = Response.failure("PermissionDenied", op=card.name, message=str(exc))
        if not response.ok:
            return error_result(response)
        try:
            text = encode_output(response.output).decode()
        except (TypeError, ValueError) as exc:
            log.error("output_not_json", op=card.name, error=str(exc), trace_id=trace_id)
            return internal_error(card, "output is not JSON")
        broken = self._output_error(card, response.output)
        if broken is not None:
            # A client checks structured results against the listed schema and would answer
            # its own -32602 for the whole call: say what went wrong instead, and log it.
            log.error(
                "output_breaks_card",
                op=card.name,
                path=broken.path,
                reason=broken.message,
                trace_id=trace_id,
            )
            return internal_error(
                card, "the output does not match the function's output schema", path=broken.path
            )
        structured = response.output if isinstance(response.output, dict) else None
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text)], structured_content=structured
        )

    def _output_error(self, card: FunctionCard, output: Any) -> InputError | None:
        """Where `output` breaks the output schema the tool lists, if it lists one; the
        validator is compiled once per schema (an upstream's may change)."""
        schema = listed_output_schema(card)
        return None if schema is None else self._outputs.first_error(card.name, schema, output)

    async def _inject(
        self, organ: str, card: FunctionCard, stimulus: Stimulus
    ) -> Stimulus | Response:
        return await inject_credentials(
            self._broker, organ, card, stimulus, caller=self._caller, allowed=self._credentials
        )


def audit(
    bridge: str,
    principal: Principal,
    tool: str,
    op: str,
    outcome: str,
    started: float,
    span: tracing.CallSpan,
) -> None:
    """The audit event of one tool call: who called what and how it went; never arguments,
    keys or tokens."""
    log.info(
        "bridge_call",
        bridge=bridge,
        principal=principal.id,
        tool=tool,
        op=op,
        outcome=outcome,
        latency_ms=round((time.perf_counter() - started) * 1000.0, 3),
        trace_id=span.trace_id,
        span_id=span.span_id,
    )


def error_result(response: Response) -> types.CallToolResult:
    """A failed call as a tool result the model can read: `isError`, the error payload (kind,
    message, path) as JSON text, and the same payload under `_meta` for programs.

    Never `structuredContent`: where present it must match the tool's `outputSchema` (MCP),
    clients check that on error results too (the TypeScript SDK answers -32602 instead of
    the error), and an error payload is no output of the tool."""
    output = response.output if isinstance(response.output, dict) else {"error": "Failed"}
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=encode_output(output).decode())],
        is_error=True,
        _meta={ERROR: output},
    )


def internal_error(card: FunctionCard, message: str, **details: Any) -> types.CallToolResult:
    """`card`'s call failed on our side: an Internal error result saying `message`."""
    return error_result(
        Response.failure(ErrorKind.INTERNAL, op=card.name, message=message, **details)
    )


def result_outcome(result: types.CallToolResult) -> str:
    if not result.is_error:
        return "ok"
    error = (result.meta or {}).get(ERROR, {}).get("error")
    return error if isinstance(error, str) else "Failed"


def _fingerprint(arguments: dict[str, Any]) -> str:
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _result_size(result: types.CallToolResult) -> int:
    return sum(len(c.text) for c in result.content if isinstance(c, types.TextContent))
