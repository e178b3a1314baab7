"""Request building and answer decoding shared by the blocking and the asyncio client."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import grpc

from sdk import _trace
from sdk.errors import TRANSPORT_ERRORS, DeadlineExceeded, SomaError, TransportError
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.types import FunctionMatch, Response

# Matches the sidecar's default receive limit; larger requests are refused before sending.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A local sidecar restarts in well under a second: reconnect promptly rather than after
    # gRPC's default backoff, which grows to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def stimulate_request(
    op: str, input: Any, context: Mapping[str, str] | None
) -> pb.StimulateRequest:
    data = json.dumps(input, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    context = _trace.with_traceparent(context)
    return pb.StimulateRequest(op=op, input_json=data, context=dict(context or {}))


def response_from(reply: pb.StimulateResponse) -> Response:
    output = json.loads(reply.output_json) if reply.output_json else None
    cost = reply.cost if reply.HasField("cost") else None
    return Response(ok=reply.ok, output=output, latency_ms=reply.latency_ms, cost=cost)


def cards_from(reply: pb.DescribeResponse) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in reply.organ_cards_json]


def matches_from(reply: pb.SearchResponse) -> list[FunctionMatch]:
    return [FunctionMatch(m.organ, json.loads(m.function_card_json)) for m in reply.matches]


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    """Seconds left before `deadline` (None: no deadline); `DeadlineExceeded` when none are."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("DEADLINE_EXCEEDED", "the call's deadline passed")
    return left


def idempotency(cards: list[dict[str, Any]]) -> dict[str, bool]:
    """op → whether its card says repeating it is safe (sub-organ functions included)."""
    functions = [
        f
        for c in cards
        for f in [
            *c.get("functions", []),
            *(g for s in c.get("sub_organs", []) for g in s.get("functions", [])),
        ]
    ]
    return {str(f["name"]): bool(f.get("idempotent")) for f in functions}


def transport_error(exc: grpc.RpcError) -> SomaError:
    """The typed SDK error for a failed RPC."""
    code = exc.code() if hasattr(exc, "code") else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details = (exc.details() if hasattr(exc, "details") else None) or ""
    return TRANSPORT_ERRORS.get(name, TransportError)(name, details)
