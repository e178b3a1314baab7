"""Unix-socket hygiene shared by every socket Soma binds.

Sockets live in directories only their owner can enter (0700) and are created 0600. A socket
file left by a dead process is replaced; one that still answers belongs to a live process and
is never stolen; a path that is not a socket is never deleted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


class SocketPathError(OSError):
    """A socket path Soma refuses to use; the message says why and what to do."""


def ensure_private_dir(directory: Path) -> None:
    """Create `directory` (and parents) as 0700, or check that an existing one is private."""
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask
        return
    info = directory.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise SocketPathError(f"{directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise SocketPathError(f"{directory} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o077:
        raise SocketPathError(
            f"{directory} is accessible to other users (mode {stat.S_IMODE(info.st_mode):o}); "
            "sockets must live in a directory of mode 0700"
        )


def prepare_socket_path(path: Path) -> None:
    """Make `path` ready to bind: private parent directory, no live or foreign file in the way."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SocketPathError(f"{path} is longer than the {MAX_SOCKET_PATH}-byte socket path limit")
    ensure_private_dir(path.parent)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
    if socket_is_live(path):
        raise SocketPathError(f"{path} is in use by a running process")
    path.unlink()


def socket_is_live(path: Path) -> bool:
    """Whether something accepts connections on the socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files and sockets created inside get mode 0600 at most (no window with looser modes)."""
    previous = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(previous)


def remove_socket(path: Path) -> None:
    """Remove a socket file we bound, if it is still there and still a socket."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """The (pid, uid, gid) of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    pid, uid, gid = (int.from_bytes(raw[i : i + 4], "little", signed=True) for i in (0, 4, 8))
    return pid, uid, gid
