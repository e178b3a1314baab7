"""One serving process per runtime directory: an flock on `<runtime_dir>/soma.lock`.

`soma supervise` and a standalone `soma sidecar` each take the lock for their whole life, so a
second one on the same directory is refused before it binds, publishes or removes anything
there. The supervisor hands its locked descriptor to every sidecar it starts (the same open
file, which flock counts as the same holder), so its own sidecar starts, and restarts, while
any other process is refused. The kernel drops the lock when the last holder dies, SIGKILL
included: a lock file left behind never blocks a start, so it is never removed (removed, two
processes could each lock a file of that name). The file holds the holder's pid and command,
for the refusal's message. `make run` takes the lock itself, before it touches the directory,
and hands it to the supervisor it starts the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from soma_runtime.unix import UnsafePath, ensure_private_dir, opened_directory

LOCK_FILE = "soma.lock"
# The descriptor of the supervisor's lock, in the environment of the sidecar it starts.
LOCK_FD_ENV = "SOMA_RUNTIME_LOCK_FD"
_HOLDER_BYTES = 256


class RuntimeDirBusy(UnsafePath):
    """Another Soma process serves the runtime directory; the message names it and its pid."""


@dataclass(frozen=True, slots=True)
class RuntimeLock:
    """A held lock: its descriptor, closed (released) by `release` or at exit."""

    fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def acquire(runtime_dir: Path, holder: str) -> RuntimeLock:
    """Lock `runtime_dir` for this process, noting `holder` (the command) in the file;
    `RuntimeDirBusy` when another process holds it."""
    fd = _open(runtime_dir)
    try:
        _lock(fd, runtime_dir)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {holder}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return RuntimeLock(fd)


def inherit(runtime_dir: Path, holder: str, environ: Mapping[str, str]) -> RuntimeLock:
    """The lock the process that started this one passed in `LOCK_FD_ENV`, if that descriptor
    is this directory's lock and holds it; else the lock taken afresh (a process started by
    hand). A passed descriptor that is not used is closed: kept, it could hold another
    directory's lock for as long as this process lives."""
    raw = environ.get(LOCK_FD_ENV, "")
    fd = int(raw) if raw.isdigit() else -1
    if _passed(fd):
        with contextlib.suppress(OSError):
            if _same_file(fd, runtime_dir / LOCK_FILE):
                # On the passed open file this only confirms the lock it holds.
                _lock(fd, runtime_dir)
                os.set_inheritable(fd, False)  # not to this process's own children
                return RuntimeLock(fd)
        os.close(fd)
    return acquire(runtime_dir, holder)


def _passed(fd: int) -> bool:
    """Whether `fd` is a descriptor this process was given: open, inheritable (Python opens
    its own descriptors non-inheritable), and no standard stream."""
    try:
        return fd > 2 and os.get_inheritable(fd)
    except OSError:
        return False


def _open(runtime_dir: Path) -> int:
    ensure_private_dir(runtime_dir)
    with opened_directory(runtime_dir, private=True) as directory:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(LOCK_FILE, flags, 0o600, dir_fd=directory)
        except OSError as exc:
            raise UnsafePath(f"cannot use {runtime_dir / LOCK_FILE}: {exc.strerror}") from None


def _lock(fd: int, runtime_dir: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeDirBusy(
            f"runtime directory {runtime_dir} is in use by another Soma process"
            f" ({_holder(fd)}): stop it first, or give this configuration its own"
            " [soma] runtime_dir"
        ) from None


def _holder(fd: int) -> str:
    """What the holder wrote: `pid N, soma supervise`, when it reads as that."""
    text = os.pread(fd, _HOLDER_BYTES, 0).decode(errors="replace").strip()
    pid, _, command = text.partition(" ")
    if not pid.isdigit() or not command.isprintable():
        return "pid unknown"
    return f"pid {pid}, {command}"


def _same_file(fd: int, path: Path) -> bool:
    mine, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)
