"""The organ contract's two messages: a `Stimulus` goes in, a `Response` comes out.

Plain slotted dataclasses rather than pydantic models: they are built on every call, and the
JSON they carry has already been parsed and is validated separately against the function's
input schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ErrorKind(StrEnum):
    """The `error` values of a failed response that the runtime itself produces."""

    UNSUPPORTED_OPERATION = "UnsupportedOperation"
    INVALID_INPUT = "InvalidInput"
    OVERLOADED = "Overloaded"
    INTERNAL = "Internal"


# Errors caused by the caller rather than the organ: they do not count against a function's SLO.
CALLER_ERRORS = frozenset({ErrorKind.UNSUPPORTED_OPERATION, ErrorKind.INVALID_INPUT})


@dataclass(slots=True)
class Stimulus:
    """One call: the fully-qualified function name, its JSON input and request metadata.

    `context` carries metadata such as the trace id. The caller controls it, so it is never
    trusted for authorization. What the caller cannot forge travels beside it, filled only by
    the sidecar: `caller`, the authenticated runtime (None for in-process calls), and
    `credentials`, the decrypted credentials the function's card asked for.
    """

    op: str
    input: Any
    context: dict[str, str] = field(default_factory=dict)
    caller: str | None = None
    credentials: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Response:
    """What an organ answers. `latency_ms` is fractional so sub-millisecond calls are measurable."""

    ok: bool
    output: Any
    latency_ms: float = 0.0
    cost: float | None = None

    @classmethod
    def failure(cls, error: str, latency_ms: float = 0.0, **details: Any) -> Response:
        """A failed response whose output is `{"error": error, **details}`."""
        return cls(ok=False, output={"error": str(error), **details}, latency_ms=latency_ms)

    @property
    def error(self) -> str | None:
        """The error kind of a failed response, None when ok."""
        if self.ok or not isinstance(self.output, dict):
            return None
        kind = self.output.get("error")
        return kind if isinstance(kind, str) else None


def unsupported(op: str, latency_ms: float = 0.0) -> Response:
    """The contract's answer to an op the organ does not have."""
    return Response.failure(ErrorKind.UNSUPPORTED_OPERATION, latency_ms, op=op)
