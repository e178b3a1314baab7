"""The `soma.v1.Sidecar` gRPC service: Stimulate, Describe and Search over the executive."""

from __future__ import annotations

import os
import time
from typing import Any

import grpc
import structlog

from sdk._proto.soma.v1 import sidecar_pb2 as pb
from sdk._proto.soma.v1 import sidecar_pb2_grpc as pb_grpc
from sidecar.wire import WireError, decode_input, encode_output
from soma_runtime import ErrorKind, Executive, Response, Stimulus
from soma_runtime.card_files import card_to_json, function_to_json

log = structlog.get_logger(component="sidecar")

Context = grpc.aio.ServicerContext[Any, Any]


class SidecarService(pb_grpc.SidecarServicer):
    """Serves one channel. Organ failures are responses; gRPC statuses are for the transport."""

    def __init__(
        self, executive: Executive, *, max_input_depth: int, max_message_bytes: int
    ) -> None:
        self._executive = executive
        self._max_depth = max_input_depth
        # Room for the reply's other fields inside the gRPC message limit.
        self._max_output = max_message_bytes - 1024
        self._cards_json = [card_to_json(card).encode() for card in executive.organ_cards()]

    async def Stimulate(  # gRPC method name
        self, request: pb.StimulateRequest, context: Context
    ) -> pb.StimulateResponse:
        started = time.perf_counter()
        op = request.op
        call_context = dict(request.context)
        trace_id = call_context.get("trace_id") or os.urandom(16).hex()
        call_context["trace_id"] = trace_id
        try:
            value = decode_input(request.input_json, self._max_depth)
        except WireError as exc:
            log.info("call", op=op, outcome="BadRequest", trace_id=trace_id)
            await context.abort(exc.code, exc.message)
        if isinstance(value, dict):
            response = await self._executive.stimulate(Stimulus(op, value, call_context))
        else:
            response = Response.failure(
                ErrorKind.INVALID_INPUT, path="$", message="input must be a JSON object"
            )
        response, output = self._encoded(response, op, trace_id)
        log.info(
            "call",
            op=op,
            outcome="ok" if response.ok else (response.error or "Failed"),
            latency_ms=round((time.perf_counter() - started) * 1000.0, 3),
            trace_id=trace_id,
        )
        reply = pb.StimulateResponse(
            ok=response.ok, output_json=output, latency_ms=response.latency_ms
        )
        if response.cost is not None:
            reply.cost = response.cost
        return reply

    def _encoded(self, response: Response, op: str, trace_id: str) -> tuple[Response, bytes]:
        """The response and its JSON; an output that cannot be sent becomes an Internal error."""
        try:
            output = encode_output(response.output)
        except (TypeError, ValueError) as exc:
            log.error("output_not_json", op=op, error=str(exc), trace_id=trace_id)
            problem = "the organ's output is not JSON"
        else:
            if len(output) <= self._max_output:
                return response, output
            log.error("output_too_large", op=op, size=len(output), trace_id=trace_id)
            problem = f"the output exceeds the {self._max_output}-byte limit"
        failed = Response.failure(ErrorKind.INTERNAL, response.latency_ms, op=op, message=problem)
        return failed, encode_output(failed.output)

    async def Describe(self, request: pb.DescribeRequest, context: Context) -> pb.DescribeResponse:
        return pb.DescribeResponse(organ_cards_json=self._cards_json)

    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        matches = self._executive.search_functions(request.query, request.tag or None)
        return pb.SearchResponse(
            matches=[
                pb.FunctionMatch(
                    organ=organ,
                    function_card_json=function_to_json(card).encode(),
                )
                for organ, card in matches
            ]
        )
