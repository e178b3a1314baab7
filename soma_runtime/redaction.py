"""A log processor that keeps secrets out of every log line.

Two nets: the exact values of secrets this process has decrypted (registered as they are
used), and patterns of strings shaped like credentials (Soma's own 256-bit tokens and
placeholders, bearer headers, common API-key and JWT shapes). Runs last before rendering, so
it also covers formatted exceptions and lines captured from child processes.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

REDACTED = "[REDACTED]"

_TOKEN_SHAPES = re.compile(
    "|".join(
        [
            r"\b[0-9a-f]{64}\b",  # Soma tokens and sessions (256 bits, hex)
            r"\bsoma_pk_[A-Za-z0-9_-]{16,}",  # Soma gateway placeholders
            r"(?i:\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}",  # Authorization: Bearer ...
            r"\bsk-[A-Za-z0-9_-]{16,}",  # OpenAI-style keys
            r"\bsk-ant-[A-Za-z0-9_-]{16,}",
            r"\b(?:ghp|gho|ghu|ghs|ghr|github_pat)_[A-Za-z0-9_]{20,}",  # GitHub tokens
            r"\bxox[abprs]-[A-Za-z0-9-]{10,}",  # Slack tokens
            r"\bAKIA[0-9A-Z]{16}\b",  # AWS access key ids
            r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWTs
        ]
    )
)

# Values shorter than this are not registered: redacting "abc" everywhere would garble logs
# and say more about the secret than it hides.
MIN_KNOWN_LENGTH = 6


class Redactor:
    """A structlog processor; `add()` teaches it a secret value to remove."""

    def __init__(self) -> None:
        self._known: set[str] = set()

    def add(self, value: str | bytes) -> None:
        text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
        if len(text) >= MIN_KNOWN_LENGTH:
            self._known.add(text)

    def redact(self, text: str) -> str:
        for value in self._known:
            if value in text:
                text = text.replace(value, REDACTED)
        return _TOKEN_SHAPES.sub(REDACTED, text)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        return value

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        for key, value in event.items():
            if isinstance(value, str | dict | list | tuple):
                event[key] = self._clean(value)
        return event


# The process's redactor: the logging pipeline always runs it, the sidecar feeds it values.
redactor = Redactor()
