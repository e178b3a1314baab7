"""W3C trace context (`traceparent`) for every call, and OpenTelemetry spans when enabled.

A call arrives with the caller's `traceparent` (from the SDK's context, an MCP request's
header or `_meta`); this hop is a child of it: same trace id, a new span id, which becomes the
parent the organ sees. A header that is not a valid traceparent is ignored and a new trace is
started, as the W3C recommendation says: never an error, and never copied into a log, since
the caller wrote it.

This runs on every call, so without OpenTelemetry it costs a regular expression match and a
random id (about 1.5 µs). OpenTelemetry is imported only by `enable_opentelemetry`, which the
sidecar calls when `[tracing] opentelemetry = true`; spans then go through the process's
global TracerProvider, set up the way OpenTelemetry documents it (`opentelemetry-instrument`
and the OTEL_* variables, or code that calls `set_tracer_provider` before the sidecar starts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from random import Random
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

TRACEPARENT = "traceparent"
TRACE_ID = "trace_id"
# Version 00 is 55 characters; a later version may append fields after a dash, which this
# version of the format does not read (W3C trace-context, "versioning of traceparent").
_FORMAT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# sampled (0x01) and, in trace-context level 2, random trace id (0x02).
_KNOWN_FLAGS = frozenset({"00", "01", "02", "03"})
# Longer than any traceparent a later version is likely to define; anything longer is not read.
MAX_TRACEPARENT = 512
# Caller-chosen operation names become span names: bounded like any caller-written text.
MAX_SPAN_NAME = 128


class TraceContext(NamedTuple):
    """One span's place in a trace: 32 and 16 lowercase hex digits and the trace flags. (A
    named tuple: it is built on every call, and a frozen dataclass takes twice as long.)"""

    trace_id: str
    span_id: str
    flags: str = "01"

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        """The context of a span this one is the parent of."""
        return TraceContext(self.trace_id, _span_id(), self.flags)


def parse(value: object) -> TraceContext | None:
    """The context a `traceparent` value names; None when it is not a valid one."""
    if not isinstance(value, str) or len(value) > MAX_TRACEPARENT:
        return None
    match = _FORMAT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if flags not in _KNOWN_FLAGS:  # bits no version defines yet are not passed on
        flags = f"{int(flags, 16) & 0x03:02x}"
    return TraceContext(trace_id, span_id, flags)


# Ids need to be unique, not secret (OpenTelemetry's SDK makes them the same way): no system
# call per call. A generator of our own, so an organ seeding `random` cannot repeat them.
_getrandbits = Random().getrandbits  # noqa: S311 - see above


def _span_id() -> str:
    return f"{_getrandbits(64) or 1:016x}"


def new_trace() -> TraceContext:
    """The root span of a new trace (sampled: the caller had no say, so we keep it)."""
    return TraceContext(f"{_getrandbits(128) or 1:032x}", _span_id())


def _legacy_trace_id(value: object) -> str | None:
    """A bare `trace_id` in a call's context (what callers set before traceparent flowed) is
    kept when it has the W3C form, so such callers' traces still join up."""
    if isinstance(value, str) and _TRACE_ID.fullmatch(value) and value != _ZERO_TRACE:
        return value
    return None


class CallSpan:
    """This hop's span of one call. Without OpenTelemetry it only carries the ids."""

    __slots__ = ("context",)

    def __init__(self, context: TraceContext) -> None:
        self.context = context

    @property
    def trace_id(self) -> str:
        return self.context.trace_id

    @property
    def span_id(self) -> str:
        return self.context.span_id

    def end(self, outcome: str) -> None:
        """The call is over; `outcome` is "ok" or the error kind."""


class _OtelCallSpan(CallSpan):
    __slots__ = ("_otel", "_span", "_token")

    def __init__(self, otel: _Otel, span: Span, context: TraceContext) -> None:
        super().__init__(context)
        self._otel = otel
        self._span = span
        # The organ runs inside this span: spans an instrumented library makes there nest.
        self._token = otel.context.attach(otel.trace.set_span_in_context(span))

    def end(self, outcome: str) -> None:
        span = self._span
        span.set_attribute("soma.outcome", outcome)
        if outcome != "ok":
            span.set_attribute("error.type", outcome)
            span.set_status(self._otel.trace.StatusCode.ERROR)
        span.end()
        self._otel.context.detach(self._token)


@dataclass(frozen=True, slots=True)
class _Otel:
    """The OpenTelemetry API, imported once when enabled."""

    tracer: Tracer
    trace: Any  # the `opentelemetry.trace` module
    context: Any  # the `opentelemetry.context` module


_otel: _Otel | None = None


def enable_opentelemetry(provider: TracerProvider | None = None) -> None:
    """Make one span per call from now on, through `provider` (default: the global
    TracerProvider). opentelemetry-api is installed with the `mcp` SDK the bridge uses."""
    global _otel
    from opentelemetry import context, trace

    from soma_runtime import __version__

    tracer = trace.get_tracer("soma-runtime", __version__, tracer_provider=provider)
    _otel = _Otel(tracer, trace, context)


def disable_opentelemetry() -> None:
    global _otel
    _otel = None


def start_call(op: str, context: dict[str, str], **attributes: str) -> CallSpan:
    """Start this hop's span of a call whose (caller-written) `context` may hold a
    traceparent; `context` is updated for the organ: its `traceparent` now names this span,
    and its `trace_id` is the trace's. `attributes` (runtime, bridge...) go on an
    OpenTelemetry span."""
    parent = parse(context.get(TRACEPARENT))
    if parent is None:
        legacy = _legacy_trace_id(context.get(TRACE_ID))
        parent = TraceContext(legacy, _span_id()) if legacy else None
    span = (
        CallSpan(parent.child() if parent is not None else new_trace())
        if _otel is None
        else _otel_span(_otel, op, parent, attributes)
    )
    context[TRACEPARENT] = span.context.traceparent
    context[TRACE_ID] = span.trace_id
    return span


def _otel_span(
    otel: _Otel, op: str, parent: TraceContext | None, attributes: dict[str, str]
) -> CallSpan:
    """A span whose parent is the caller's traceparent, or the span already current in this
    process when it belongs to the same trace (the MCP SDK's span of a request, parented by
    the request's `_meta`): the most precise parent there is."""
    trace = otel.trace
    parent_context: Any = None
    if parent is not None:
        current = trace.get_current_span().get_span_context()
        if not (current.is_valid and f"{current.trace_id:032x}" == parent.trace_id):
            remote = trace.SpanContext(
                int(parent.trace_id, 16),
                int(parent.span_id, 16),
                is_remote=True,
                trace_flags=trace.TraceFlags(int(parent.flags, 16)),
            )
            parent_context = trace.set_span_in_context(trace.NonRecordingSpan(remote))
    span = otel.tracer.start_span(
        op[:MAX_SPAN_NAME],
        context=parent_context,
        kind=trace.SpanKind.SERVER,
        attributes={f"soma.{k}": v for k, v in attributes.items()},
    )
    got = span.get_span_context()
    if not got.is_valid or (parent is not None and f"{got.span_id:016x}" == parent.span_id):
        # No SDK behind the API (its tracer hands back the parent, or nothing): ids of our own.
        return CallSpan(parent.child() if parent is not None else new_trace())
    ids = TraceContext(f"{got.trace_id:032x}", f"{got.span_id:016x}", f"{int(got.trace_flags):02x}")
    return _OtelCallSpan(otel, span, ids)


def incoming(*candidates: object) -> str | None:
    """The first valid traceparent among `candidates` (what a request carried, most specific
    first), re-formatted; None when there is none."""
    for value in candidates:
        found = parse(value)
        if found is not None:
            return found.traceparent
    return None
