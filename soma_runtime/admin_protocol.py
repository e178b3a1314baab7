"""Messages of the sidecar's admin socket, shared by the supervisor (client) and the sidecar.

The supervisor is the authority on identities: it mints each runtime's token, keeps only its
digest, and tells the sidecar which digest, pid and allow-list belong to which runtime.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from soma_runtime.config import RUNTIME_NAME


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Register(_Message):
    """Open (or update) a runtime's channel; a new identity (token, pid, placeholder) replaces
    the old one and ends its sessions, the same one again changes nothing.

    `pid` None means the runtime is about to be started: handshakes are answered "retry"
    until a second `Register` names its pid.
    """

    op: Literal["register"] = "register"
    runtime: str = Field(pattern=RUNTIME_NAME)
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    pid: int | None = Field(default=None, gt=0)
    allow: list[str] = Field(default_factory=list)
    credentials: list[str] = Field(default_factory=list)
    # The runtime's gateway placeholder (digest) and the gateways it may use with it.
    placeholder_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    gateways: list[str] = Field(default_factory=list)


class Unregister(_Message):
    """Close a runtime's channel: its token and sessions die, its sockets are removed."""

    op: Literal["unregister"] = "unregister"
    runtime: str = Field(pattern=RUNTIME_NAME)


class Ping(_Message):
    op: Literal["ping"] = "ping"


class Status(_Message):
    op: Literal["status"] = "status"


class Liveness(_Message):
    """Exercise every runtime channel as a client would (a crashed server is revived, then a
    health check over its gRPC socket and a live handshake server). The answer's `channels`
    maps each runtime to `ok`, `revived` or `unresponsive`."""

    op: Literal["liveness"] = "liveness"


AdminRequest = Register | Unregister | Ping | Status | Liveness
