"""Runtime identities: a fresh 256-bit token per start, handed over on an inherited descriptor,
and a gateway placeholder key.

The token is written to a sealed memfd that only the runtime inherits (its number is in
`$SOMA_TOKEN_FD`). It is never in the environment, which every child inherits and crash
reports copy, and never on disk. The supervisor keeps only the token's SHA-256 digest.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
from dataclasses import dataclass

_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


PLACEHOLDER_PREFIX = "soma_pk_"


@dataclass(frozen=True, slots=True)
class Identity:
    token_fd: int  # to pass to the child; close it after the spawn
    digest: str  # hex SHA-256 of the token, for the sidecar
    # The gateway key the runtime's SDKs present instead of a real one: worthless except on
    # this runtime's gateway port, from its user, while this start of it runs.
    placeholder: str
    placeholder_digest: str


def mint_identity() -> Identity:
    token = secrets.token_hex(32)
    placeholder = PLACEHOLDER_PREFIX + secrets.token_urlsafe(32)
    fd = os.memfd_create("soma-token", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, token.encode())
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return Identity(
        token_fd=fd,
        digest=hashlib.sha256(token.encode()).hexdigest(),
        placeholder=placeholder,
        placeholder_digest=hashlib.sha256(placeholder.encode()).hexdigest(),
    )
