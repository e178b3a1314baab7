"""The supervisor's side of the sidecar's admin socket.

The supervisor is the authority on runtime identities. It keeps what each channel should be
(token digest, pid, allow-list) and sends it to the sidecar; after a sidecar restart it sends
everything again, so runtimes keep their tokens across sidecar restarts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from soma_runtime import jsonline
from soma_runtime.admin_protocol import Liveness, Ping, Register, Status, Unregister

log = structlog.get_logger(component="supervisor")
_ATTEMPTS = 6  # about 3 s in all


class SidecarLink:
    def __init__(self, admin_socket: Path) -> None:
        self.admin_socket = admin_socket
        self._wanted: dict[str, Register] = {}
        self._up = False
        self._lock = asyncio.Lock()

    async def ping(self) -> bool:
        """Whether the sidecar answers on its admin socket."""
        try:
            answer = await jsonline.request(self.admin_socket, Ping().model_dump(), timeout=1.0)
        except (OSError, TimeoutError):
            return False
        return bool(answer.get("ok"))

    async def liveness(self, timeout: float = 10.0) -> dict[str, str] | None:
        """Have the sidecar exercise every runtime channel; each channel's result (`ok`,
        `revived`, `unresponsive`), or None when the sidecar did not answer."""
        try:
            answer = await jsonline.request(
                self.admin_socket, Liveness().model_dump(), timeout=timeout
            )
        except (OSError, TimeoutError):
            return None
        channels = answer.get("channels")
        return channels if isinstance(channels, dict) else None

    async def status(self, timeout: float = 2.0) -> jsonline.Message | None:
        """The sidecar's channels and function stats, None when it does not answer."""
        try:
            answer = await jsonline.request(
                self.admin_socket, Status().model_dump(), timeout=timeout
            )
        except (OSError, TimeoutError):
            return None
        return answer if answer.get("ok") else None

    async def sidecar_up(self) -> None:
        """The sidecar (re)started and serves: give it every identity."""
        async with self._lock:
            self._up = True
            for register in list(self._wanted.values()):
                await self._send(register.model_dump())

    def sidecar_down(self) -> None:
        self._up = False

    async def register(self, register: Register) -> None:
        async with self._lock:
            self._wanted[register.runtime] = register
            await self._send(register.model_dump())

    async def unregister(self, runtime: str) -> None:
        async with self._lock:
            if self._wanted.pop(runtime, None) is not None:
                await self._send(Unregister(runtime=runtime).model_dump())

    async def _send(self, message: jsonline.Message) -> None:
        """Deliver one message, retrying a sidecar that is slow to answer. One that stays
        unreachable gets a warning; if it was dying, sidecar_up() sends everything again."""
        delay = 0.05
        for attempt in range(_ATTEMPTS):
            if not self._up:
                return
            try:
                answer = await jsonline.request(self.admin_socket, message)
                break
            except (OSError, TimeoutError) as exc:
                log.warning(
                    "admin_unreachable", op=message["op"], attempt=attempt + 1, error=str(exc)
                )
                await asyncio.sleep(delay)
                delay *= 2
        else:
            return
        if not answer.get("ok"):
            log.error(
                "admin_refused",
                op=message["op"],
                runtime=message.get("runtime"),
                error=answer.get("error"),
                message=answer.get("message"),
            )
