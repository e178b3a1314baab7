"""One grpc.aio server on one Unix socket, with the health and reflection services beside ours.

grpcio's asyncio server runs one main loop per server that accepts calls. An exception in that
loop ends it for good while the process lives on: the server then answers nothing (grpcio
1.85 decodes each call's `:path` there, so one request whose path is not UTF-8 does it, and a
gRPC server cannot refuse such a request before that loop sees it). A `SocketServer` therefore
knows how to tell that its server died (`crashed`) and to put a new one on the same socket
(`revive`); the channel registry watches every channel and does it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from sdk.protocol.soma.v1 import sidecar_pb2, sidecar_pb2_grpc
from sidecar.service import SidecarService
from soma_runtime.unix import prepare_socket_path, private_umask, remove_socket

SERVICE = sidecar_pb2.DESCRIPTOR.services_by_name["Sidecar"]
SERVICE_NAME = SERVICE.full_name

# How long stopping a crashed server may take before it is abandoned.
_STOP_CRASHED_S = 2.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one socket's connections may hold of the sidecar's descriptors and time.

    grpcio closes a connection over `max_connections` as soon as it is accepted, drops one that
    has not finished its HTTP/2 handshake after `handshake_timeout_s`, and closes a connection
    with no call in flight for `idle_timeout_s` (clients reconnect by themselves).
    """

    max_connections: int
    handshake_timeout_s: float
    idle_timeout_s: float


class _Undecodable:
    """What the deserializer hands over in place of a message that is not protobuf."""


_UNDECODABLE = _Undecodable()
Behaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialize


def _refusing_undecodable(behaviour: Behaviour, type_name: str) -> Behaviour:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is _UNDECODABLE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {type_name}"
            )
        return await behaviour(request, context)

    return handle


def service_handlers(
    servicer: sidecar_pb2_grpc.SidecarServicer,
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The `soma.v1.Sidecar` handlers, built from the service descriptor like the generated
    registration, except that a request that is not protobuf is INVALID_ARGUMENT (the
    contract in sidecar.proto): grpcio answers a deserializer's failure with UNKNOWN, which a
    client cannot tell from a sidecar fault."""
    handlers = {}
    for method in SERVICE.methods:
        deserialize = _lenient(GetMessageClass(method.input_type).FromString)
        serialize = GetMessageClass(method.output_type).SerializeToString
        behaviour = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            # Each frame is decoded on its own: the behaviour gets what is not a message as
            # a frame that is not an instance of its request type, and refuses it itself.
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behaviour, request_deserializer=deserialize, response_serializer=serialize
            )
        elif method.client_streaming or method.server_streaming:
            raise NotImplementedError(f"{method.full_name}: half-streaming is not registered")
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _refusing_undecodable(behaviour, method.input_type.full_name),
                request_deserializer=deserialize,
                response_serializer=serialize,
            )
    return handlers


class SocketServer:
    """A started gRPC server bound to `path` (0600 in a 0700 directory)."""

    def __init__(
        self,
        path: Path,
        servicer: SidecarService,
        max_message_bytes: int,
        limits: ConnectionLimits,
    ):
        self.path = path
        self._servicer = servicer
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.max_allowed_incoming_connections", limits.max_connections),
            ("grpc.server_handshake_timeout_ms", int(limits.handshake_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", int(limits.idle_timeout_s * 1000)),
        ]
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self.revivals = 0
        # The name the socket was bound under: what its connections' getsockname() says.
        self.bound = path

    async def start(self) -> None:
        prepare_socket_path(self.path)
        self._server = await self._serve(self.path)

    async def _serve(self, bind_path: Path) -> grpc.aio.Server:
        server = grpc.aio.server(options=self._options)
        handlers = service_handlers(self._servicer)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        with private_umask():
            server.add_insecure_port(f"unix:{bind_path}")
            await server.start()
        bind_path.chmod(0o600)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self.bound = bind_path
        return server

    async def crashed(self) -> BaseException | None:
        """The exception that ended this server's main loop, None while it serves.

        `wait_for_termination` is grpcio's one public view of it: with a timeout it re-raises
        what crashed the loop, and otherwise returns once the wait timed out (still serving).
        """
        if self._server is None:
            return None
        try:
            await self._server.wait_for_termination(timeout=0)
        except Exception as exc:
            return exc
        return None

    async def revive(self) -> None:
        """Put a new server on the socket of a crashed one. The servicer (and with it the
        channel's sessions) is kept, so clients simply reconnect.

        The new server is bound under a fresh name beside the socket and renamed over it
        once the crashed one has stopped (grpcio unlinks a server's socket path when it
        stops, which would remove the new socket if it were already there). The crashed
        server's calls are cancelled: a call that arrives on an old connection after the
        crash is never dispatched and would otherwise hang to its deadline; cancelled, the
        SDK sends it again when that is safe (as after a sidecar restart)."""
        fresh = self.path.with_name(f".{secrets.token_hex(4)}.sock")
        prepare_socket_path(fresh)
        crashed, self._server = self._server, await self._serve(fresh)
        if crashed is not None:
            with contextlib.suppress(Exception):  # the crash may have left it half shut down
                async with asyncio.timeout(_STOP_CRASHED_S):
                    await crashed.stop(None)
        os.replace(fresh, self.path)
        self.revivals += 1

    def drain(self) -> None:
        """Have the servicer's streams answer their calls in flight and end (a stream is one
        call that would otherwise hold the server's stop for its whole grace period)."""
        self._servicer.drain()

    async def stop(self, grace: float) -> None:
        """Stop accepting calls, give in-flight ones `grace` seconds, remove the socket."""
        if self._server is None:
            return
        server, self._server = self._server, None
        await self._health.enter_graceful_shutdown()
        self._servicer.drain()
        await server.stop(grace)
        remove_socket(self.path)
