"""Where the supervisor and the sidecar put their sockets inside the runtime directory.

<runtime_dir>/               0700
    soma.lock                held by the one supervisor or sidecar serving it (`runtime_lock`)
    supervisor.sock          `soma status` asks the supervisor here
    admin.sock               the supervisor drives the sidecar here
    rt/                      0700
        <runtime>.sock       the runtime's gRPC channel
        <runtime>.auth.sock  its handshake (token → session, peer credentials checked)
    bridges/                 0700
        <bridge>.url         where a bridge instance serves (`sidecar.bridge.published`)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdk import protocol
from soma_runtime.unix import ensure_private_dir


@dataclass(frozen=True, slots=True)
class RuntimeLayout:
    runtime_dir: Path

    @property
    def supervisor_socket(self) -> Path:
        return self.runtime_dir / "supervisor.sock"

    @property
    def admin_socket(self) -> Path:
        return self.runtime_dir / "admin.sock"

    @property
    def channel_dir(self) -> Path:
        return self.runtime_dir / "rt"

    def channel_socket(self, runtime: str) -> Path:
        return protocol.channel_socket(self.channel_dir, runtime)

    def prepare(self) -> None:
        ensure_private_dir(self.runtime_dir)
        ensure_private_dir(self.channel_dir)
