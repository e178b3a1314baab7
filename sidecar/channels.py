"""The per-runtime channels: for each, a gRPC socket and a handshake socket beside it.

`<dir>/<name>.sock` serves gRPC; `<dir>/<name>.auth.sock` exchanges the runtime's token for a
session. The handshake is where the kernel's peer credentials are checked: the peer must run
as the sidecar's user and, when the channel knows its runtime's pid, be that process or one
of its descendants. A stolen token is useless from any other process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from sidecar.access import AllowList, Channel
from sidecar.credentials import CredentialBroker
from sidecar.server import SocketServer
from sidecar.service import SidecarService
from soma_runtime import Executive, jsonline
from soma_runtime.config import SidecarSection
from soma_runtime.unix import Peer, is_descendant, remove_socket

log = structlog.get_logger(component="sidecar")


def socket_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """The gRPC socket and the handshake socket of runtime `name`."""
    return directory / f"{name}.sock", directory / f"{name}.auth.sock"


def same_user(peer: Peer) -> str | None:
    if peer.uid != os.geteuid():
        return f"uid {peer.uid} is not the sidecar's user"
    return None


@dataclass(slots=True)
class _Host:
    channel: Channel
    grpc: SocketServer
    handshake: asyncio.Server
    auth_path: Path


class ChannelRegistry:
    """Opens, updates and closes channels by runtime name."""

    def __init__(
        self, executive: Executive, settings: SidecarSection, broker: CredentialBroker
    ) -> None:
        self._executive = executive
        self._settings = settings
        self._broker = broker
        self._hosts: dict[str, _Host] = {}

    def get(self, name: str) -> Channel | None:
        host = self._hosts.get(name)
        return host.channel if host is not None else None

    def channels(self) -> list[Channel]:
        return [host.channel for host in self._hosts.values()]

    async def open(self, name: str, grpc_path: Path, auth_path: Path, allow: AllowList) -> Channel:
        """Bind both sockets of a new channel; it refuses everything until it has a token."""
        channel = Channel(name=name, allow=allow)
        servicer = SidecarService(
            self._executive,
            channel,
            self._broker,
            max_input_depth=self._settings.max_input_depth,
            max_message_bytes=self._settings.max_message_bytes,
        )
        server = SocketServer(grpc_path, servicer, self._settings.max_message_bytes)
        await server.start()
        try:
            handshake = await jsonline.serve(
                auth_path, lambda message, peer: self._handshake(channel, message, peer), same_user
            )
        except BaseException:
            await server.stop(0)
            raise
        self._hosts[name] = _Host(channel, server, handshake, auth_path)
        log.info("channel_open", runtime=name, socket=str(grpc_path))
        return channel

    async def close(self, name: str, grace: float = 0.0) -> None:
        host = self._hosts.pop(name, None)
        if host is None:
            return
        host.channel.reset(None, None, False)
        host.handshake.close()
        with contextlib.suppress(TimeoutError):  # Python 3.12+ also waits for connections
            async with asyncio.timeout(1.0):
                await host.handshake.wait_closed()
        remove_socket(host.auth_path)
        await host.grpc.stop(grace)
        log.info("channel_closed", runtime=name)

    async def close_all(self, grace: float) -> None:
        """Stop every channel; in-flight calls get `grace` seconds, all channels at once."""
        await asyncio.gather(*(self.close(name, grace) for name in list(self._hosts)))

    async def _handshake(
        self, channel: Channel, message: jsonline.Message, peer: Peer
    ) -> jsonline.Message:
        token = message.get("token")
        if not isinstance(token, str) or not channel.token_matches(token):
            log.warning("handshake_refused", runtime=channel.name, pid=peer.pid, reason="bad token")
            return {
                "ok": False,
                "error": "unauthenticated",
                "message": "wrong token for this channel",
            }
        if channel.pending:
            return {"ok": False, "error": "retry", "message": "the runtime is being registered"}
        if channel.pid is not None and not is_descendant(peer.pid, channel.pid):
            log.warning(
                "handshake_refused",
                runtime=channel.name,
                pid=peer.pid,
                runtime_pid=channel.pid,
                reason="not the runtime's process",
            )
            return {
                "ok": False,
                "error": "unauthenticated",
                "message": "this process is not the runtime's",
            }
        return {"ok": True, "session": channel.open_session()}
