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
import fcntl
import hashlib
import hmac
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from soma_runtime.unix import private_umask

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


def _read_key(path: Path) -> bytes:
    """32 raw bytes, or 64 hex digits (systemd-creds and text editors add a newline)."""
    try:
        info = path.stat()
        raw = path.read_bytes()
    except OSError as exc:
        raise KekError(f"cannot read the key-encryption key {path}: {exc.strerror}") from None
    if info.st_mode & 0o077:
        raise KekError(
            f"the key-encryption key {path} is readable by others "
            f"(mode {stat.S_IMODE(info.st_mode):o}); make it 0600 or 0400"
        )
    if len(raw) == KEY_BYTES:
        return raw
    text = raw.strip()
    try:
        key = bytes.fromhex(text.decode())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise KekError(f"{path} does not hold a {KEY_BYTES}-byte key")
    return key


def _write_new_key(path: Path, *, replace: bool) -> bytes:
    """A new random key at `path`, appearing all at once: written to a temporary file,
    synced, then linked into place (`replace=False`: fails if `path` exists) or renamed
    over it. A crash never leaves a partial key where a key is expected."""
    key = os.urandom(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with private_umask():
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return key


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KeyFileProvider(KekProvider):
    """A 32-byte key file (0600), created on first use.

    A rotation stages `<file>.next`, and when it completes moves the replaced key to
    `<file>.previous`. Another process (the sidecar) may be using the vault during a rotation
    (`soma secrets rotate-kek`): the key file is re-read whenever it changes on disk, and the
    previous key stays findable, so a record sealed under the old key just before the switch
    still opens (the next rotation re-wraps it).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.next_path = path.with_name(path.name + ".next")
        self.previous_path = path.with_name(path.name + ".previous")
        self.description = f"key file {path}"
        if not path.exists():
            with contextlib.suppress(FileExistsError):  # another process created it first
                _write_new_key(path, replace=False)
        self._loaded: tuple[int, int, int] | None = None
        self._current = self._reload()

    def _reload(self) -> LocalKek:
        info = self.path.stat()
        self._loaded = (info.st_ino, info.st_mtime_ns, info.st_size)
        self._current = LocalKek(_read_key(self.path))
        return self._current

    def current(self) -> Kek:
        try:
            info = self.path.stat()
        except OSError as exc:
            raise KekError(
                f"cannot read the key-encryption key {self.path}: {exc.strerror}"
            ) from None
        if (info.st_ino, info.st_mtime_ns, info.st_size) != self._loaded:
            return self._reload()  # rotated by another process
        return self._current

    @staticmethod
    def _optional(path: Path) -> LocalKek | None:
        return LocalKek(_read_key(path)) if path.exists() else None

    def find(self, kek_id: str) -> Kek | None:
        for kek in (
            self.current(),
            self._optional(self.next_path),
            self._optional(self.previous_path),
        ):
            if kek is not None and kek.kek_id == kek_id:
                return kek
        return None

    @contextlib.contextmanager
    def rotating(self) -> Iterator[None]:
        with private_umask():
            fd = os.open(
                self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def stage_rotation(self) -> Kek:
        # Replaces the key of a rotation that never committed, if there is one.
        return LocalKek(_write_new_key(self.next_path, replace=True))

    def complete_rotation(self, kek: Kek) -> None:
        held = self.path.with_name(f".{self.path.name}.{os.getpid()}.previous")
        held.unlink(missing_ok=True)
        os.link(self.path, held)
        os.replace(held, self.previous_path)
        os.replace(self.next_path, self.path)
        _fsync_dir(self.path.parent)
        self._reload()

    def recover(self, kek_ids_in_use: set[str]) -> None:
        staged = self._optional(self.next_path)
        if staged is not None and staged.kek_id in kek_ids_in_use:
            self.complete_rotation(staged)  # the re-wrap committed; the rename did not happen


class CredentialProvider(KekProvider):
    """A systemd credential (`LoadCredential=soma-kek:/etc/soma/kek`).

    systemd owns the key, so a rotation re-wraps under whatever key the credential holds now;
    the key it replaced is read from the credential `<name>.previous` while rows still use it.
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / name
        self.previous_path = directory / f"{name}.previous"
        self.description = f"systemd credential {name}"
        self._current = LocalKek(_read_key(self.path))

    def current(self) -> Kek:
        return self._current

    def find(self, kek_id: str) -> Kek | None:
        if kek_id == self._current.kek_id:
            return self._current
        if self.previous_path.exists():
            previous = LocalKek(_read_key(self.previous_path))
            if previous.kek_id == kek_id:
                return previous
        return None

    def stage_rotation(self) -> Kek:
        return self._current

    def complete_rotation(self, kek: Kek) -> None:
        pass
