"""The sidecar process: load organs, serve them on channels, shut down cleanly on a signal.

Run on its own (`soma sidecar`), it serves one channel, "local", on `[sidecar].socket`, with a
fresh token written beside the socket (mode 0600) for whoever may read it. Run by the
supervisor, it serves an admin socket instead, through which the supervisor opens one channel
per runtime. Either way it holds the runtime directory's lock (`soma_runtime.runtime_lock`)
while it serves: under the supervisor, the supervisor's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
from pathlib import Path

import structlog

from sdk import protocol
from sidecar.access import AllowList, token_digest
from sidecar.admin import Admin, supervisor_only
from sidecar.bridge.keys import KeyCounts
from sidecar.channels import ChannelRegistry
from sidecar.credentials import CredentialBroker
from sidecar.descriptors import ensure_budget
from sidecar.dispatch import call_log_level
from sidecar.gateway import Gateway, GatewayServer
from sidecar.handover import ensure_usable
from sidecar.loading import load_organs
from sidecar.metrics import SomaCollector, serve_metrics
from sidecar.vault.async_vault import AsyncVault
from sidecar.vault.open import kek_provider, open_vault
from soma_runtime import Executive, jsonline, runtime_lock, tracing
from soma_runtime.config import ConfigError, SomaConfig
from soma_runtime.gateway_sockets import BRIDGE_SOCKETS_ENV, SOCKETS_ENV, sockets_from_env
from soma_runtime.layout import RuntimeLayout
from soma_runtime.owned_files import OwnedFile
from soma_runtime.unix import remove_socket

log = structlog.get_logger(component="sidecar")

LOCAL_CHANNEL = "local"


class HandedSocketsUnusable(RuntimeError):
    """The listening sockets the supervisor passed cannot be served."""


async def serve(config: SomaConfig, *, supervised: bool) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight calls and clean up.

    Every part is entered on one exit stack as it starts, so whatever fails (a gateway that
    cannot start, an organ that refuses to), each part already started is stopped, last first:
    no socket or channel outlives the process's serving.
    """
    settings = config.sidecar
    if not supervised and settings.socket is None:
        raise ConfigError("sidecar.socket: required to run the sidecar on its own")
    ensure_budget(config, supervised)
    # Before anything serves: under the supervisor, channels only open as runtimes register.
    await ensure_usable()
    if config.tracing.opentelemetry:
        tracing.enable_opentelemetry()
    async with contextlib.AsyncExitStack() as parts:
        # Before anything is bound or written in the runtime directory; released last.
        if supervised:
            lock = runtime_lock.inherit(config.runtime_dir, "soma sidecar --supervised", os.environ)
        else:
            lock = runtime_lock.acquire(config.runtime_dir, "soma sidecar")
        parts.callback(lock.release)
        # The one vault of this process: the credential broker and the vault organ share it.
        vault = AsyncVault(lambda: open_vault(config, durable=False))
        parts.push_async_callback(vault.close)
        broker = CredentialBroker(config.credential, vault, cache_s=config.vault.credential_cache_s)
        # Organs whose functions change while they run (upstream MCP servers) re-register
        # their cards with the executive they are given.
        executive = Executive()
        services = {AsyncVault: vault, CredentialBroker: broker, Executive: executive}
        for organ in load_organs(config, services):
            executive.register(organ)
        if config.credential or "vault" in executive.organ_names():
            # A key-encryption key others can read, or a wrong one, stops the start; a damaged
            # database does not (each vault call reports it, everything else keeps serving).
            kek_provider(config)
        registry = ChannelRegistry(executive, settings, broker, call_log_level(config.logging))
        stop = _stop_on_signals(parts)
        await executive.start()
        parts.push_async_callback(executive.stop)
        parts.push_async_callback(_cancel, asyncio.create_task(registry.watch()))
        parts.push_async_callback(registry.close_all, settings.grace_period)
        bridge_sockets = None
        if supervised:
            bridge_sockets = _handed_sockets(BRIDGE_SOCKETS_ENV, "bridge")
            layout = RuntimeLayout(config.runtime_dir)
            layout.prepare()
            admin = Admin(registry, executive, layout.channel_dir)
            admin_server = await jsonline.serve(layout.admin_socket, admin.handle, supervisor_only)
            parts.callback(remove_socket, layout.admin_socket)
            parts.callback(admin_server.close)
            gateway = await _start_gateway(config, broker, registry)
            if gateway is not None:
                parts.push_async_callback(gateway.stop)
            log.info("serving", admin=str(layout.admin_socket), organs=executive.organ_names())
        else:
            token_file = await _open_local_channel(config, registry)
            parts.callback(token_file.remove)
        key_counts = KeyCounts()
        if config.bridge:
            from sidecar.bridge.instance import serve_bridges  # the mcp SDK: for bridges only

            await parts.enter_async_context(
                serve_bridges(config, executive, broker, key_counts, bridge_sockets)
            )
        if config.metrics.listen is not None:
            collector = SomaCollector(executive, registry, key_counts)
            await parts.enter_async_context(serve_metrics(config, collector))
        await stop.wait()
        log.info("stopping", grace_s=settings.grace_period)
    log.info("stopped")


def _stop_on_signals(parts: contextlib.AsyncExitStack) -> asyncio.Event:
    """An event SIGTERM and SIGINT set, for as long as `parts` is open."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
        parts.callback(loop.remove_signal_handler, signum)
    return stop


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _start_gateway(
    config: SomaConfig, broker: CredentialBroker, registry: ChannelRegistry
) -> GatewayServer | None:
    """Serve the gateway on the listening sockets the supervisor passed, if it passed any."""
    sockets = _handed_sockets(SOCKETS_ENV, "gateway")
    if not sockets:
        return None
    ports = {sock.getsockname()[1]: runtime for runtime, sock in sockets.items()}
    app = Gateway(config.gateway, broker, registry.get, ports, call_log_level(config.logging))
    server = GatewayServer(app, list(sockets.values()), config.sidecar.grace_period)
    await server.start()
    log.info("gateway_serving", ports={runtime: port for port, runtime in ports.items()})
    return server


def _handed_sockets(variable: str, what: str) -> dict[str, socket.socket]:
    try:
        return sockets_from_env(variable)
    except (OSError, ValueError) as exc:
        raise HandedSocketsUnusable(
            f"{variable}: the {what} sockets passed cannot be used: {exc}"
        ) from None


async def _open_local_channel(config: SomaConfig, registry: ChannelRegistry) -> OwnedFile:
    """Serve the "local" channel on `[sidecar].socket`; returns the token file it wrote."""
    assert config.sidecar.socket is not None
    grpc_path = config.resolve(config.sidecar.socket)
    auth_path = Path(protocol.auth_socket_for(str(grpc_path)))
    token_path = Path(protocol.token_file_for(str(grpc_path)))
    channel = await registry.open(LOCAL_CHANNEL, grpc_path, auth_path, AllowList(["*"]))
    token = secrets.token_hex(32)
    token_file = OwnedFile.write(token_path, token + "\n")
    channel.reset(token_digest(token), pid=None, pending=False)
    # The operator's own channel: every configured credential may be used through it.
    channel.credentials = frozenset(c.name for c in config.credential)
    log.info("serving", socket=str(grpc_path), token_file=str(token_path))
    return token_file
