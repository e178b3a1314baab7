"""The `soma.v1.Sidecar` gRPC service of one channel: Stimulate, Stream, Describe and Search,
and what a process outside the runtime's tree gets in its place (`OutsiderService`).

Every call must carry a session of this channel (`authorization: Bearer <session>`), and may
only reach functions the channel's allow-list names. Organ failures are answered as responses;
gRPC statuses are for transport and access problems. Stimulate and each call on a Stream run
through the same `Dispatcher` (sidecar.dispatch); a Stream is authenticated when it opens and
its session re-checked at every frame (sidecar.stream).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Never

import grpc
import structlog

from sdk import protocol
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from sidecar.access import AllowList, token_digest
from sidecar.dispatch import Dispatcher, Refusal
from sidecar.stream import CallStream
from soma_runtime import Executive, OrganCard
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
        dispatcher: Dispatcher,
        *,
        warnings: RepeatedWarnings,
        stream_max_in_flight: int,
    ) -> None:
        self._executive = executive
        self._channel = dispatcher.channel
        self._warnings = warnings
        self._dispatcher = dispatcher
        self._stream_max_in_flight = stream_max_in_flight
        self._streams: set[CallStream] = set()
        self._stopping = False
        self._cards: tuple[AllowList, list[bytes]] | None = None

    async def _authenticate(self, context: Context, op: str = "") -> bytes:
        """The digest of the call's session; aborts with UNAUTHENTICATED without one."""
        digest = self._session(context)
        if digest is None:
            name = self._channel.name
            self._warnings.warning("unauthenticated", name, runtime=name, op=op or None)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "no valid session for this channel"
            )
        return digest

    def _session(self, context: Context) -> bytes | None:
        for key, value in context.invocation_metadata() or ():
            if key == protocol.AUTHORIZATION and isinstance(value, str):
                session = value[len(BEARER) :]
                if value[: len(BEARER)].lower() == BEARER and self._channel.session_matches(
                    session
                ):
                    return token_digest(session)
                break
        return None

    async def Stimulate(
        self, request: pb.StimulateRequest, context: Context
    ) -> pb.StimulateResponse:
        await self._authenticate(context, request.op)
        outcome = await self._dispatcher.call(request)
        if isinstance(outcome, Refusal):
            await context.abort(outcome.code, outcome.message)
        return outcome

    # A coroutine handler that writes with context.write, which grpc.aio serves as well as a
    # response generator (the generated servicer's type only knows the latter): the calls'
    # own tasks write their answers, with no hop through a generator.
    async def Stream(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: Context
    ) -> None:
        digest = await self._authenticate(context)
        if self._stopping:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the sidecar is stopping")
        sessions = self._channel.sessions
        # Checked at every frame: a dictionary lookup of the digest the stream opened with
        # (a session revoked or reset leaves the channel's sessions).
        stream = CallStream(
            self._dispatcher, context, lambda: digest in sessions, self._stream_max_in_flight
        )
        self._streams.add(stream)
        try:
            await stream.serve(request_iterator)
        finally:
            self._streams.discard(stream)

    def drain(self) -> None:
        """The sidecar is stopping: every stream answers its calls in flight and ends with
        UNAVAILABLE, and no new stream opens (unary calls are left to the server's grace)."""
        self._stopping = True
        for stream in self._streams:
            stream.drain()

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


class OutsiderService(pb_grpc.SidecarServicer):
    """What a process outside the runtime's tree meets on the runtime's socket (see
    sidecar.server): every call refused UNAUTHENTICATED, whatever session it carries. A session
    is the runtime's, bound to its process tree; the refusal, unlike a closed connection,
    tells the client not to try again (the SDK asks the handshake once more, and the handshake
    says why)."""

    MESSAGE = "this process is not the runtime's or one of its descendants"

    async def Stimulate(self, request: pb.StimulateRequest, context: Context) -> Never:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.MESSAGE)

    async def Stream(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: Context
    ) -> Never:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.MESSAGE)

    async def Describe(self, request: pb.DescribeRequest, context: Context) -> Never:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.MESSAGE)

    async def Search(self, request: pb.SearchRequest, context: Context) -> Never:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.MESSAGE)


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
