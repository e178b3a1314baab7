"""Shutting down connections to a runtime's gRPC socket that come from outside its tree.

Every connection is judged as it is accepted (sidecar.server), against the runtime's pid as
the channel knows it then. When that pid changes (a runtime registered before it started, or
restarted), connections admitted before may come from outside the new runtime's tree; this
finds them among the sidecar's own descriptors, reads SO_PEERCRED of each connection accepted
on the socket, and shuts down those whose peer is not admitted: their gRPC server sees the
connection end and frees its slot, and a client that connects again is judged afresh.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Callable, Mapping

from soma_runtime.unix import peer_credentials

# Socket path -> whether a peer pid may stay connected to it.
Owners = Mapping[str, Callable[[int], bool]]


def close_foreign_connections(owners: Owners) -> dict[str, int]:
    """Shut down every connection to a socket in `owners` whose peer it does not admit;
    how many were closed, by socket path."""
    closed: dict[str, int] = {}
    me = os.getpid()
    for entry in os.scandir("/proc/self/fd"):
        try:
            fd = int(entry.name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            duplicate = socket.socket(fileno=os.dup(fd))
        except (OSError, ValueError):
            continue  # closed meanwhile, or not a socket Python can wrap
        with duplicate:
            path = _unix_stream_name(duplicate)
            admits = owners.get(path) if path is not None else None
            if admits is None or path is None:
                continue
            with contextlib.suppress(OSError):
                peer = peer_credentials(duplicate)
                # A listening socket reports our own pid, as do the watcher's own probes.
                if peer.pid != me and not admits(peer.pid):
                    duplicate.shutdown(socket.SHUT_RDWR)
                    closed[path] = closed.get(path, 0) + 1
    return closed


def _unix_stream_name(sock: socket.socket) -> str | None:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        return None
    with contextlib.suppress(OSError):
        name = sock.getsockname()
        return name if isinstance(name, str) and name else None
    return None
