"""Opening the vault the configuration describes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from sidecar.vault.kek import CredentialProvider, KekError, KekProvider, KeyFileProvider
from sidecar.vault.store import Vault, VaultUnavailable
from soma_runtime.config import SomaConfig
from soma_runtime.unix import UnsafePath, ensure_private_dir, opened_directory

VAULT_FILE = "vault.db"
# The files SQLite keeps beside the database (WAL mode; a rollback journal if it ever falls back).
_SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


class VaultSetupError(VaultUnavailable):
    """The vault cannot be opened as configured: its key or its files are refused, missing or
    cannot be created. Nothing is wrong with the data; an operator has to fix the setup."""


def kek_provider(config: SomaConfig) -> KekProvider:
    """The configured KEK source (`KekError` says why it cannot be used)."""
    settings = config.vault
    try:
        ensure_private_dir(config.state_dir)  # where the key file (and the vault) live
    except UnsafePath as exc:
        raise KekError(str(exc)) from None
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    credential = Path(directory) / settings.credential if directory else None
    if settings.kek != "file" and credential is not None and credential.exists():
        return CredentialProvider(credential.parent, settings.credential)
    if settings.kek == "systemd-credential":
        raise KekError(
            f"vault.kek is 'systemd-credential' but there is no credential "
            f"{settings.credential!r} (LoadCredential= in the unit sets $CREDENTIALS_DIRECTORY)"
        )
    path = (
        settings.kek_file
        if settings.kek_file.is_absolute()
        else config.state_dir / settings.kek_file
    )
    return KeyFileProvider(path)


def _prepare_vault_file(state_dir: Path) -> None:
    """Create the database file exclusively (0600, never through a link) before SQLite opens
    it, and refuse database files that are links or not ours: SQLite follows links and would
    read or write through them."""
    me = os.geteuid()
    with opened_directory(state_dir, private=True) as directory:
        for name in (VAULT_FILE, *(VAULT_FILE + suffix for suffix in _SQLITE_COMPANIONS)):
            try:
                info = os.stat(name, dir_fd=directory, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(info.st_mode) or info.st_uid != me:
                raise UnsafePath(
                    f"{state_dir / name} is not a regular file owned by uid {me} (this user); "
                    "move it out of the state directory"
                )
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            os.close(os.open(VAULT_FILE, flags, 0o600, dir_fd=directory))
        except FileExistsError:
            pass
        except OSError as exc:
            raise UnsafePath(
                f"cannot create the vault database {state_dir / VAULT_FILE}: {exc.strerror}; "
                f"the state directory must be writable by uid {me} (this user)"
            ) from None


def open_vault(config: SomaConfig, *, durable: bool = True) -> Vault:
    """The vault in the state directory (0700; every file in it 0600)."""
    try:
        provider = kek_provider(config)
        _prepare_vault_file(config.state_dir)
    except (KekError, UnsafePath) as exc:
        raise VaultSetupError(str(exc)) from None
    try:
        return Vault(config.state_dir / VAULT_FILE, provider, durable=durable)
    except (KekError, OSError) as exc:
        raise VaultUnavailable(str(exc)) from None
