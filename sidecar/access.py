"""Who may use a channel and what they may call.

A channel belongs to one runtime. The sidecar keeps only the SHA-256 digest of the runtime's
token and compares digests in constant time. A token is exchanged once, on the channel's
handshake socket, for a session that gRPC calls carry. Both sockets check the kernel's peer
credentials of each connection as it is accepted (gRPC cannot see them), so a session works
only from the runtime's process tree, like its token (see sidecar.channels).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# Sessions kept per channel (one per client object in the runtime); the oldest is dropped.
MAX_SESSIONS = 64


# Tokens and sessions are 256 bits as 64 hex digits; anything else cannot match, and is
# refused before it is hashed (a lone surrogate cannot even be encoded).
_SECRET_SHAPE = re.compile(r"[0-9a-f]{64}")


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def well_formed(secret: str) -> bool:
    return _SECRET_SHAPE.fullmatch(secret) is not None


class AllowList:
    """Globs over op names (`system.*`, `vault.retrieve`); an empty list allows nothing."""

    __slots__ = ("_pattern", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        joined = "|".join(f"(?:{fnmatch.translate(p)})" for p in self.patterns)
        self._pattern = re.compile(joined) if joined else None

    def allows(self, op: str) -> bool:
        return self._pattern is not None and self._pattern.match(op) is not None


@dataclass(slots=True, eq=False)
class Channel:
    """One runtime's identity, as the sidecar knows it."""

    name: str
    allow: AllowList
    credentials: frozenset[str] = frozenset()
    gateways: frozenset[str] = frozenset()
    token: bytes | None = None  # digest of the runtime's current token
    placeholder: bytes | None = None  # digest of its current gateway placeholder
    # The runtime's pid: handshakes must come from it or a descendant. None: not checked.
    pid: int | None = None
    # Registered before the process exists: handshakes are answered "retry" meanwhile.
    pending: bool = False
    # Connections from outside a new pid's tree are being shut down: "retry" meanwhile too.
    sweeping: bool = False
    sessions: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    # Counted on the call path (an increment each), read by `soma status` and the metrics
    # endpoint; they outlive identity resets, so they only ever grow while the channel is open.
    calls: int = 0
    denials: int = 0  # calls refused PERMISSION_DENIED: the allow-list or a credential
    # Called when the runtime's pid changes (the channel registry shuts down connections from
    # outside the new tree, the channel `sweeping` until it is done).
    on_new_pid: Callable[[], None] | None = None

    def reset(
        self, token: bytes | None, pid: int | None, pending: bool, placeholder: bytes | None = None
    ) -> None:
        """A new identity: the old token, placeholder and every session stop working."""
        new_pid = pid is not None and pid != self.pid
        self.token = token
        self.pid = pid
        self.pending = pending
        self.placeholder = placeholder
        self.sessions.clear()
        if new_pid and self.on_new_pid is not None:
            self.on_new_pid()

    def identify(
        self, token: bytes, pid: int | None, pending: bool, placeholder: bytes | None
    ) -> None:
        """The identity a registration names: a new one replaces the old (`reset`); the same
        one again (the supervisor resends a registration the sidecar was slow to answer)
        keeps its sessions, since revoking them would refuse the runtime's calls for nothing."""
        if (token, pid, pending, placeholder) != (
            self.token,
            self.pid,
            self.pending,
            self.placeholder,
        ):
            self.reset(token, pid, pending, placeholder)

    def token_matches(self, token: str) -> bool:
        if self.token is None or not well_formed(token):
            return False
        return hmac.compare_digest(token_digest(token), self.token)

    def placeholder_matches(self, placeholder: str) -> bool:
        if self.placeholder is None or not placeholder.isascii():
            return False
        return hmac.compare_digest(token_digest(placeholder), self.placeholder)

    def open_session(self) -> str:
        session = secrets.token_hex(32)
        self.sessions[token_digest(session)] = None
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return session

    def session_matches(self, session: str) -> bool:
        if not well_formed(session):
            return False
        presented = token_digest(session)
        found = False
        for known in self.sessions:
            found |= hmac.compare_digest(presented, known)
        return found
