"""Handing a connection that our own code accepted to a grpc.aio server.

gRPC accepts connections itself and never says who is at the other end (`context.peer()` of a
Unix socket is just "unix:"), so the sidecar accepts each runtime's socket itself, reads the
kernel's peer credentials before a byte is read, and only then gives the connection to gRPC
(see `sidecar.server`).

grpcio's Python API has no call for that; gRPC core has one, which C++ servers reach through
`ServerBuilder::experimental().AddExternalConnectionAcceptor`. A port named `external:<name>`
listens on nothing and takes connections from a `grpc_core::TcpServerFdHandler`, whose address
core writes, when the port is added, into the pointer channel argument named like the port;
grpcio passes any channel-argument value that has `__int__` as such a pointer. `Handover` is
that argument, and `hand` calls the handler's one method, `Handle(listener_fd, fd,
pending_read)`, the third entry of its vtable (after the two destructors the Itanium C++ ABI
puts first), through ctypes.

That is below grpcio's public API, so every step is checked before anything is called: the
installed grpcio must be the release this was verified against (the pinned one), the handler
must have been written once the port is added, and its vtable and method must lie in the
mappings of grpcio's own library. Otherwise `HandoverError` says so and the channel does not
open: nothing is ever called on a guess. The sidecar makes those checks once at its start
(`ensure_usable`), so a grpcio it cannot use is a setup error, not a channel that fails when
a runtime registers.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import secrets
import socket
from typing import Any

import grpc

# The grpcio release whose handler layout this module was verified against (pyproject pins it).
VERIFIED_GRPCIO = "1.85."

_HANDLE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
_HANDLE_ENTRY = 2  # in the vtable: the complete and the deleting destructor, then Handle
_WORD = ctypes.sizeof(ctypes.c_void_p)


class HandoverError(RuntimeError):
    """The installed grpcio cannot be handed connections: the channel cannot open."""


class Handover:
    """One grpc.aio server's external port: `option` goes into the server's options, `attach`
    adds the port to the server, and `hand` gives the started server a connection."""

    def __init__(self) -> None:
        if not grpc.__version__.startswith(VERIFIED_GRPCIO):
            raise HandoverError(
                f"grpcio {grpc.__version__} is installed; the sidecar hands its connections to "
                f"gRPC in a way verified for grpcio {VERIFIED_GRPCIO}x only: install the "
                "pinned version (constraints.txt)"
            )
        self.port = f"external:soma-{secrets.token_hex(8)}"
        self._slot = ctypes.c_void_p()  # where core writes the handler's address
        self._handler = 0
        self._handle: Any = None

    def __int__(self) -> int:
        """The address grpcio passes as the pointer channel argument named `port`."""
        return ctypes.addressof(self._slot)

    @property
    def option(self) -> tuple[str, Any]:
        return (self.port, self)

    def attach(self, server: grpc.aio.Server) -> None:
        """Add the external port to `server` (made with `option`) and check its handler."""
        server.add_insecure_port(self.port)
        handler = self._slot.value
        if not handler:
            raise HandoverError("grpcio added no handler for the sidecar's external port")
        vtable = ctypes.c_void_p.from_address(handler).value or 0
        readable, executable = _library_mappings()
        if not any(start <= vtable < end for start, end in readable):
            raise HandoverError("the external port's handler is not grpcio's")
        method = ctypes.c_void_p.from_address(vtable + _HANDLE_ENTRY * _WORD).value or 0
        if not any(start <= method < end for start, end in executable):
            raise HandoverError("the external port's handler is not grpcio's")
        self._handler = handler
        self._handle = _HANDLE(method)

    def hand(self, listener: socket.socket, connection: socket.socket) -> None:
        """Give `connection`, accepted on `listener`, to the server: gRPC owns it from now on
        (`connection` is detached). The server must be started and not yet stopped."""
        connection.setblocking(False)  # as gRPC's own accept makes them
        self._handle(self._handler, listener.fileno(), connection.detach(), None)


async def ensure_usable() -> None:
    """`HandoverError` unless the installed grpcio can be handed connections: the checks of
    `Handover` and `attach`, on a server that is never started."""
    handover = Handover()
    server = grpc.aio.server(options=[handover.option])
    try:
        handover.attach(server)
    finally:
        await server.stop(None)


def _library_mappings() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The address ranges of grpcio's library in this process: all of them, the executable."""
    spec = importlib.util.find_spec("grpc._cython.cygrpc")
    library = os.path.realpath(spec.origin) if spec is not None and spec.origin else ""
    readable, executable = [], []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[5].strip() != library:
                continue
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            readable.append((start, end))
            if "x" in fields[1]:
                executable.append((start, end))
    return readable, executable
