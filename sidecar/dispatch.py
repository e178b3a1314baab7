"""One call's work on a channel, shared by unary Stimulate and the Stream.

`Dispatcher.call` does everything a call needs once its stream or RPC is authenticated: the
allow-list, strict JSON decoding, the executive with credential injection, output encoding and
the per-call log event. It never aborts anything: what unary Stimulate ends with a status comes
back as a `Refusal`, which the unary RPC turns into that status and the stream into that call's
CallError, so both transports answer every call alike.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc
import structlog

from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sidecar.access import Channel
from sidecar.credentials import CredentialBroker, CredentialDenied
from sidecar.injection import inject_credentials
from sidecar.wire import WireError, decode_input, encode_output
from soma_runtime import ErrorKind, Executive, FunctionCard, Response, Stimulus, tracing
from soma_runtime.config import LoggingSection
from soma_runtime.throttle import RepeatedWarnings

log = structlog.get_logger(component="sidecar")


@dataclass(frozen=True, slots=True)
class Refusal:
    """A call answered with a gRPC status instead of a response (the status's name and
    meaning are the same on both transports)."""

    code: grpc.StatusCode
    message: str


def call_log_level(settings: LoggingSection) -> int | None:
    """The level of the per-call `call` event, None when the configured level drops it (then
    not even its fields are built)."""
    level = logging.getLevelNamesMapping()[settings.calls.upper()]
    return level if level >= logging.getLevelNamesMapping()[settings.level.upper()] else None


class Dispatcher:
    """Runs one channel's calls."""

    __slots__ = (
        "_broker",
        "_call_level",
        "_channel",
        "_executive",
        "_max_depth",
        "_max_output",
        "_warnings",
    )

    def __init__(
        self,
        executive: Executive,
        channel: Channel,
        broker: CredentialBroker,
        *,
        max_input_depth: int,
        max_message_bytes: int,
        warnings: RepeatedWarnings,
        call_level: int | None,
    ) -> None:
        self._executive = executive
        self._channel = channel
        self._broker = broker
        # Refusals are logged through it, per runtime: a flood of them costs a line per
        # interval, whatever ops it names.
        self._warnings = warnings
        self._max_depth = max_input_depth
        # Room for the reply's other fields inside the gRPC message limit.
        self._max_output = max_message_bytes - 1024
        self._call_level = call_level

    @property
    def channel(self) -> Channel:
        return self._channel

    async def call(self, request: pb.StimulateRequest) -> pb.StimulateResponse | Refusal:
        """Run `request` for this channel's runtime (already authenticated)."""
        started = time.perf_counter()
        op = request.op
        channel = self._channel
        channel.calls += 1
        # (Copying an empty protobuf map still costs half a microsecond.)
        call_context = dict(request.context) if request.context else {}
        # The organ sees this hop's traceparent and trace_id in place of the caller's.
        span = tracing.start_call(op, call_context, runtime=channel.name)
        # A call cancelled (by its caller, its deadline or a stopping stream) still ends its
        # span, in the task that started it (OpenTelemetry detaches the context there).
        outcome = "Cancelled"
        try:
            result = await self._run(op, request.input_json, call_context, span)
            if isinstance(result, Refusal):
                outcome = result.code.name
                return result
            response, output = result
            outcome = "ok" if response.ok else (response.error or "Failed")
        finally:
            span.end(outcome)
        if self._call_level is not None:
            log.log(
                self._call_level,
                "call",
                runtime=channel.name,
                op=op,
                outcome=outcome,
                latency_ms=round((time.perf_counter() - started) * 1000.0, 3),
                trace_id=span.trace_id,
                span_id=span.span_id,
            )
        reply = pb.StimulateResponse(
            ok=response.ok, output_json=output, latency_ms=response.latency_ms
        )
        if response.cost is not None:
            reply.cost = response.cost
        return reply

    async def _run(
        self, op: str, input_json: bytes, call_context: dict[str, str], span: tracing.CallSpan
    ) -> tuple[Response, bytes] | Refusal:
        """The allow-list, the input, the organ: a refusal, or the response and its JSON."""
        channel = self._channel
        trace = span.trace_id
        # The organ learns the caller from the channel, never from what the caller wrote.
        call_context["runtime"] = channel.name
        if not channel.allow.allows(op):
            channel.denials += 1
            # Aggregated per runtime, not per op: the op is the caller's to vary.
            self._warnings.warning(
                "denied",
                channel.name,
                sample=("ops", op),
                runtime=channel.name,
                op=op,
                trace_id=trace,
            )
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED, f"runtime {channel.name!r} may not call {op!r}"
            )
        try:
            value = decode_input(input_json, self._max_depth)
        except WireError as exc:
            log.info("call", runtime=channel.name, op=op, outcome="BadRequest", trace_id=trace)
            return Refusal(exc.code, exc.message)
        if isinstance(value, dict):
            stimulus = Stimulus(op, value, call_context, caller=channel.name)
            try:
                response = await self._executive.stimulate(stimulus, self._inject_credentials)
            except CredentialDenied as exc:
                channel.denials += 1
                self._warnings.warning(
                    "credential_denied",
                    channel.name,
                    sample=("ops", op),
                    runtime=channel.name,
                    op=op,
                    credential=exc.credential,
                    trace_id=trace,
                )
                return Refusal(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        else:
            response = Response.failure(
                ErrorKind.INVALID_INPUT, path="$", message="input must be a JSON object"
            )
        return self._encoded(response, op, trace)

    async def _inject_credentials(
        self, organ: str, card: FunctionCard, stimulus: Stimulus
    ) -> Stimulus | Response:
        """The credentials the card asks for, for this channel's runtime."""
        if not card.credentials:  # most functions: no hop through the broker's coroutine
            return stimulus
        channel = self._channel
        return await inject_credentials(
            self._broker, organ, card, stimulus, caller=channel.name, allowed=channel.credentials
        )

    def _encoded(self, response: Response, op: str, trace: str) -> tuple[Response, bytes]:
        """The response and its JSON; an output that cannot be sent becomes an Internal error."""
        try:
            output = encode_output(response.output)
        except (TypeError, ValueError) as exc:
            log.error("output_not_json", op=op, error=str(exc), trace_id=trace)
            problem = "the organ's output is not JSON"
        else:
            if len(output) <= self._max_output:
                return response, output
            log.error("output_too_large", op=op, size=len(output), trace_id=trace)
            problem = f"the output exceeds the {self._max_output}-byte limit"
        failed = Response.failure(ErrorKind.INTERNAL, response.latency_ms, op=op, message=problem)
        return failed, encode_output(failed.output)
