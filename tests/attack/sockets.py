"""Talking to a Unix socket the way an attacker does: write anything, then listen."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path


def send_and_read(
    path: str | Path, data: bytes, timeout: float = 5.0, *, wait_for_socket: bool = False
) -> tuple[bytes, bool]:
    """Send `data` on a fresh connection, half-close, and read until the server closes the
    connection or `timeout` passes: then the server has seen every byte. Returns what it
    answered, and whether it closed the connection. `wait_for_socket`: a socket that is
    missing or refuses is being replaced (a runtime's gRPC server after a crash the previous
    input caused); connect once it accepts, within `timeout`."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        _connect(sock, os.fspath(path), deadline if wait_for_socket else None)
        # A server that stops reading (an over-long line) may reset: what it said still counts.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return bytes(received), True
            except TimeoutError:
                break
            if not chunk:
                return bytes(received), True
            received += chunk
    return bytes(received), False


def _connect(sock: socket.socket, path: str, until: float | None) -> None:
    while True:
        try:
            sock.connect(path)
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if until is None or time.monotonic() >= until:
                raise
        time.sleep(0.01)  # polling the socket: its replacement has no event to wait on
