"""What the SDK returns: an organ's `Response` and search matches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdk.errors import ORGAN_ERRORS, OrganError


@dataclass(frozen=True, slots=True)
class Response:
    """An organ's answer, in the specification's shape."""

    ok: bool
    output: Any
    latency_ms: float
    cost: float | None = None

    @property
    def error(self) -> str | None:
        """The error kind when not ok (`"InvalidInput"`, ...), else None."""
        if self.ok:
            return None
        if isinstance(self.output, dict):
            return str(self.output.get("error", "Failed"))
        return "Failed"

    def raise_for_error(self, op: str) -> None:
        """Raise the typed `OrganError` matching this response when it is not ok."""
        if self.ok:
            return
        payload = (
            self.output
            if isinstance(self.output, dict)
            else {"error": "Failed", "output": self.output}
        )
        raise ORGAN_ERRORS.get(str(payload.get("error")), OrganError)(op, payload)


@dataclass(frozen=True, slots=True)
class FunctionMatch:
    """A search hit: the hosting organ and the function's card (a JSON object)."""

    organ: str
    card: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.card["name"])
