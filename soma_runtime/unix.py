"""Unix-socket and directory hygiene shared by every socket and state file Soma makes.

Sockets live in directories only their owner can enter (0700) and are created 0600. A socket
file left by a dead process is replaced; one that still answers belongs to a live process and
is never stolen; a path that is not a socket is never deleted. Directories are reached only
through links and parents that root or this user controls (`open_directory`): other local
users may plant links and files anywhere they can write.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


class UnsafePath(OSError):
    """A file or directory Soma will not use (a link or a directory other users control, a
    wrong owner or mode) or cannot create; the message names it and says what to do."""


class SocketPathError(UnsafePath):
    """A socket path Soma refuses to use; the message says why and what to do."""


# The kernel's own limit on symbolic links followed in one path lookup.
_MAX_LINKS = 40


def open_directory(path: Path, *, private: bool, create: bool = False) -> int:
    """An `O_PATH` descriptor of the directory `path`, reached so that only root and this user
    (the service user) can have decided where it leads; `UnsafePath` otherwise.

    The path is walked from `/` one component at a time, each opened relative to its parent
    with `O_NOFOLLOW` and judged by `fstat` of what was opened, so nothing can be swapped
    between the check and the use. Every directory on the way must belong to root or this
    user and be writable by nobody else unless it is sticky (like /tmp, where others cannot
    rename or delete our entries). A symbolic link is followed (and its target walked the same
    way) only when root or this user owns it. The directory itself must belong to this user
    and be closed to everyone else (`private`, for sockets and the vault), or else belong to
    root or this user and be writable by nobody else (a key file's directory, for example).
    With `create`, missing directories are made 0700, relative to their parent's descriptor.
    Once this returns, only root and this user can change what `path` names, so plain path
    operations below it are safe too.
    """
    me = os.geteuid()
    # Components still to walk, next one last; True for those that came from a link's target,
    # which are never created (mkdir does not create through a dangling link either).
    pending = [(name, False) for name in reversed((Path.cwd() / path).parts[1:])]
    # The directories walked so far, from `/`: `..` pops, an absolute link target restarts.
    walked: list[tuple[str, int]] = [("", os.open("/", os.O_PATH | os.O_DIRECTORY))]
    links = 0
    try:
        _check_ancestor(_shown(path, "/"), os.fstat(walked[0][1]), me)
        while pending:
            name, from_link = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(walked) > 1:
                    os.close(walked.pop()[1])
                continue
            where = _shown(path, "/".join(n for n, _ in walked) + "/" + name)
            fd = _open_component(walked[-1][1], name, where, create and not from_link)
            info = os.fstat(fd)
            if stat.S_ISLNK(info.st_mode):
                try:
                    target = _trusted_link(where, fd, info, me)
                finally:
                    os.close(fd)
                links += 1
                if links > _MAX_LINKS:
                    raise UnsafePath(f"{path}: too many symbolic links")
                if target.startswith("/"):
                    while len(walked) > 1:
                        os.close(walked.pop()[1])
                parts = Path(target).parts[1 if target.startswith("/") else 0 :]
                pending.extend((part, True) for part in reversed(parts))
                continue
            walked.append((name, fd))
            if not stat.S_ISDIR(info.st_mode):
                raise UnsafePath(f"{where} is not a directory")
            _check_ancestor(where, info, me)
        _check_final(path, os.fstat(walked[-1][1]), me, private=private)
    except BaseException:
        for _, fd in walked:
            os.close(fd)
        raise
    for _, fd in walked[:-1]:
        os.close(fd)
    return walked[-1][1]


def _shown(path: Path, where: str) -> str:
    """A component of `path` as error messages name it."""
    return where if where == str(path) else f"{where} (on the way to {path})"


def _open_component(parent: int, name: str, where: str, create: bool) -> int:
    """`name` in the directory `parent`, opened without following it (a link is opened as the
    link itself); made 0700 first if it is missing and `create`."""
    try:
        return os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise UnsafePath(f"{where} does not exist") from None
    except OSError as exc:
        raise UnsafePath(f"cannot use {where}: {exc.strerror}") from None
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
        # mkdir's mode is filtered by the umask. The parent passed the ancestor check, so
        # nobody else can have replaced the new directory in the meantime.
        os.chmod(name, 0o700, dir_fd=parent)
    except FileExistsError:
        pass  # made by someone else meanwhile: judged below like any other entry
    except OSError as exc:
        raise UnsafePath(f"cannot create {where}: {exc.strerror}") from None
    return _open_component(parent, name, where, create=False)


def _trusted_link(where: str, fd: int, info: os.stat_result, me: int) -> str:
    """The target of the symbolic link opened as `fd`, if root or this user owns it."""
    if info.st_uid not in (0, me):
        raise UnsafePath(
            f"{where} is a symbolic link owned by uid {info.st_uid}; only links owned "
            f"by root or uid {me} (this user) are followed. Use the real directory's path, or "
            "remove the link"
        )
    return os.readlink("", dir_fd=fd)  # readlinkat(2) on an O_PATH link: the one we judged


def _check_ancestor(where: str, info: os.stat_result, me: int) -> None:
    """A directory on the way: others must not be able to replace what is inside it."""
    if info.st_uid not in (0, me):
        raise UnsafePath(
            f"{where} belongs to uid {info.st_uid}, who could replace what is inside; "
            f"use a directory whose every parent belongs to root or uid {me} (this user)"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise UnsafePath(
            f"{where} is writable by other users (mode {mode:o}) and not sticky, so "
            "they could replace what is inside; use a directory only root or this user can "
            "change"
        )


def _check_final(path: Path, info: os.stat_result, me: int, *, private: bool) -> None:
    mode = stat.S_IMODE(info.st_mode)
    if private:
        if info.st_uid != me:
            raise UnsafePath(
                f"{path} belongs to uid {info.st_uid}, not to uid {me} (this user); "
                "chown it, or choose another directory"
            )
        if mode & 0o077:
            raise UnsafePath(
                f"{path} is accessible to other users (mode {mode:o}); "
                "it must be a directory of mode 0700"
            )
    elif mode & 0o022:
        raise UnsafePath(
            f"{path} is writable by other users (mode {mode:o}); "
            "it must be writable only by root or this user"
        )


@contextlib.contextmanager
def opened_directory(path: Path, *, private: bool, create: bool = False) -> Iterator[int]:
    """`open_directory` for the duration of a `with` block."""
    fd = open_directory(path, private=private, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def ensure_private_dir(directory: Path) -> None:
    """Create `directory` (and parents) as 0700, or check that an existing one is private and
    that nobody but root and this user can redirect any part of its path."""
    os.close(open_directory(directory, private=True, create=True))


def prepare_socket_path(path: Path) -> None:
    """Make `path` ready to bind: private parent directory, no live or foreign file in the way."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SocketPathError(f"{path} is longer than the {MAX_SOCKET_PATH}-byte socket path limit")
    with opened_directory(path.parent, private=True, create=True) as directory:
        try:
            info = os.stat(path.name, dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
        if socket_is_live(path):
            raise SocketPathError(f"{path} is in use by a running process")
        os.unlink(path.name, dir_fd=directory)


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


def write_private_file(
    directory: int, name: str, content: bytes, *, replace: bool = True, durable: bool = False
) -> os.stat_result:
    """Write `content` as `name` in the directory open as `directory`, mode 0600, appearing all
    at once (a reader sees the old file or the whole new one); the written file's status.

    It is written to a temporary file of a random name, created exclusively and never through
    a link (nothing planted there in advance is written to, or lends its mode), then renamed
    over `name` (a link there is replaced, not followed) or, with `replace=False`, linked to
    it (`FileExistsError` when `name` exists). `durable`: on disk, file and directory entry,
    when this returns."""
    temporary = f".{name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with open(os.open(temporary, flags, 0o600, dir_fd=directory), "wb") as file:
            os.fchmod(file.fileno(), 0o600)  # whatever the umask
            file.write(content)
            file.flush()
            if durable:
                os.fsync(file.fileno())
            written = os.fstat(file.fileno())
        if replace:
            os.replace(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
        else:
            os.link(
                temporary, name, src_dir_fd=directory, dst_dir_fd=directory, follow_symlinks=False
            )
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=directory)
    if durable:
        fsync_directory(directory)
    return written


def fsync_directory(directory: int) -> None:
    """Put the entries of the directory open as `directory` on disk."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=directory)  # O_PATH cannot fsync
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        stat_line = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and is whatever bytes the process chose:
    # spaces, ')', not UTF-8. Only what follows the last ')' is read.
    fields = stat_line[stat_line.rindex(b")") + 2 :].split()
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
