"""Opening the vault the configuration describes."""

from __future__ import annotations

import os
from pathlib import Path

from sidecar.vault.kek import CredentialProvider, KekError, KekProvider, KeyFileProvider
from sidecar.vault.store import Vault, VaultUnavailable
from soma_runtime.config import SomaConfig
from soma_runtime.unix import ensure_private_dir

VAULT_FILE = "vault.db"


def kek_provider(config: SomaConfig) -> KekProvider:
    """The configured KEK source (`KekError` says why it cannot be used)."""
    settings = config.vault
    try:
        ensure_private_dir(config.state_dir)  # where the key file (and the vault) live
    except OSError as exc:
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


def open_vault(config: SomaConfig, *, durable: bool = True) -> Vault:
    """The vault in the state directory (0700; every file in it 0600)."""
    try:
        provider = kek_provider(config)
        return Vault(config.state_dir / VAULT_FILE, provider, durable=durable)
    except (KekError, OSError) as exc:
        raise VaultUnavailable(str(exc)) from None
