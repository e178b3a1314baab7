"""One grpc.aio server on one Unix socket, with the health and reflection services beside ours."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from sdk._proto.soma.v1 import sidecar_pb2, sidecar_pb2_grpc
from soma_runtime.unix import prepare_socket_path, private_umask, remove_socket

SERVICE_NAME = sidecar_pb2.DESCRIPTOR.services_by_name["Sidecar"].full_name


class SocketServer:
    """A started gRPC server bound to `path` (0600 in a 0700 directory)."""

    def __init__(
        self, path: Path, servicer: sidecar_pb2_grpc.SidecarServicer, max_message_bytes: int
    ):
        self.path = path
        self._servicer = servicer
        self._max_message_bytes = max_message_bytes
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()

    async def start(self) -> None:
        prepare_socket_path(self.path)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self._max_message_bytes),
                ("grpc.max_send_message_length", self._max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        sidecar_pb2_grpc.add_SidecarServicer_to_server(self._servicer, server)
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
            server.add_insecure_port(f"unix:{self.path}")
            await server.start()
        self.path.chmod(0o600)
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._server = server

    async def stop(self, grace: float) -> None:
        """Stop accepting calls, give in-flight ones `grace` seconds, remove the socket."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        self._server = None
        remove_socket(self.path)
