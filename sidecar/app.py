"""The sidecar process: load organs, serve them, shut down cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal

import structlog

from sidecar.loading import load_organs
from sidecar.server import SocketServer
from sidecar.service import SidecarService
from soma_runtime import Executive
from soma_runtime.config import ConfigError, SomaConfig

log = structlog.get_logger(component="sidecar")


async def serve(config: SomaConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight calls and clean up."""
    settings = config.sidecar
    if settings.socket is None:
        raise ConfigError("sidecar.socket: required to run the sidecar on its own")
    executive = Executive(load_organs(config))
    servicer = SidecarService(
        executive,
        max_input_depth=settings.max_input_depth,
        max_message_bytes=settings.max_message_bytes,
    )
    server = SocketServer(config.resolve(settings.socket), servicer, settings.max_message_bytes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await executive.start()
    try:
        await server.start()
        log.info("serving", socket=str(server.path), organs=executive.organ_names())
        await stop.wait()
        log.info("stopping", grace_s=settings.grace_period)
        await server.stop(settings.grace_period)
    finally:
        await executive.stop()
    log.info("stopped")
