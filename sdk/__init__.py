"""The Soma SDK: call organs through the sidecar from an agent process.

    import sdk
    with sdk.Client.from_env() as client:
        print(client.call("system.echo", {"hello": "world"}))

Importing it loads grpc and protobuf only, so it stays cheap for agent processes.
"""

from sdk.aio import AsyncClient
from sdk.client import Client
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
