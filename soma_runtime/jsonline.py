"""A tiny request/answer protocol over Unix sockets: one JSON object per line each way.

Used for the control channels that must not depend on gRPC (the supervisor's status socket,
the sidecar's admin socket, the per-runtime handshake). Every connection is checked against
the kernel's peer credentials before a byte of it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from soma_runtime import strict_json
from soma_runtime.throttle import RepeatedWarnings
from soma_runtime.unix import Peer, peer_credentials, prepare_socket_path, private_umask

MAX_LINE = 64 * 1024
# The deepest nesting a line may have: messages are flat objects of names, numbers and
# lists; the bound is checked before a line is parsed, so no line can exhaust the stack.
MAX_DEPTH = 16
# A connection silent this long is closed: none may hold a server open (or its shutdown up).
IDLE_TIMEOUT = 10.0
# Connections one server holds at once; more are closed as soon as they are accepted, so no
# peer can take every file descriptor of the process (a handshake needs one at a time).
HANDSHAKE_MAX_CONNECTIONS = 16

log = structlog.get_logger(component="jsonline")
# A peer refused over and over costs a line per interval, not a line per attempt.
_refusals = RepeatedWarnings(log)

Message = dict[str, Any]
Handler = Callable[[Message, Peer], Awaitable[Message]]
# Returns None to accept the peer, or the reason it is refused.
Gate = Callable[[Peer], str | None]


class ProtocolError(OSError):
    """The other end did not answer with one JSON object on one line."""


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def decode(line: bytes) -> Message:
    """One message (strict JSON, at most `MAX_DEPTH` deep); `ProtocolError` says what is wrong."""
    try:
        value = strict_json.loads(line, MAX_DEPTH)
    except strict_json.JsonError as exc:
        raise ProtocolError(f"the line {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("not a JSON object")
    return value


async def serve(
    path: Path, handler: Handler, gate: Gate, max_connections: int = HANDSHAKE_MAX_CONNECTIONS
) -> asyncio.Server:
    """Listen on `path` (0600, private directory) and answer each request line with `handler`;
    at most `max_connections` connections at once."""
    active = 0

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        active += 1
        try:
            if active > max_connections:
                _refusals.warning("connections_over_limit", str(path), socket=str(path))
                return
            peer = peer_credentials(writer.get_extra_info("socket"))
            refusal = gate(peer)
            if refusal is not None:
                _refusals.warning(
                    "peer_refused",
                    (str(path), peer.pid),
                    socket=str(path),
                    pid=peer.pid,
                    uid=peer.uid,
                    reason=refusal,
                )
                writer.write(encode({"ok": False, "error": "refused", "message": refusal}))
                return
            while True:
                async with asyncio.timeout(IDLE_TIMEOUT):
                    line = await reader.readline()
                if not line:
                    break
                writer.write(encode(await _answer(handler, line, peer)))
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.LimitOverrunError, TimeoutError):
            pass  # the peer went away, idled, or sent an over-long line: drop the connection
        finally:
            active -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    prepare_socket_path(path)
    with private_umask():
        server = await asyncio.start_unix_server(connection, os.fspath(path), limit=MAX_LINE)
    path.chmod(0o600)
    return server


async def _answer(handler: Handler, line: bytes, peer: Peer) -> Message:
    try:
        request = decode(line)
    except ProtocolError as exc:
        return {"ok": False, "error": "bad_request", "message": str(exc)}
    try:
        return await handler(request, peer)
    except Exception:
        log.exception("request_failed", op=request.get("op"))
        return {"ok": False, "error": "internal", "message": "the request failed; see the log"}


async def request(path: Path, message: Message, timeout: float = 5.0) -> Message:
    """Send one request and read its answer (asyncio)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(os.fspath(path), limit=MAX_LINE)
        try:
            writer.write(encode(message))
            # A server that refuses the peer answers at once and closes: the send may fail,
            # and the answer is still there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    if not line:
        raise ProtocolError("connection closed without an answer")
    return decode(line)


def request_sync(path: Path, message: Message, timeout: float = 5.0) -> Message:
    """Send one request and read its answer (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(encode(message))  # see `request`
        with sock.makefile("rb") as stream:
            line = stream.readline(MAX_LINE)
    if not line:
        raise ProtocolError("connection closed without an answer")
    return decode(line)
