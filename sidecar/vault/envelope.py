"""Envelope encryption: each record sealed with AES-256-GCM under its own data key (DEK),
the DEK wrapped by a key-encryption key.

The associated data names the record (a secret's name and version; a blob's namespace, key,
revision, size and time, every column a caller sees), so a ciphertext copied onto another row,
or a row whose columns were altered, does not open.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.vault.kek import NONCE_BYTES, Kek, KekError

_TAG_BYTES = 16


class SealError(Exception):
    """A record does not open: tampered, truncated, moved, or sealed under another key."""


@dataclass(frozen=True, slots=True)
class Sealed:
    kek_id: str
    wrapped_key: bytes
    parts: tuple[bytes, ...]  # one ciphertext per plaintext part, all under the same DEK


def _dek_aad(aad: bytes) -> bytes:
    return b"soma/dek\0" + aad


def _part_aad(aad: bytes, index: int) -> bytes:
    return aad + b"\0part" + str(index).encode()


def seal(kek: Kek, aad: bytes, *parts: bytes) -> Sealed:
    dek = AESGCM.generate_key(bit_length=256)
    aead = AESGCM(dek)
    ciphertexts = []
    for index, plaintext in enumerate(parts):
        nonce = os.urandom(NONCE_BYTES)
        ciphertexts.append(nonce + aead.encrypt(nonce, plaintext, _part_aad(aad, index)))
    return Sealed(kek.kek_id, kek.wrap(dek, _dek_aad(aad)), tuple(ciphertexts))


def unwrap_key(kek: Kek, wrapped_key: bytes, aad: bytes) -> bytes:
    try:
        return kek.unwrap(wrapped_key, _dek_aad(aad))
    except KekError as exc:
        raise SealError(str(exc)) from None


def open_part(dek: bytes, ciphertext: bytes, aad: bytes, index: int) -> bytes:
    if len(ciphertext) < NONCE_BYTES + _TAG_BYTES:
        raise SealError("the ciphertext is truncated")
    try:
        return AESGCM(dek).decrypt(
            ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], _part_aad(aad, index)
        )
    except InvalidTag:
        raise SealError("the ciphertext does not authenticate") from None


def rewrap(old: Kek, new: Kek, wrapped_key: bytes, aad: bytes) -> bytes:
    """The same DEK, wrapped by `new` instead of `old` (the ciphertexts do not change)."""
    return new.wrap(unwrap_key(old, wrapped_key, aad), _dek_aad(aad))
