"""The two kinds of supervised process: the sidecar and an agent runtime."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from soma_runtime.admin_protocol import Register
from soma_runtime.config import RuntimeSection, SidecarSection, SomaConfig
from soma_runtime.layout import RuntimeLayout
from soma_runtime.supervisor.child import StartFailed, Supervised
from soma_runtime.supervisor.identity import mint_identity
from soma_runtime.supervisor.process import ChildProcess, Command
from soma_runtime.supervisor.sidecar_link import SidecarLink

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
    first on PATH so that "python" in a command means the interpreter running Soma."""
    env = {k: v for k, v in os.environ.items() if k not in strip and not k.startswith("SOMA_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class SidecarChild(Supervised):
    kind = "sidecar"

    def __init__(self, config: SomaConfig, link: SidecarLink) -> None:
        super().__init__("sidecar", config.sidecar)
        self._config = config
        self._link = link
        self.ready = asyncio.Event()  # set while the sidecar serves

    @property
    def settings(self) -> SidecarSection:
        return self._config.sidecar

    async def prepare(self) -> Command:
        assert self._config.source is not None
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "serve",
            "--supervised",
            "--config",
            str(self._config.source),
        ]
        return Command(argv, child_env(_SYSTEMD_ONLY), self._config.source.parent)

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

    async def exited(self) -> None:
        self.ready.clear()
        self._link.sidecar_down()


class RuntimeChild(Supervised):
    kind = "runtime"

    def __init__(
        self, config: SomaConfig, spec: RuntimeSection, link: SidecarLink, layout: RuntimeLayout
    ) -> None:
        super().__init__(spec.name, spec)
        self.spec = spec
        self._config = config
        self._link = link
        self._layout = layout
        self._digest = ""

    def _registration(self, pid: int | None) -> Register:
        return Register(
            runtime=self.name, token_sha256=self._digest, pid=pid, allow=self.spec.allow
        )

    async def prepare(self) -> Command:
        identity = mint_identity()
        self._digest = identity.digest
        # Registered before the process exists: its first handshake may come at once.
        await self._link.register(self._registration(pid=None))
        grpc_path = self._layout.channel_socket(self.name)
        env = child_env(_SYSTEMD_ONLY + _SIDECAR_ONLY)
        env.update(self.spec.env)
        env.update(
            {
                "SOMA_RUNTIME": self.name,
                "SOMA_SIDECAR_ADDRESS": f"unix://{grpc_path}",
                "SOMA_AUTH_SOCKET": str(grpc_path.with_name(f"{self.name}.auth.sock")),
                "SOMA_TOKEN_FD": str(identity.token_fd),
            }
        )
        cwd = self._config.resolve(self.spec.cwd) if self.spec.cwd else self._config_dir()
        return Command(list(self.spec.command), env, cwd, pass_fds=(identity.token_fd,))

    def _config_dir(self) -> Path:
        return self._config.source.parent if self._config.source else Path.cwd()

    async def started(self, child: ChildProcess) -> None:
        await self._link.register(self._registration(pid=child.pid))

    async def exited(self) -> None:
        # The token dies with the process: a restart gets a new one.
        await self._link.unregister(self.name)
