"""The agent's current OpenTelemetry span as a call's `traceparent`, when the agent uses one.

The SDK does not depend on OpenTelemetry and never imports it: an agent with a current span
has imported `opentelemetry.trace` already, so it is looked up in `sys.modules`, and an agent
without it pays one dictionary lookup per call.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

TRACEPARENT = "traceparent"


def with_traceparent(context: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """`context`, with the current span's traceparent when the agent has a current span and
    the caller did not set one."""
    if context is not None and TRACEPARENT in context:
        return context
    otel = sys.modules.get("opentelemetry.trace")
    if otel is None:
        return context
    span = otel.get_current_span().get_span_context()
    if not span.is_valid:
        return context
    value = f"00-{span.trace_id:032x}-{span.span_id:016x}-{int(span.trace_flags) & 0xFF:02x}"
    return {**(context or {}), TRACEPARENT: value}
