"""Getting a session for a channel: the runtime's token, exchanged on the handshake socket.

The token never travels in gRPC metadata: it is sent once, on the plain Unix socket beside
the channel, where the sidecar can read the kernel's peer credentials; the sidecar answers
with a session that calls carry as `authorization: Bearer <session>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from pathlib import Path

from sdk import protocol
from sdk.errors import DeadlineExceeded, SomaError, Unauthenticated

_RETRY_PAUSE = 0.02  # between handshake attempts while the sidecar (re)starts


def read_token_file(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise SomaError(f"cannot read the token file {path}: {exc.strerror}") from None


_fd_tokens: dict[int, str] = {}


def token_from_env() -> str | None:
    """The runtime's token from `$SOMA_TOKEN_FD` (preferred) or `$SOMA_TOKEN_FILE`.

    The descriptor is read once per process and made close-on-exec, so programs the runtime
    starts do not inherit it.
    """
    raw_fd = os.environ.get(protocol.TOKEN_FD_ENV)
    if raw_fd:
        fd = int(raw_fd)
        if fd not in _fd_tokens:
            try:
                _fd_tokens[fd] = os.pread(fd, protocol.MAX_HANDSHAKE_LINE, 0).decode().strip()
                os.set_inheritable(fd, False)
            except OSError as exc:
                raise SomaError(f"cannot read the token from fd {fd}: {exc.strerror}") from None
        return _fd_tokens[fd]
    path = os.environ.get(protocol.TOKEN_FILE_ENV)
    return read_token_file(path) if path else None


def _answer(raw: bytes) -> str | None:
    """The session from a handshake answer; None means "retry shortly"."""
    if not raw:
        return None  # the sidecar closed the connection (it is stopping): try again
    try:
        answer = json.loads(raw)
    except ValueError:
        raise Unauthenticated("UNAUTHENTICATED", "the handshake answer is not JSON") from None
    if answer.get("ok") and isinstance(answer.get("session"), str):
        return str(answer["session"])
    if answer.get("error") == protocol.RETRY:
        return None
    raise Unauthenticated("UNAUTHENTICATED", str(answer.get("message") or answer.get("error")))


# Failures that mean "the sidecar is not (yet) there": worth another attempt.
_TRANSIENT = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, TimeoutError)
_PENDING = "the runtime is being registered"


def _pause(auth_path: str, deadline: float | None, reason: str) -> float:
    """How long to wait before the next attempt: a pause, or what is left of the deadline
    when that is less. Once the deadline has passed, `DeadlineExceeded` saying why: a call
    waits for its sidecar to its deadline, like the gRPC call itself (`wait_for_ready`),
    and always ends with the same error."""
    if deadline is None:
        return _RETRY_PAUSE
    left = deadline - time.monotonic()
    if left <= 0.0:
        raise DeadlineExceeded("DEADLINE_EXCEEDED", f"no session from {auth_path}: {reason}")
    return min(_RETRY_PAUSE, left)


def handshake(auth_path: str, token: str, deadline: float | None) -> str:
    """A session for the channel (blocking); retries while the sidecar is not there yet."""
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(_remaining(deadline, 5.0))
                sock.connect(auth_path)
                # A refusal is written (and the connection closed) as soon as the sidecar
                # accepts: the send may then fail, and the answer is still there to read.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(protocol.handshake_request(token))
                with sock.makefile("rb") as stream:
                    session, reason = (
                        _answer(stream.readline(protocol.MAX_HANDSHAKE_LINE)),
                        _PENDING,
                    )
        except _TRANSIENT as exc:
            session, reason = None, type(exc).__name__
        if session is not None:
            return session
        time.sleep(_pause(auth_path, deadline, reason))


async def handshake_async(auth_path: str, token: str, deadline: float | None) -> str:
    """A session for the channel (asyncio); retries while the sidecar is not there yet."""
    while True:
        try:
            async with asyncio.timeout(_remaining(deadline, 5.0)):
                reader, writer = await asyncio.open_unix_connection(auth_path)
                try:
                    writer.write(protocol.handshake_request(token))
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        await writer.drain()
                    session, reason = _answer(await reader.readline()), _PENDING
                finally:
                    writer.close()
        except _TRANSIENT as exc:
            session, reason = None, type(exc).__name__
        if session is not None:
            return session
        await asyncio.sleep(_pause(auth_path, deadline, reason))


def _remaining(deadline: float | None, cap: float) -> float:
    if deadline is None:
        return cap
    return max(0.001, min(cap, deadline - time.monotonic()))
