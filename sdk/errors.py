"""The SDK's exceptions: organ answers (`OrganError` and kin) and transport failures."""

from __future__ import annotations

from typing import Any


class SomaError(Exception):
    """Base of every error the SDK raises."""


class OrganError(SomaError):
    """The organ answered `ok=false`. `payload` is its error object (`{"error": kind, ...}`)."""

    def __init__(self, op: str, payload: dict[str, Any]) -> None:
        self.op = op
        self.payload = payload
        self.kind = str(payload.get("error", "Failed"))
        message = payload.get("message")
        super().__init__(f"{op}: {self.kind}" + (f": {message}" if message else ""))


class UnsupportedOperation(OrganError):
    """No organ provides the op (or it is empty)."""


class InvalidInput(OrganError):
    """The input does not match the function's input schema."""

    @property
    def path(self) -> str:
        """JSON path of the failing part of the input, such as `$.items[0]`."""
        return str(self.payload.get("path", "$"))


class Overloaded(OrganError):
    """The function is at its in-flight cap (`queue_cap`); retry later."""


class TransportError(SomaError):
    """The call did not get an organ's answer. `code` is the gRPC status name."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}" if details else code)
        self.code = code
        self.details = details


class Unavailable(TransportError):
    """The sidecar cannot be reached (or went away during a call that is not safe to repeat)."""


class DeadlineExceeded(TransportError):
    """The call's deadline passed before an answer came."""


class Unauthenticated(TransportError):
    """The channel refused this caller's credentials."""


class PermissionDenied(TransportError):
    """This runtime may not call that function (or use that credential)."""


class InvalidRequest(TransportError):
    """The sidecar could not decode the request: not JSON, too deep, or too large."""


ORGAN_ERRORS: dict[str, type[OrganError]] = {
    "UnsupportedOperation": UnsupportedOperation,
    "InvalidInput": InvalidInput,
    "Overloaded": Overloaded,
}

TRANSPORT_ERRORS: dict[str, type[TransportError]] = {
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "INVALID_ARGUMENT": InvalidRequest,
    "RESOURCE_EXHAUSTED": InvalidRequest,
}
