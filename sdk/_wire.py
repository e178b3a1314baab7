"""Request building and answer decoding shared by the blocking and the asyncio client."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import grpc

from sdk import _trace
from sdk.errors import (
    TRANSPORT_ERRORS,
    DeadlineExceeded,
    InvalidRequest,
    SomaError,
    TransportError,
    Unavailable,
)
from sdk.protocol import MAX_MESSAGE_BYTES
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.types import FunctionMatch, Response

# Room for the frame's id and timeout around a call on a stream.
_FRAME_OVERHEAD = 32


# One encoder for every call: `json.dumps` with options builds a new one each time.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def stimulate_request(
    op: str, input: Any, context: Mapping[str, str] | None
) -> pb.StimulateRequest:
    request = pb.StimulateRequest(op=op, input_json=_encode(input).encode())
    context = _trace.with_traceparent(context)
    if context:
        request.context.update(context)
    return request


def stream_frame(call_id: int, request: pb.StimulateRequest) -> pb.StreamRequest:
    """A call's frame on a stream. One too large for the sidecar is refused here: sent, it
    would end the stream, and every call on it, with RESOURCE_EXHAUSTED."""
    frame = pb.StreamRequest(id=call_id, call=request)
    size = frame.ByteSize() + _FRAME_OVERHEAD
    if size > MAX_MESSAGE_BYTES:
        raise InvalidRequest(
            "RESOURCE_EXHAUSTED",
            f"the request is {size} bytes, over the {MAX_MESSAGE_BYTES}-byte message limit",
        )
    return frame


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


def status_of(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """A failed RPC's status code and details."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or ""
    return (code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN), details


def code_named(name: str) -> grpc.StatusCode:
    """The status code a stream's `CallError.code` names (UNKNOWN for a name it does not)."""
    return _CODES.get(name, grpc.StatusCode.UNKNOWN)


_CODES = {code.name: code for code in grpc.StatusCode}


def closed() -> Unavailable:
    """What a call on a closed client raises (also one still waiting when it was closed)."""
    return Unavailable("CANCELLED", "the client is closed")


def transport_error(code: grpc.StatusCode, details: str) -> SomaError:
    """The typed SDK error for a call that failed with `code`, unary or on a stream."""
    return TRANSPORT_ERRORS.get(code.name, TransportError)(code.name, details)
