"""The per-runtime channels: for each, a gRPC socket and a handshake socket beside it.

`<dir>/<name>.sock` serves gRPC; `<dir>/<name>.auth.sock` exchanges the runtime's token for a
session. Both check the kernel's peer credentials of every connection as soon as it is
accepted, before a byte is read: the peer must run as the sidecar's user and, when the channel
knows its runtime's pid, be that process or one of its descendants. The handshake refuses
anyone else; the gRPC socket hands them to a server that refuses every call (see
`sidecar.server`). So a stolen token, or a session, is useless from any other process, from
its first call. When the runtime's pid changes, connections from outside the new tree are
shut down before a session of the new runtime exists (see `sidecar.sweep`): the channel
answers handshakes "retry" until the sweep, which runs in a thread, is done.

Channels are independent: each has its own gRPC servers, so whatever one runtime's socket
receives can stop at most those, and the registry's watcher replaces a server whose main loop
died at once (see `sidecar.server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from grpc import aio as grpc_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sdk import protocol
from sidecar.access import AllowList, Channel
from sidecar.credentials import CredentialBroker
from sidecar.dispatch import Dispatcher
from sidecar.server import ConnectionLimits, SocketServer
from sidecar.service import OutsiderService, SidecarService
from sidecar.sweep import close_foreign_connections
from soma_runtime import Executive, jsonline
from soma_runtime.config import SidecarSection
from soma_runtime.throttle import RepeatedWarnings, TokenBuckets
from soma_runtime.unix import Peer, is_descendant, remove_socket

log = structlog.get_logger(component="sidecar")

# The watcher looks at every channel's servers this often even when nothing woke it.
WATCH_INTERVAL_S = 1.0
# Failed handshakes a runtime's process may make in a burst, and per second after it; each
# one over that waits before its answer (at most HANDSHAKE_MAX_BACKOFF_S, as it holds one of
# the socket's connections): with the connection cap, at most ~30 failures a second.
HANDSHAKE_FAILURE_BURST = 10
HANDSHAKE_FAILURE_RATE = 5.0
HANDSHAKE_MAX_BACKOFF_S = 0.5
# A sweep that failed (out of descriptors, say) is tried again after this long; the channel
# admits no handshake meanwhile.
SWEEP_RETRY_S = 1.0


def socket_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """The gRPC socket and the handshake socket of runtime `name`."""
    grpc_path = protocol.channel_socket(directory, name)
    return grpc_path, Path(protocol.auth_socket_for(str(grpc_path)))


def same_user(peer: Peer) -> str | None:
    if peer.uid != os.geteuid():
        return f"uid {peer.uid} is not the sidecar's user"
    return None


def runtime_tree(channel: Channel) -> jsonline.Gate:
    """Admit the sidecar's user and, once the runtime's pid is known, only its process tree:
    another runtime connecting here is turned away before it can hold anything."""

    def gate(peer: Peer) -> str | None:
        refusal = same_user(peer)
        if refusal is None and channel.pid is not None and not is_descendant(peer.pid, channel.pid):
            refusal = f"pid {peer.pid} is not the runtime's process or one of its descendants"
        return refusal

    return gate


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def _tree_of(root: int) -> Callable[[int], bool]:
    return lambda pid: is_descendant(pid, root)


@dataclass(slots=True)
class _Host:
    channel: Channel
    grpc: SocketServer
    handshake: asyncio.Server
    auth_path: Path
    # The liveness probe's client, kept between probes (see `ChannelRegistry.probe`).
    probe: grpc_aio.Channel | None = None
    # The sweep under way (`ChannelRegistry._sweep`), and whether the pid changed since it
    # began (it then sweeps again, for the newest pid).
    sweep: asyncio.Task[None] | None = None
    sweep_again: bool = False


class _CrashAlarm(logging.Handler):
    """Wakes the watcher when grpcio logs an error: a crashed server main loop is logged by
    grpcio's `cygrpc` logger as it happens, so the replacement need not wait for a poll."""

    def __init__(self, wake: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.ERROR)
        self._wake = wake
        self._loop = loop

    def emit(self, record: logging.LogRecord) -> None:
        self._loop.call_soon_threadsafe(self._wake.set)


class ChannelRegistry:
    """Opens, updates and closes channels by runtime name."""

    def __init__(
        self,
        executive: Executive,
        settings: SidecarSection,
        broker: CredentialBroker,
        call_level: int | None,
    ) -> None:
        self._executive = executive
        self._call_level = call_level
        self._settings = settings
        self._broker = broker
        self._hosts: dict[str, _Host] = {}
        self._limits = ConnectionLimits(
            max_connections=settings.max_connections,
            handshake_timeout_s=settings.connection_handshake_timeout,
            idle_timeout_s=settings.connection_idle_timeout,
        )
        self._failures = TokenBuckets(HANDSHAKE_FAILURE_BURST, HANDSHAKE_FAILURE_RATE)
        self.warnings = RepeatedWarnings(log)
        self._outsider = OutsiderService()  # stateless: every channel's outsider server serves it

    def get(self, name: str) -> Channel | None:
        host = self._hosts.get(name)
        return host.channel if host is not None else None

    def channels(self) -> list[Channel]:
        return [host.channel for host in self._hosts.values()]

    async def open(self, name: str, grpc_path: Path, auth_path: Path, allow: AllowList) -> Channel:
        """Bind both sockets of a new channel; it refuses everything until it has a token."""
        channel = Channel(name=name, allow=allow)
        dispatcher = Dispatcher(
            self._executive,
            channel,
            self._broker,
            max_input_depth=self._settings.max_input_depth,
            max_message_bytes=self._settings.max_message_bytes,
            warnings=self.warnings,
            call_level=self._call_level,
        )
        servicer = SidecarService(
            self._executive,
            dispatcher,
            warnings=self.warnings,
            stream_max_in_flight=self._settings.stream_max_in_flight,
        )
        server = SocketServer(
            grpc_path,
            servicer,
            self._outsider,
            self._settings.max_message_bytes,
            self._limits,
            self._connection_gate(channel),
            self.warnings,
        )
        await server.start()
        try:
            handshake = await jsonline.serve(
                auth_path,
                lambda message, peer: self._handshake(channel, message, peer),
                runtime_tree(channel),
            )
        except BaseException:
            await server.stop(0)
            raise
        host = self._hosts[name] = _Host(channel, server, handshake, auth_path)
        channel.on_new_pid = lambda: self._sweep_soon(host)
        log.info("channel_open", runtime=name, socket=str(grpc_path))
        return channel

    def _connection_gate(self, channel: Channel) -> Callable[[Peer], bool]:
        """Whether a connection to `channel`'s gRPC socket reaches the channel's server: one
        the handshake would admit, or the sidecar's own (the liveness probe). Anyone else is
        logged, aggregated per runtime, and meets the outsider server."""
        admits = runtime_tree(channel)
        me = os.getpid()

        def gate(peer: Peer) -> bool:
            if peer.pid == me:
                return True
            refusal = admits(peer)
            if refusal is None:
                return True
            self.warnings.warning(
                "connection_refused",
                channel.name,
                sample=("pids", peer.pid),
                runtime=channel.name,
                pid=peer.pid,
                uid=peer.uid,
                reason=refusal,
            )
            return False

        return gate

    def _sweep_soon(self, host: _Host) -> None:
        """Shut down the connections to the channel's gRPC socket from outside the tree of
        the runtime's new pid (made while its pid was unknown, or by the runtime before).

        The sweep reads every descriptor of the sidecar (about 10 µs each), so it runs in a
        thread, not in the event loop that serves every channel; meanwhile the channel is
        `sweeping` and answers handshakes "retry", so no session of the new runtime exists
        before it is done. New connections are judged against the new pid as they arrive."""
        host.channel.sweeping = True
        host.sweep_again = True
        if host.sweep is None:
            host.sweep = asyncio.create_task(self._sweep(host))

    async def _sweep(self, host: _Host) -> None:
        path = str(host.grpc.path)
        try:
            while host.sweep_again and host.channel.pid is not None:
                host.sweep_again = False
                owners = {path: _tree_of(host.channel.pid)}
                try:
                    closed = await asyncio.to_thread(close_foreign_connections, owners)
                except Exception as exc:
                    self.warnings.warning(
                        "sweep_failed", path, socket=path, error=type(exc).__name__
                    )
                    host.sweep_again = True
                    await asyncio.sleep(SWEEP_RETRY_S)
                    continue
                for socket_path, count in closed.items():
                    log.warning("foreign_connections_closed", socket=socket_path, count=count)
        finally:
            host.sweep = None
            host.channel.sweeping = False

    async def close(self, name: str, grace: float = 0.0) -> None:
        host = self._hosts.pop(name, None)
        if host is None:
            return
        host.grpc.drain()  # before the reset: streams end UNAVAILABLE, not UNAUTHENTICATED
        host.channel.reset(None, None, False)
        if host.sweep is not None:
            host.sweep.cancel()
        host.handshake.close()
        with contextlib.suppress(TimeoutError):  # Python 3.12+ also waits for connections
            async with asyncio.timeout(1.0):
                await host.handshake.wait_closed()
        remove_socket(host.auth_path)
        if host.probe is not None:
            await host.probe.close()
        await host.grpc.stop(grace)
        log.info("channel_closed", runtime=name)

    async def close_all(self, grace: float) -> None:
        """Stop every channel; in-flight calls get `grace` seconds, all channels at once."""
        await asyncio.gather(*(self.close(name, grace) for name in list(self._hosts)))

    async def watch(self) -> None:
        """Replace every channel server whose main loop died, for as long as it runs: at once
        when grpcio logs an error, and at least every `WATCH_INTERVAL_S` seconds."""
        wake = asyncio.Event()
        alarm = _CrashAlarm(wake, asyncio.get_running_loop())
        grpc_log = logging.getLogger("grpc._cython.cygrpc")
        grpc_log.addHandler(alarm)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WATCH_INTERVAL_S):
                        await wake.wait()
                wake.clear()
                await self.repair()
        finally:
            grpc_log.removeHandler(alarm)

    async def repair(self) -> list[str]:
        """Revive the channel servers that crashed; the names of those revived."""
        revived = []
        for name, host in list(self._hosts.items()):
            crash = await host.grpc.crashed()
            if crash is None or self._hosts.get(name) is not host:
                continue
            log.error("channel_server_crashed", runtime=name, error=type(crash).__name__)
            await host.grpc.revive()
            log.info("channel_server_revived", runtime=name, revivals=host.grpc.revivals)
            revived.append(name)
        return revived

    async def probe(self, timeout: float = 2.0) -> dict[str, str]:
        """Exercise every channel as a client would: revive a crashed server, then a health
        check over its gRPC socket and a live handshake server. `ok`, `revived` or
        `unresponsive`, by runtime. An unresponsive channel is logged, never acted on beyond
        itself: a runtime that fills its own socket's connections must not get the sidecar
        (and with it every other runtime's channel) restarted.

        Each channel's probe keeps its connection from one probe to the next: a new one each
        time cost about 0.8 ms of CPU per channel (50 ms every 5 s with 64 runtimes, all of
        it stalling the event loop), a call on a kept one about 0.25 ms. A failed check drops
        it, so the next probe connects afresh, by the socket's path, as a runtime would; the
        path itself is checked every time."""

        async def check(host: _Host) -> bool:
            if not host.handshake.is_serving() or not _is_socket(host.grpc.path):
                return False
            if host.probe is None:
                host.probe = grpc.aio.insecure_channel(f"unix:{host.grpc.path}")
            try:
                reply = await health_pb2_grpc.HealthStub(host.probe).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout
                )
            except grpc.RpcError:
                probe, host.probe = host.probe, None
                await probe.close()
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        revived = set(await self.repair())
        hosts = list(self._hosts.items())
        results = await asyncio.gather(*(check(host) for _, host in hosts))
        answer = {}
        for (name, _), fine in zip(hosts, results, strict=True):
            if not fine:
                self.warnings.warning("channel_unresponsive", name, runtime=name)
            answer[name] = "unresponsive" if not fine else "revived" if name in revived else "ok"
        return answer

    async def _handshake(
        self, channel: Channel, message: jsonline.Message, peer: Peer
    ) -> jsonline.Message:
        token = message.get("token")
        if not isinstance(token, str) or not channel.token_matches(token):
            # Checked after the token, so a runtime is never slowed by someone else's failures.
            wait = self._failures.take((channel.name, peer.pid))
            if wait > 0.0:  # back-off for this peer alone, bounded: it holds a connection
                await asyncio.sleep(min(wait, HANDSHAKE_MAX_BACKOFF_S))
            self.warnings.warning(
                "handshake_refused",
                (channel.name, peer.pid),
                runtime=channel.name,
                pid=peer.pid,
                reason="bad token",
            )
            return {
                "ok": False,
                "error": protocol.UNAUTHENTICATED,
                "message": "wrong token for this channel",
            }
        if channel.pending or channel.sweeping:
            return {
                "ok": False,
                "error": protocol.RETRY,
                "message": "the runtime is being registered",
            }
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
                "error": protocol.UNAUTHENTICATED,
                "message": "this process is not the runtime's",
            }
        return {"ok": True, "session": channel.open_session()}
