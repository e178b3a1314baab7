"""A runtime's gRPC socket: accepted by the sidecar's own code, served by grpc.aio servers.

gRPC cannot say who is at the other end of a connection, so the socket is not gRPC's: the
sidecar binds it and accepts each connection itself, reads the kernel's peer credentials
(SO_PEERCRED) before a byte of it is read, and hands it (`sidecar.handover`) to one of two
grpc.aio servers: the channel's own when the channel's gate admits the peer, and otherwise its
outsider server, which answers every `soma.v1.Sidecar` call UNAUTHENTICATED, whatever session
it carries, and serves health and reflection like the other. So a session taken out of a
runtime's process tree is refused from its first call, and a process outside the tree holds
none of the channel's connections. This costs a little per connection and nothing per call.

grpcio's asyncio server runs one main loop per server that accepts calls. An exception in that
loop ends it for good while the process lives on: the server then answers nothing (grpcio
1.85 decodes each call's `:path` there, so one request whose path is not UTF-8 does it, and a
gRPC server cannot refuse such a request before that loop sees it). A `SocketServer` therefore
knows how to tell that one of its servers died (`crashed`) and to put a new one in its place
(`revive`); the channel registry watches every channel and does it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
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
from sidecar.handover import Handover
from sidecar.service import SidecarService
from soma_runtime.throttle import RepeatedWarnings
from soma_runtime.unix import (
    Peer,
    peer_credentials,
    prepare_socket_path,
    private_umask,
    remove_socket,
)

SERVICE = sidecar_pb2.DESCRIPTOR.services_by_name["Sidecar"]
SERVICE_NAME = SERVICE.full_name

# Connections a channel's outsider server holds at once: room for the health checks of the
# user's tools; more are closed as they are handed over (see sidecar.descriptors).
OUTSIDER_MAX_CONNECTIONS = 8
# How long stopping a crashed server may take before it is abandoned.
_STOP_CRASHED_S = 2.0
# Out of descriptors, the socket is not accepted on for this long (it would stay readable, and
# the event loop would spin on it); connections wait in the backlog meanwhile.
_ACCEPT_PAUSE_S = 1.0
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one socket's connections may hold of the sidecar's descriptors and time.

    grpcio closes a connection over `max_connections` as soon as it is handed over, drops one
    that has not finished its HTTP/2 handshake after `handshake_timeout_s`, and closes a
    connection with no call in flight for `idle_timeout_s` (clients reconnect by themselves).
    The outsider server takes `OUTSIDER_MAX_CONNECTIONS` instead.
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


@dataclass(frozen=True, slots=True)
class _Served:
    """A started grpc.aio server and the port it is handed connections through."""

    server: grpc.aio.Server
    handover: Handover


class SocketServer:
    """A Unix socket at `path` (0600 in a 0700 directory) whose connections `gate` admits to
    `servicer`'s server and turns away to `outsider`'s."""

    def __init__(
        self,
        path: Path,
        servicer: SidecarService,
        outsider: sidecar_pb2_grpc.SidecarServicer,
        max_message_bytes: int,
        limits: ConnectionLimits,
        gate: Callable[[Peer], bool],
        warnings: RepeatedWarnings,
    ):
        self.path = path
        self._servicer = servicer
        # Served in this order: `_served[0]` is the channel's own server, `[1]` the outsider.
        self._servicers: tuple[sidecar_pb2_grpc.SidecarServicer, ...] = (servicer, outsider)
        self._gate = gate
        self._warnings = warnings
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.server_handshake_timeout_ms", int(limits.handshake_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", int(limits.idle_timeout_s * 1000)),
        ]
        self._caps = (limits.max_connections, OUTSIDER_MAX_CONNECTIONS)
        self._served: list[_Served] = []
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._health = HealthServicer()  # both servers answer for the channel
        self.revivals = 0

    async def start(self) -> None:
        """Start both servers, then bind the socket: no connection waits for a server."""
        self._served = [await self._serve(index) for index in range(len(self._servicers))]
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        prepare_socket_path(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with private_umask():
                listener.bind(os.fspath(self.path))
            self.path.chmod(0o600)
            listener.listen()
            listener.setblocking(False)
        except BaseException:
            listener.close()
            await self._stop_servers(0)
            raise
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept(listener))

    async def _serve(self, index: int) -> _Served:
        """A started server for `self._servicers[index]`, taking connections by hand-over."""
        handover = Handover()
        cap = ("grpc.max_allowed_incoming_connections", self._caps[index])
        server = grpc.aio.server(options=[*self._options, cap, handover.option])
        handlers = service_handlers(self._servicers[index])
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
        handover.attach(server)
        await server.start()
        return _Served(server, handover)

    async def _accept(self, listener: socket.socket) -> None:
        """Take the socket's connections one by one, for as long as it is open."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    # The socket stays readable: accepting again at once would spin.
                    self._warnings.warning(
                        "accept_paused", str(self.path), socket=str(self.path), error=exc.strerror
                    )
                    await asyncio.sleep(_ACCEPT_PAUSE_S)
                continue  # otherwise that connection is gone (ECONNABORTED and the like)
            try:
                await self._admit(listener, connection)
            except OSError:
                connection.close()  # gone before it was judged
            except Exception as exc:
                # A fault of ours with this connection must not end the accepting (nothing
                # would restart it, and the socket would answer no one again): that one
                # connection is closed, and its client connects again.
                connection.close()
                self._warnings.warning(
                    "accept_failed", str(self.path), socket=str(self.path), error=type(exc).__name__
                )

    async def _admit(self, listener: socket.socket, connection: socket.socket) -> None:
        """Judge the connection's peer and hand it to the server it goes to.

        A server whose main loop crashed is shut down by grpcio itself a moment later, and a
        connection handed to it then would be handed to freed memory; `_crash_of` knows of
        the crash as soon as it happened. Such a connection is closed (its client connects
        again, to the server the watcher puts in place), as is one that arrives as the
        socket closes."""
        index = 0 if self._gate(peer_credentials(connection)) else 1
        served = self._served[index] if self._served else None
        if (
            served is not None
            and await _crash_of(served.server) is None
            # Still the socket's server (not stopped or replaced during that await); nothing
            # is awaited between this check and the hand-over.
            and self._listener is listener
            and self._served[index] is served
        ):
            served.handover.hand(listener, connection)
        else:
            connection.close()

    async def crashed(self) -> BaseException | None:
        """The exception that ended one of its servers' main loop, None while both serve."""
        for served in self._served:
            if (crash := await _crash_of(served.server)) is not None:
                return crash
        return None

    async def revive(self) -> None:
        """Put a new server in place of each one that crashed. The servicers (and with them
        the channel's sessions) are kept, and the socket stays, so clients simply reconnect.

        The new server takes the socket's next connections before the crashed one is stopped.
        The crashed server's calls are cancelled: a call that arrives on an old connection
        after the crash is never dispatched and would otherwise hang to its deadline;
        cancelled, the SDK sends it again when that is safe (as after a sidecar restart)."""
        for index, served in enumerate(self._served):
            if await _crash_of(served.server) is None:
                continue
            self._served[index] = await self._serve(index)
            with contextlib.suppress(Exception):  # the crash may have left it half shut down
                async with asyncio.timeout(_STOP_CRASHED_S):
                    await served.server.stop(None)
        self.revivals += 1

    def drain(self) -> None:
        """Have the servicer's streams answer their calls in flight and end (a stream is one
        call that would otherwise hold the server's stop for its whole grace period)."""
        self._servicer.drain()

    async def stop(self, grace: float) -> None:
        """Stop accepting, give in-flight calls `grace` seconds, remove the socket."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        listener.close()
        await self._health.enter_graceful_shutdown()
        self._servicer.drain()
        await self._stop_servers(grace)
        remove_socket(self.path)

    async def _stop_servers(self, grace: float) -> None:
        served, self._served = self._served, []
        await asyncio.gather(*(s.server.stop(grace) for s in served))


async def _crash_of(server: grpc.aio.Server) -> BaseException | None:
    """What ended `server`'s main loop, None while it serves. `wait_for_termination` is
    grpcio's one public view of it: with a timeout it re-raises what crashed the loop, and
    otherwise returns once the wait timed out (still serving)."""
    try:
        await server.wait_for_termination(timeout=0)
    except Exception as exc:
        return exc
    return None
