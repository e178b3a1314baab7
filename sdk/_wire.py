"""Request building and answer decoding shared by the blocking and the asyncio client."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import grpc

from sdk._proto.soma.v1 import sidecar_pb2 as pb
from sdk.errors import TRANSPORT_ERRORS, SomaError, TransportError
from sdk.types import FunctionMatch, Response

# Matches the sidecar's default receive limit; larger requests are refused before sending.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def stimulate_request(
    op: str, input: Any, context: Mapping[str, str] | None
) -> pb.StimulateRequest:
    data = json.dumps(input, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return pb.StimulateRequest(op=op, input_json=data, context=dict(context or {}))


def response_from(reply: pb.StimulateResponse) -> Response:
    output = json.loads(reply.output_json) if reply.output_json else None
    cost = reply.cost if reply.HasField("cost") else None
    return Response(ok=reply.ok, output=output, latency_ms=reply.latency_ms, cost=cost)


def cards_from(reply: pb.DescribeResponse) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in reply.organ_cards_json]


def matches_from(reply: pb.SearchResponse) -> list[FunctionMatch]:
    return [FunctionMatch(m.organ, json.loads(m.function_card_json)) for m in reply.matches]


def transport_error(exc: grpc.RpcError) -> SomaError:
    """The typed SDK error for a failed RPC."""
    code = exc.code() if hasattr(exc, "code") else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details = (exc.details() if hasattr(exc, "details") else None) or ""
    return TRANSPORT_ERRORS.get(name, TransportError)(name, details)
