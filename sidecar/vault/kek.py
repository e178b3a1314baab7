"""Key-encryption keys (KEKs) and where they come from.

A KEK only wraps and unwraps data keys. Local providers hold the 32-byte key in memory; a
cloud KMS provider would implement `Kek` by calling the KMS, which never reveals its key,
which is why the interface is wrap/unwrap rather than "give me the key".

Each KEK has an id (an HMAC of a fixed label under the key: it names the key without
revealing it), stored beside every data key it wrapped, so the vault always knows which key
opens which row, including in the middle of a rotation.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import os
import secrets
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from soma_runtime.unix import UnsafePath, fsync_directory, opened_directory, write_private_file

KEY_BYTES = 32
NONCE_BYTES = 12


class KekError(Exception):
    """The key-encryption key cannot be obtained or used."""


class Kek(ABC):
    """A key-encryption key."""

    kek_id: str

    @abstractmethod
    def wrap(self, dek: bytes, aad: bytes) -> bytes: ...

    @abstractmethod
    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        """The data key; `KekError` when `wrapped` was not made by this key with this `aad`."""


class LocalKek(Kek):
    """A 32-byte key held in this process: AES-256-GCM over the data key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise KekError(f"a key-encryption key is {KEY_BYTES} bytes, not {len(key)}")
        self._aead = AESGCM(key)
        self.kek_id = hmac.new(key, b"soma-kek-id", hashlib.sha256).hexdigest()[:16]

    def wrap(self, dek: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, dek, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) < NONCE_BYTES + 16:
            raise KekError("the wrapped data key is truncated")
        try:
            return self._aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
        except InvalidTag:
            raise KekError("the wrapped data key does not open with this key") from None


class KekProvider(ABC):
    """Supplies the current KEK, finds older ones by id, and stages rotations."""

    description: str

    @abstractmethod
    def current(self) -> Kek: ...

    @abstractmethod
    def find(self, kek_id: str) -> Kek | None: ...

    @abstractmethod
    def stage_rotation(self) -> Kek:
        """The KEK a rotation re-wraps to; durable (findable after a crash) once returned."""

    @abstractmethod
    def complete_rotation(self, kek: Kek) -> None:
        """Make the staged `kek` the current one (after the re-wrap committed)."""

    def recover(self, kek_ids_in_use: set[str]) -> None:  # noqa: B027 - optional
        """Finish a rotation a crash interrupted, given the KEK ids the vault's rows name."""

    @contextlib.contextmanager
    def rotating(self) -> Iterator[None]:
        """Held for a whole rotation, so two rotations never interleave."""
        yield


# Any accepted key file is shorter: 32 raw bytes, or 64 hex digits and a line ending.
_MAX_KEY_FILE = 1024


@contextlib.contextmanager
def _key_directory(path: Path) -> Iterator[int]:
    """A descriptor of the directory of the key file `path`: reached only through links and
    parents root or this user control, owned by one of them and writable by nobody else (a
    key planted by another user, or swapped under us, is never used)."""
    try:
        with opened_directory(path.parent, private=False) as directory:
            yield directory
    except UnsafePath as exc:
        raise KekError(f"the key-encryption key {path} cannot be used: {exc}") from None


def _load_key(directory: int, path: Path) -> tuple[LocalKek, os.stat_result] | None:
    """The key in the file `path` (in `directory`), None when there is no such file.

    The file is opened without following a link (or blocking on a FIFO) and judged by what was
    opened: a regular file of this user or root that nobody else may read. It holds 32 raw
    bytes, or 64 hex digits (systemd-creds and text editors add a newline)."""
    me = os.geteuid()
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KekError(
                f"the key-encryption key {path} is a symbolic link, which is never followed; "
                "remove it, or point vault.kek_file at the key itself"
            ) from None
        raise KekError(f"cannot read the key-encryption key {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KekError(f"the key-encryption key {path} is not a regular file")
        if info.st_uid not in (me, 0):
            raise KekError(
                f"the key-encryption key {path} belongs to uid {info.st_uid}, not to uid {me} "
                "(this user) or root, so someone else may have planted it; remove it, or "
                "chown it if it is the right key"
            )
        if info.st_mode & 0o077:
            raise KekError(
                f"the key-encryption key {path} is readable by others "
                f"(mode {stat.S_IMODE(info.st_mode):o}); make it 0600 or 0400"
            )
        raw = os.read(fd, _MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KekError(f"cannot read the key-encryption key {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) == KEY_BYTES:
        return LocalKek(raw), info
    try:
        key = bytes.fromhex(raw.strip().decode())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise KekError(f"{path} does not hold a {KEY_BYTES}-byte key")
    return LocalKek(key), info


def _read_key(directory: int, path: Path) -> tuple[LocalKek, os.stat_result]:
    """`_load_key` for a key that must be there."""
    loaded = _load_key(directory, path)
    if loaded is None:
        raise KekError(f"the key-encryption key {path} does not exist")
    return loaded


def _write_new_key(directory: int, path: Path, *, replace: bool) -> bytes:
    """A new random key at `path` (in `directory`), appearing all at once and synced
    (`write_private_file`): linked into place (`replace=False`: `FileExistsError` if `path`
    exists) or renamed over it. A crash never leaves a partial key where a key is expected,
    and nothing planted in advance is written to."""
    key = os.urandom(KEY_BYTES)
    write_private_file(directory, path.name, key, replace=replace, durable=True)
    return key


def _cannot_write(path: Path, exc: OSError) -> KekError:
    return KekError(
        f"cannot write the key-encryption key {path}: {exc.strerror}; its directory must be "
        f"writable by uid {os.geteuid()} (this user), or provide the key (vault.kek_file, or "
        "a systemd credential)"
    )


class KeyFileProvider(KekProvider):
    """A 32-byte key file (0600), created on first use.

    A rotation stages `<file>.next`, and when it completes moves the replaced key to
    `<file>.previous`. Another process (the sidecar) may be using the vault during a rotation
    (`soma secrets rotate-kek`): the key file is re-read whenever it changes on disk, and the
    previous key stays findable, so a record sealed under the old key just before the switch
    still opens (the next rotation re-wraps it).

    Every file is opened relative to a descriptor of the checked directory (`_key_directory`),
    never through a link, and only ever created exclusively.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.next_path = path.with_name(path.name + ".next")
        self.previous_path = path.with_name(path.name + ".previous")
        self.lock_path = path.with_name(path.name + ".lock")
        self.description = f"key file {path}"
        with _key_directory(path) as directory:
            try:
                os.stat(path.name, dir_fd=directory, follow_symlinks=False)
            except FileNotFoundError:
                try:
                    _write_new_key(directory, path, replace=False)
                except FileExistsError:
                    pass  # another process created it first
                except OSError as exc:
                    raise _cannot_write(path, exc) from None
            except OSError as exc:
                raise KekError(
                    f"cannot read the key-encryption key {path}: {exc.strerror}"
                ) from None
        self._loaded: tuple[int, int, int] | None = None
        self._current = self._reload()

    def _reload(self) -> LocalKek:
        with _key_directory(self.path) as directory:
            kek, info = _read_key(directory, self.path)
        self._loaded = (info.st_ino, info.st_mtime_ns, info.st_size)
        self._current = kek
        return kek

    def current(self) -> Kek:
        # The directory was checked: only root and this user can change what the path names.
        try:
            info = os.stat(self.path, follow_symlinks=False)
        except OSError as exc:
            raise KekError(
                f"cannot read the key-encryption key {self.path}: {exc.strerror}"
            ) from None
        if (info.st_ino, info.st_mtime_ns, info.st_size) != self._loaded:
            return self._reload()  # rotated by another process
        return self._current

    def find(self, kek_id: str) -> Kek | None:
        if self.current().kek_id == kek_id:
            return self._current
        with _key_directory(self.path) as directory:
            for path in (self.next_path, self.previous_path):
                loaded = _load_key(directory, path)
                if loaded is not None and loaded[0].kek_id == kek_id:
                    return loaded[0]
        return None

    @contextlib.contextmanager
    def rotating(self) -> Iterator[None]:
        with _key_directory(self.path) as directory:
            try:
                fd = os.open(
                    self.lock_path.name,
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                    0o600,
                    dir_fd=directory,
                )
            except OSError as exc:
                reason = exc.strerror
                if exc.errno == errno.ELOOP:
                    reason = "it is a symbolic link, which is never followed; remove it"
                raise KekError(
                    f"cannot open the rotation lock {self.lock_path}: {reason}"
                ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise KekError(
                    f"the rotation lock {self.lock_path} is not a regular file owned by "
                    f"uid {os.geteuid()} (this user); remove it"
                )
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def stage_rotation(self) -> Kek:
        # Replaces the key of a rotation that never committed, if there is one.
        with _key_directory(self.path) as directory:
            try:
                return LocalKek(_write_new_key(directory, self.next_path, replace=True))
            except OSError as exc:
                raise _cannot_write(self.next_path, exc) from None

    def complete_rotation(self, kek: Kek) -> None:
        with _key_directory(self.path) as directory:
            held = f".{self.path.name}.{secrets.token_hex(8)}.previous"
            within = {"src_dir_fd": directory, "dst_dir_fd": directory}
            try:
                os.link(self.path.name, held, **within, follow_symlinks=False)
                os.replace(held, self.previous_path.name, **within)
                os.replace(self.next_path.name, self.path.name, **within)
                fsync_directory(directory)
            except OSError as exc:
                raise _cannot_write(self.path, exc) from None
        self._reload()

    def recover(self, kek_ids_in_use: set[str]) -> None:
        with _key_directory(self.path) as directory:
            staged = _load_key(directory, self.next_path)
        if staged is not None and staged[0].kek_id in kek_ids_in_use:
            self.complete_rotation(staged[0])  # the re-wrap committed; the rename did not happen


class CredentialProvider(KekProvider):
    """A systemd credential (`LoadCredential=soma-kek:/etc/soma/kek`).

    systemd owns the key, so a rotation re-wraps under whatever key the credential holds now;
    the key it replaced is read from the credential `<name>.previous` while rows still use it.
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / name
        self.previous_path = directory / f"{name}.previous"
        self.description = f"systemd credential {name}"
        with _key_directory(self.path) as fd:
            self._current = _read_key(fd, self.path)[0]

    def current(self) -> Kek:
        return self._current

    def find(self, kek_id: str) -> Kek | None:
        if kek_id == self._current.kek_id:
            return self._current
        with _key_directory(self.previous_path) as fd:
            previous = _load_key(fd, self.previous_path)
        if previous is not None and previous[0].kek_id == kek_id:
            return previous[0]
        return None

    def stage_rotation(self) -> Kek:
        return self._current

    def complete_rotation(self, kek: Kek) -> None:
        pass
