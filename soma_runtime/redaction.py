"""A log processor that keeps secrets out of every log line and bounds every string in it.

Two nets: the values of secrets this process has decrypted (registered as they are used, in
every form they travel in: see `secret_forms`), and patterns of strings shaped like
credentials (Soma's own 256-bit tokens and placeholders, bearer headers, common API-key and
JWT shapes). Runs last before rendering, so it also covers formatted exceptions and lines
captured from child processes.

Strings longer than a limit are cut (with a marker giving their length): an `op`, a trace id
or a path comes from a caller and may be megabytes long. The cut never splits a secret in two
halves the pattern no longer recognises: a match straddling the cut is kept whole, then redacted.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import quote, quote_plus

REDACTED = "[REDACTED]"

# One leading \b for all shapes: the engine then rejects most positions at once (four times
# faster than a \b per alternative, on a hex trace id).
_TOKEN_SHAPES = re.compile(
    r"\b(?:"
    + "|".join(
        [
            r"[0-9a-f]{64}\b",  # Soma tokens and sessions (256 bits, hex)
            r"soma_pk_[A-Za-z0-9_-]{16,}",  # Soma gateway placeholders
            r"(?i:bearer\s+)[A-Za-z0-9._~+/=-]{8,}",  # Authorization: Bearer ...
            r"sk-[A-Za-z0-9_-]{16,}",  # OpenAI-style keys (Anthropic's sk-ant- too)
            r"(?:ghp|gho|ghu|ghs|ghr|github_pat)_[A-Za-z0-9_]{20,}",  # GitHub tokens
            r"xox[abprs]-[A-Za-z0-9-]{10,}",  # Slack tokens
            r"AKIA[0-9A-Z]{16}\b",  # AWS access key ids
            r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWTs
        ]
    )
    + ")"
)

# Values shorter than this are not registered: redacting "abc" everywhere would garble logs
# and say more about the secret than it hides.
MIN_KNOWN_LENGTH = 6

# The longest string a log event keeps, in characters; tracebacks get more room, since their
# last frames are the useful ones and they are written by our code, not sent by a caller.
MAX_STRING = 2048
MAX_TRACEBACK = 64 * 1024
_LONG_KEYS = frozenset({"exception", "stack"})
# How far past the cut a token shape is looked for (known values: their own longest form).
_SHAPE_REACH = 256

# The fields whose values this process computes itself, never from what a caller, an organ,
# an upstream or a child sent: they cannot carry a secret, so they are not scanned (nor cut).
#   level, timestamp, logger: set by the logging pipeline (a child's timestamp is kept only
#     once it parsed as a time: soma_runtime.supervisor.process);
#   component, child, stream: our loggers' names, and the supervisor's for its children;
#   runtime: a configured runtime name (a channel's own, never one a caller wrote).
# A child's event re-emitted by the supervisor has its own fields of these names renamed
# (`child_runtime`), so they are scanned. Caller-chosen values are scanned however structural
# they look: `op` and `trace_id` come from the request, `outcome` from an organ's answer (an
# upstream's error kind, echoed back), `event` of a stdlib record is its formatted message.
STRUCTURAL = frozenset({"level", "timestamp", "logger", "component", "child", "stream", "runtime"})


def secret_forms(value: str) -> tuple[str, ...]:
    """Every form in which `value` commonly travels or comes back: as is, URL-encoded (`%20`
    and `+` styles, with and without `/` kept), base64 (standard and URL-safe, with and
    without padding) and JSON-escaped.

    Base64 covers the value's own encoding only: inside a longer base64 string the encoding
    of the same bytes depends on their offset. A value that travels combined with others
    (`Basic base64(user:pass)`) is its own secret and has to be registered as such.
    """
    raw = value.encode()
    forms = [
        value,
        quote(value, safe=""),
        quote(value),
        quote_plus(value),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
    ]
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        forms += [encoded.decode(), encoded.decode().rstrip("=")]
    return tuple(dict.fromkeys(forms))


def forms_pattern(forms: Iterable[str]) -> str:
    """A regular expression matching any of `forms`, longest first (so that a form which is
    a prefix of another, like unpadded base64, never hides the longer one). Encoded as UTF-8
    it matches the forms' bytes."""
    return "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))


class Redactor:
    """A structlog processor; `add()` teaches it a secret value to remove."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._forms: set[str] = set()
        # Known values and token shapes: two patterns, since one alternation of both is
        # several times slower than the two scans.
        self._patterns: tuple[re.Pattern[str], ...] = (_TOKEN_SHAPES,)
        self._reach = _SHAPE_REACH

    def add(self, value: str | bytes) -> None:
        text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
        if len(text) < MIN_KNOWN_LENGTH or text in self._values:
            return
        self._values.add(text)
        self._forms.update(secret_forms(text))
        self._reach = max(_SHAPE_REACH, *map(len, self._forms))
        # Rebuilt rarely (once per new secret), replaced in one assignment: loggers on other
        # threads see the old or the new patterns, both usable. Known values go first, so a
        # known value shaped like a token is replaced whole.
        self._patterns = (re.compile(forms_pattern(self._forms)), _TOKEN_SHAPES)

    def redact(self, text: str) -> str:
        for pattern in self._patterns:
            text = pattern.sub(REDACTED, text)
        return text

    def bound(self, text: str, limit: int = MAX_STRING) -> str:
        """`text` redacted and, when longer than `limit`, cut with a marker."""
        if len(text) <= limit:
            return self.redact(text)
        cut, reach = limit, self._reach
        for pattern in self._patterns:
            for match in pattern.finditer(text, max(0, limit - reach), limit + reach):
                if match.start() >= limit:
                    break
                cut = max(cut, match.end())  # kept whole, so that it is still recognised
        return f"{self.redact(text[:cut])}...[truncated: {len(text)} characters]"

    def _clean(self, value: Any, limit: int) -> Any:
        if isinstance(value, str):
            return self.bound(value, limit)
        if isinstance(value, dict):
            return {k: self._clean(v, limit) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v, limit) for v in value]
        return value

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        short: list[str] = []  # the keys of strings that need no cut, scanned at once below
        texts: list[str] = []
        for key, value in event.items():
            if key in STRUCTURAL:
                continue
            if isinstance(value, str) and len(value) <= MAX_STRING:
                short.append(key)
                texts.append(value)
            elif isinstance(value, str | dict | list | tuple):
                event[key] = self._clean(value, MAX_TRACEBACK if key in _LONG_KEYS else MAX_STRING)
        # One scan per pattern over the short strings joined, instead of one per string: a
        # match inside one of them is a match in the joined text (the separator is not a word
        # character, so `\b` sees it as a string's edge), and most events have none. Only an
        # event with a match has its strings redacted one by one.
        if texts and self._matches("\n".join(texts)):
            for key in short:
                event[key] = self.redact(event[key])
        return event

    def _matches(self, text: str) -> bool:
        return any(pattern.search(text) for pattern in self._patterns)


# The process's redactor: the logging pipeline always runs it, the sidecar feeds it values.
redactor = Redactor()
