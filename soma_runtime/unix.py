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
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a Unix socket, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: Any) -> Peer:
    """SO_PEERCRED of a connected Unix socket (a socket or asyncio's TransportSocket)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def parent_pid(pid: int) -> int | None:
    """The parent of `pid` from /proc, None when the process is gone."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    fields = stat_line[stat_line.rindex(")") + 2 :].split()
    return int(fields[1])


def is_descendant(pid: int, ancestor: int) -> bool:
    """Whether `pid` is `ancestor` or one of its descendants (walks parents in /proc)."""
    seen = 0
    current: int | None = pid
    while current is not None and current > 1 and seen < 4096:
        if current == ancestor:
            return True
        current = parent_pid(current)
        seen += 1
    return current == ancestor


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NO_COOKIE = 0xFFFFFFFF
_LOOPBACK = socket.inet_aton("127.0.0.1") + bytes(12)
_DIAG_UID_OFFSET = 16 + 64  # nlmsghdr, then inet_diag_msg's fields before idiag_uid


def loopback_peer_uid(client_port: int, server_port: int) -> int | None:
    """The uid owning the client end of a TCP connection over IPv4 loopback, asked of the
    kernel with one sock_diag netlink request (about 15 µs; reading /proc/net/tcp instead
    costs milliseconds on a busy host). None when the kernel does not know the socket."""
    sockid = struct.pack("!HH", client_port, server_port) + _LOOPBACK + _LOOPBACK
    sockid += struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)  # any interface, no cookie
    request = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
    request += sockid
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as netlink:
            netlink.settimeout(1.0)
            netlink.sendto(header + request, (0, 0))
            answer = netlink.recv(8192)
    except OSError:
        return None
    if len(answer) < _DIAG_UID_OFFSET + 4 or struct.unpack_from("=H", answer, 4)[0] == _NLMSG_ERROR:
        return None
    uid: int = struct.unpack_from("=I", answer, _DIAG_UID_OFFSET)[0]
    return uid
