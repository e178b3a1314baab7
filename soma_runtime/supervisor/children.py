"""The two kinds of supervised process: the sidecar and an agent runtime."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from pathlib import Path

import structlog

from sdk import protocol
from soma_runtime.admin_protocol import Register
from soma_runtime.config import RuntimeSection, SidecarSection, SomaConfig
from soma_runtime.gateway_sockets import BRIDGE_SOCKETS_ENV, SOCKETS_ENV, handed
from soma_runtime.layout import RuntimeLayout
from soma_runtime.listeners import tcp_listener
from soma_runtime.logs import DIRECT_FD_ENV, DIRECT_NAME_ENV
from soma_runtime.runtime_lock import LOCK_FD_ENV
from soma_runtime.supervisor import keeper
from soma_runtime.supervisor.child import StartFailed, Supervised
from soma_runtime.supervisor.identity import Identity, mint_identity
from soma_runtime.supervisor.process import ChildProcess, Command
from soma_runtime.supervisor.sidecar_link import SidecarLink

log = structlog.get_logger(component="supervisor")

# Never passed to children: systemd's handles are the supervisor's alone.
_SYSTEMD_ONLY = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)
# Kept from agent runtimes: where the sidecar's key material is, and Soma's own settings.
_SIDECAR_ONLY = ("CREDENTIALS_DIRECTORY",)


def child_env(strip: tuple[str, ...]) -> dict[str, str]:
    """The supervisor's environment without `strip` and `SOMA_*`, with this Python's `bin`
    first on PATH so that "python" in a command means the interpreter running Soma, and the
    supervisor's mark (see `keeper`)."""
    env = {k: v for k, v in os.environ.items() if k not in strip and not k.startswith("SOMA_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(keeper.mark())
    return env


def gateway_socket() -> socket.socket:
    """A loopback listening socket for one runtime's gateway. The supervisor holds it for its
    whole life and hands it to each sidecar it starts, so the port never changes."""
    return tcp_listener("127.0.0.1", 0)


class SidecarChild(Supervised):
    kind = "sidecar"
    final_setup_error = True  # `soma sidecar` exits 2 on a bad organ, key or path

    def __init__(
        self,
        config: SomaConfig,
        link: SidecarLink,
        lock_fd: int,
        gateway_sockets: dict[str, socket.socket],
        bridge_sockets: dict[str, socket.socket],
    ) -> None:
        """`lock_fd` is the runtime directory's lock and the sockets are listening sockets,
        all held by the supervisor and handed to each start (see `soma_runtime.runtime_lock`
        and `soma_runtime.gateway_sockets`)."""
        super().__init__("sidecar", config.sidecar)
        self._config = config
        self._link = link
        self._lock_fd = lock_fd
        self._gateway_sockets = gateway_sockets
        self._bridge_sockets = bridge_sockets
        self.ready = asyncio.Event()  # set while the sidecar serves
        self._liveness: asyncio.Task[None] | None = None

    @property
    def settings(self) -> SidecarSection:
        return self._config.sidecar

    async def prepare(self) -> Command:
        assert self._config.source is not None
        argv = [
            sys.executable,
            "-m",
            "soma_cli",
            "sidecar",
            "--supervised",
            "--config",
            str(self._config.source),
        ]
        env = child_env(_SYSTEMD_ONLY)
        env[SOCKETS_ENV] = handed(self._gateway_sockets)
        env[BRIDGE_SOCKETS_ENV] = handed(self._bridge_sockets)
        env[LOCK_FD_ENV] = str(self._lock_fd)
        sockets = [*self._gateway_sockets.values(), *self._bridge_sockets.values()]
        fds = (self._lock_fd, *(s.fileno() for s in sockets))
        # The sidecar is trusted: it writes its events straight to our log stream (see
        # soma_runtime.supervisor.process), on a copy of it that is this start's alone. With
        # no stream to copy (stderr closed), its events come through its pipe like any child's.
        try:
            log_fd = os.dup(sys.stderr.fileno())
        except (AttributeError, OSError, ValueError):
            return Command(argv, env, self._config.source.parent, pass_fds=fds)
        env.update({DIRECT_FD_ENV: str(log_fd), DIRECT_NAME_ENV: self.name})
        cwd = self._config.source.parent
        return Command(argv, env, cwd, pass_fds=(*fds, log_fd), close_after_spawn=(log_fd,))

    async def started(self, child: ChildProcess) -> None:
        deadline = time.monotonic() + self.settings.start_timeout
        while not await self._link.ping():
            if child.returncode is not None:
                raise StartFailed("exited before serving")
            if time.monotonic() > deadline:
                raise StartFailed(f"not serving after {self.settings.start_timeout}s")
            await asyncio.sleep(0.02)
        await self._link.sidecar_up()
        self.ready.set()
        self._liveness = asyncio.create_task(self._check_liveness(child))

    async def _check_liveness(self, child: ChildProcess) -> None:
        """Every `liveness_interval` s, have the sidecar exercise every runtime channel (not
        only its admin socket: it revives a crashed channel server, and reports channels
        that do not answer). A sidecar that does not answer `liveness_failures` times in a
        row is hung, and restarted; one channel's trouble never restarts the sidecar."""
        failures = 0
        while True:
            await asyncio.sleep(self.settings.liveness_interval)
            channels = await self._link.liveness()
            if channels is not None:
                failures = 0
                for runtime, result in channels.items():
                    if result != "ok":
                        log.warning("channel_liveness", runtime=runtime, result=result)
                continue
            failures += 1
            log.warning("sidecar_liveness_failed", consecutive=failures)
            if failures >= self.settings.liveness_failures:
                log.error("sidecar_unresponsive", restarting=True)
                await child.stop(self.settings.stop_timeout)
                return

    async def exited(self) -> None:
        self.ready.clear()
        if self._liveness is not None:
            self._liveness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._liveness
            self._liveness = None
        self._link.sidecar_down()


class RuntimeChild(Supervised):
    kind = "runtime"

    def __init__(
        self,
        config: SomaConfig,
        spec: RuntimeSection,
        link: SidecarLink,
        layout: RuntimeLayout,
        gateway_port: int | None,
    ) -> None:
        super().__init__(spec.name, spec)
        self.spec = spec
        self._config = config
        self._link = link
        self._layout = layout
        self._gateway_port = gateway_port
        self._identity: Identity | None = None

    def _registration(self, pid: int | None) -> Register:
        assert self._identity is not None
        return Register(
            runtime=self.name,
            token_sha256=self._identity.digest,
            pid=pid,
            allow=self.spec.allow,
            credentials=self.spec.credentials,
            placeholder_sha256=self._identity.placeholder_digest if self.spec.gateways else None,
            gateways=self.spec.gateways,
        )

    def _gateway_env(self, placeholder: str) -> dict[str, str]:
        """Each gateway's base URL and the placeholder, under the names its SDK reads."""
        env = {}
        for gateway in self._config.gateway:
            if gateway.name in self.spec.gateways:
                env[gateway.base_url_env] = f"http://127.0.0.1:{self._gateway_port}/{gateway.name}"
                env[gateway.api_key_env] = placeholder
        return env

    async def prepare(self) -> Command:
        identity = mint_identity()
        self._identity = identity
        # Registered before the process exists: its first handshake may come at once.
        await self._link.register(self._registration(pid=None))
        grpc_path = self._layout.channel_socket(self.name)
        env = child_env(_SYSTEMD_ONLY + _SIDECAR_ONLY)
        env.update(self.spec.env)
        env.update(self._gateway_env(identity.placeholder))
        env.update(
            {
                protocol.RUNTIME_ENV: self.name,
                protocol.ADDRESS_ENV: f"unix://{grpc_path}",
                protocol.AUTH_SOCKET_ENV: protocol.auth_socket_for(str(grpc_path)),
                protocol.TOKEN_FD_ENV: str(identity.token_fd),
            }
        )
        cwd = self._config.resolve(self.spec.cwd or Path("."))  # default: the config's directory
        fds = (identity.token_fd,)
        return Command(list(self.spec.command), env, cwd, pass_fds=fds, close_after_spawn=fds)

    async def started(self, child: ChildProcess) -> None:
        await self._link.register(self._registration(pid=child.pid))

    async def exited(self) -> None:
        # The token and placeholder die with the process: a restart gets new ones.
        await self._link.unregister(self.name)
