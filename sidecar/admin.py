"""The sidecar's admin socket: the supervisor registers and unregisters runtime channels.

Only the supervisor may use it: the socket is 0600 in a private directory, and the kernel's
peer credentials must show the sidecar's own parent process, running as the same user.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import structlog
from pydantic import TypeAdapter, ValidationError

from sidecar.access import AllowList
from sidecar.channels import ChannelRegistry, socket_paths
from soma_runtime import Executive, jsonline
from soma_runtime.admin_protocol import AdminRequest, Register, Unregister
from soma_runtime.config import format_errors
from soma_runtime.unix import Peer, ensure_private_dir

log = structlog.get_logger(component="sidecar")

_REQUEST: TypeAdapter[AdminRequest] = TypeAdapter(AdminRequest)


def supervisor_only(peer: Peer) -> str | None:
    if peer.uid != os.geteuid():
        return f"uid {peer.uid} is not the sidecar's user"
    if peer.pid != os.getppid():
        return f"pid {peer.pid} is not the supervisor"
    return None


class Admin:
    """Answers admin requests against the channel registry."""

    def __init__(self, registry: ChannelRegistry, executive: Executive, socket_dir: Path) -> None:
        self._registry = registry
        self._executive = executive
        self._socket_dir = socket_dir

    async def handle(self, message: jsonline.Message, peer: Peer) -> jsonline.Message:
        try:
            request = _REQUEST.validate_python(message)
        except ValidationError as exc:
            return {"ok": False, "error": "bad_request", "message": format_errors(exc)}
        if isinstance(request, Register):
            await self._register(request)
            return {"ok": True}
        if isinstance(request, Unregister):
            await self._registry.close(request.runtime)
            return {"ok": True}
        if request.op == "status":
            return {"ok": True, "pid": os.getpid(), **self.status()}
        if request.op == "liveness":
            return {"ok": True, "channels": await self._registry.probe()}
        return {"ok": True, "pid": os.getpid()}

    async def _register(self, request: Register) -> None:
        channel = self._registry.get(request.runtime)
        allow = AllowList(request.allow)
        if channel is None:
            ensure_private_dir(self._socket_dir)
            grpc_path, auth_path = socket_paths(self._socket_dir, request.runtime)
            channel = await self._registry.open(request.runtime, grpc_path, auth_path, allow)
        elif channel.allow.patterns != allow.patterns:
            channel.allow = allow
        channel.credentials = frozenset(request.credentials)
        channel.gateways = frozenset(request.gateways)
        placeholder = request.placeholder_sha256
        channel.identify(
            bytes.fromhex(request.token_sha256),
            request.pid,
            pending=request.pid is None,
            placeholder=bytes.fromhex(placeholder) if placeholder else None,
        )
        log.info("runtime_registered", runtime=request.runtime, pid=request.pid)

    def status(self) -> dict[str, object]:
        return {
            "channels": [
                {
                    "runtime": c.name,
                    "pid": c.pid,
                    "sessions": len(c.sessions),
                    "allow": list(c.allow.patterns),
                    "calls": c.calls,
                    "denials": c.denials,
                }
                for c in self._registry.channels()
            ],
            "functions": [
                # The histogram is the metrics endpoint's: the quantiles say it here.
                {**asdict(s, dict_factory=_without_histogram), "meets_slo": s.meets_slo}
                for s in self._executive.function_stats()
            ],
        }


def _without_histogram(items: list[tuple[str, object]]) -> dict[str, object]:
    return {k: v for k, v in items if k not in ("cumulative", "sum_ms")}
