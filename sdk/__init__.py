"""The Soma SDK: call organs through the sidecar from an agent process.

    import sdk
    with sdk.Client.from_env() as client:
        print(client.call("system.echo", {"hello": "world"}))

Importing it loads grpc and protobuf only, so it stays cheap for agent processes; and those
only when a client is first used, so that `sdk.protocol` (the names both sides share) costs
the supervisor nothing.
"""

from typing import TYPE_CHECKING, Any

from sdk.errors import (
    DeadlineExceeded,
    InvalidInput,
    InvalidRequest,
    OrganError,
    Overloaded,
    PermissionDenied,
    SomaError,
    TransportError,
    Unauthenticated,
    Unavailable,
    UnsupportedOperation,
)
from sdk.types import FunctionMatch, Response

if TYPE_CHECKING:
    from sdk.aio import AsyncClient
    from sdk.client import Client


def __getattr__(name: str) -> Any:
    """`sdk.Client` and `sdk.AsyncClient`, imported (with grpc) on first use."""
    if name == "Client":
        from sdk.client import Client

        return Client
    if name == "AsyncClient":
        from sdk.aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module 'sdk' has no attribute {name!r}")


__all__ = [
    "AsyncClient",
    "Client",
    "DeadlineExceeded",
    "FunctionMatch",
    "InvalidInput",
    "InvalidRequest",
    "OrganError",
    "Overloaded",
    "PermissionDenied",
    "Response",
    "SomaError",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "UnsupportedOperation",
]
