"""The protocol between an agent runtime and the sidecar: the one public contract both sides
import (the SDK, the sidecar and the supervisor), and enough to write a client in another
language. This module is standard library only; the gRPC stubs are `sdk.protocol.soma.v1`.

The hand-off
------------
`soma supervise` starts each runtime with, in its environment:

- `SOMA_SIDECAR_ADDRESS`: `unix://<runtime_dir>/rt/<runtime>.sock`, the runtime's own gRPC channel;
- `SOMA_RUNTIME`: the runtime's name;
- `SOMA_AUTH_SOCKET`: the channel's handshake socket, `<runtime>.auth.sock` beside it;
- `SOMA_TOKEN_FD`: the number of an inherited descriptor (a sealed memfd) holding the token,
  64 hex digits. Read it once from offset 0, then mark it close-on-exec so that programs the
  runtime starts do not inherit it. The token itself is never in the environment.

`soma sidecar` run on its own writes the token of its one channel to `<name>.token` (0600)
beside `<name>.sock` instead; `SOMA_TOKEN_FILE` may name such a file.

The handshake
-------------
Connect to the handshake socket (Unix, stream), write one JSON object on one line,
`{"token": "<token>"}`, and read one line back:

- `{"ok": true, "session": "<64 hex digits>"}`: send `authorization: Bearer <session>` as
  metadata with every gRPC call on the channel;
- `{"ok": false, "error": "retry"}`: the runtime is being registered; ask again shortly;
- `{"ok": false, "error": "unauthenticated" | "refused", "message": ...}`: final.

The sidecar reads the kernel's credentials of the connecting process (SO_PEERCRED): it must
run as the sidecar's user and be the runtime's process or one of its descendants, else it is
refused as soon as it connects (the answer may then arrive before the request is written).
A connection closed without an answer means the sidecar is (re)starting: try again. A call
answered `UNAUTHENTICATED` carries a session the sidecar no longer knows (it restarted):
make a new session and send the call again; nothing ran.

The service
-----------
`soma.v1.Sidecar` (`proto/soma/v1/sidecar.proto`): `Stimulate`, `Stream` (many Stimulate calls
multiplexed by id on one bidirectional stream), `Describe` and `Search`, with JSON in `bytes`
fields; plus the standard `grpc.health.v1.Health` and reflection services. Clients use the
channel options below (`CHANNEL_OPTIONS`).
"""

from __future__ import annotations

import json
from pathlib import Path

ADDRESS_ENV = "SOMA_SIDECAR_ADDRESS"
RUNTIME_ENV = "SOMA_RUNTIME"
AUTH_SOCKET_ENV = "SOMA_AUTH_SOCKET"
TOKEN_FD_ENV = "SOMA_TOKEN_FD"  # noqa: S105 - a variable name, not a secret
TOKEN_FILE_ENV = "SOMA_TOKEN_FILE"  # noqa: S105

AUTHORIZATION = "authorization"
BEARER = "Bearer "

# Handshake answers' `error` values.
RETRY = "retry"
UNAUTHENTICATED = "unauthenticated"
REFUSED = "refused"

MAX_HANDSHAKE_LINE = 4096

# The sidecar's default receive limit; the SDK refuses larger requests before sending them
# (on a stream, an oversized frame would end the stream and every call on it).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

# The gRPC channel options of every SDK client (and of `soma bench`'s bare baselines, so that
# they compare like with like).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A local sidecar restarts in well under a second: reconnect promptly rather than after
    # gRPC's default backoff, which grows to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def socket_path(target: str) -> str | None:
    """The filesystem path of a `unix:` target, None for other targets."""
    for prefix in ("unix://", "unix:"):
        if target.startswith(prefix):
            return target[len(prefix) :]
    return None


def channel_socket(directory: Path, runtime: str) -> Path:
    """A runtime's gRPC socket in the channel directory."""
    return directory / f"{runtime}.sock"


def _companion(path: str, suffix: str) -> str:
    return (path[: -len(".sock")] if path.endswith(".sock") else path) + suffix


def auth_socket_for(path: str) -> str:
    """`/run/rt/claims.sock` → `/run/rt/claims.auth.sock`."""
    return _companion(path, ".auth.sock")


def token_file_for(path: str) -> str:
    """`/run/sidecar.sock` → `/run/sidecar.token`."""
    return _companion(path, ".token")


def handshake_request(token: str) -> bytes:
    return json.dumps({"token": token}).encode() + b"\n"


def bearer_metadata(session: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, BEARER + session),)
