"""The `soma.v1.Sidecar` gRPC service of one channel: Stimulate, Describe and Search.

Every call must carry a session of this channel (`authorization: Bearer <session>`), and may
only reach functions the channel's allow-list names. Organ failures are answered as responses;
gRPC statuses are for transport and access problems.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from sdk import protocol
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from sidecar.access import AllowList, Channel
from sidecar.credentials import CredentialBroker, CredentialDenied
from sidecar.injection import inject_credentials
from sidecar.wire import WireError, decode_input, encode_output
from soma_runtime import ErrorKind, Executive, FunctionCard, OrganCard, Response, Stimulus
from soma_runtime.card_files import card_to_json, function_to_json
from soma_runtime.throttle import RepeatedWarnings

log = structlog.get_logger(component="sidecar")

Context = grpc.aio.ServicerContext[Any, Any]
BEARER = protocol.BEARER.lower()


class SidecarService(pb_grpc.SidecarServicer):
    """Serves one channel."""

    def __init__(
        self,
        executive: Executive,
        channel: Channel,
        broker: CredentialBroker,
        *,
        max_input_depth: int,
        max_message_bytes: int,
        warnings: RepeatedWarnings,
    ) -> None:
        self._executive = executive
        self._channel = channel
        self._broker = broker
        # Refusals are logged through it: a flood of them costs a line per interval.
        self._warnings = warnings
        self._max_depth = max_input_depth
        # Room for the reply's other fields inside the gRPC message limit.
        self._max_output = max_message_bytes - 1024
        self._cards: tuple[AllowList, list[bytes]] | None = None

    async def _authenticate(self, context: Context, op: str = "") -> None:
        for key, value in context.invocation_metadata() or ():
            if key == protocol.AUTHORIZATION and isinstance(value, str):
                if value[: len(BEARER)].lower() == BEARER and self._channel.session_matches(
                    value[len(BEARER) :]
                ):
                    return
                break
        name = self._channel.name
        self._warnings.warning("unauthenticated", name, runtime=name, op=op or None)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid session for this channel")

    async def Stimulate(
        self, request: pb.StimulateRequest, context: Context
    ) -> pb.StimulateResponse:
        started = time.perf_counter()
        op = request.op
        await self._authenticate(context, op)
        channel = self._channel
        call_context = dict(request.context)
        trace_id = call_context.get("trace_id") or os.urandom(16).hex()
        call_context["trace_id"] = trace_id
        # The organ learns the caller from the channel, never from what the caller wrote.
        call_context["runtime"] = channel.name
        if not channel.allow.allows(op):
            self._warnings.warning(
                "denied", (channel.name, op), runtime=channel.name, op=op, trace_id=trace_id
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"runtime {channel.name!r} may not call {op!r}"
            )
        try:
            value = decode_input(request.input_json, self._max_depth)
        except WireError as exc:
            log.info("call", runtime=channel.name, op=op, outcome="BadRequest", trace_id=trace_id)
            await context.abort(exc.code, exc.message)
        if isinstance(value, dict):
            stimulus = Stimulus(op, value, call_context, caller=channel.name)
            try:
                response = await self._executive.stimulate(stimulus, self._inject_credentials)
            except CredentialDenied as exc:
                log.warning(
                    "credential_denied",
                    runtime=channel.name,
                    op=op,
                    credential=exc.credential,
                    trace_id=trace_id,
                )
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        else:
            response = Response.failure(
                ErrorKind.INVALID_INPUT, path="$", message="input must be a JSON object"
            )
        response, output = self._encoded(response, op, trace_id)
        log.info(
            "call",
            runtime=channel.name,
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

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: Context
    ) -> AsyncIterator[pb.StreamResponse]:
        """First cut: registered, not yet served (the dispatch core comes next)."""
        await self._authenticate(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the stream is not served yet")
        yield pb.StreamResponse()  # never reached; makes this the async generator gRPC expects

    async def _inject_credentials(
        self, organ: str, card: FunctionCard, stimulus: Stimulus
    ) -> Stimulus | Response:
        """The credentials the card asks for, for this channel's runtime."""
        channel = self._channel
        return await inject_credentials(
            self._broker, organ, card, stimulus, caller=channel.name, allowed=channel.credentials
        )

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
        await self._authenticate(context)
        allow = self._channel.allow
        if self._cards is None or self._cards[0] is not allow:  # built once per allow-list
            visible = (visible_card(card, allow) for card in self._executive.organ_cards())
            self._cards = (allow, [card_to_json(c).encode() for c in visible if c is not None])
        return pb.DescribeResponse(organ_cards_json=self._cards[1])

    async def Search(self, request: pb.SearchRequest, context: Context) -> pb.SearchResponse:
        await self._authenticate(context)
        matches = self._executive.search_functions(request.query, request.tag or None)
        allow = self._channel.allow
        return pb.SearchResponse(
            matches=[
                pb.FunctionMatch(organ=organ, function_card_json=function_to_json(card).encode())
                for organ, card in matches
                if allow.allows(card.name)
            ]
        )


def visible_card(card: OrganCard, allow: AllowList) -> OrganCard | None:
    """`card` cut down to the functions `allow` lets through; None when it lets none."""
    allows = allow.allows
    subs = [
        sub.model_copy(update={"functions": [f for f in sub.functions if allows(f.name)]})
        for sub in card.sub_organs
    ]
    subs = [sub for sub in subs if sub.functions]
    functions = [f for f in card.functions if allows(f.name)]
    if not functions and not subs:
        return None
    return card.model_copy(update={"functions": functions, "sub_organs": subs})
