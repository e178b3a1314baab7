"""Decoding requests and encoding responses: JSON text in protobuf `bytes` fields.

Inputs are bounded three ways before an organ sees them: the gRPC message limit (the server
refuses larger messages with RESOURCE_EXHAUSTED), a nesting depth checked before parsing,
and strict RFC 8259 JSON (no NaN or Infinity, no number beyond a 64-bit float), so nothing an
organ stores can make a later answer unencodable.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from soma_runtime import strict_json


class WireError(Exception):
    """A request that cannot be decoded; answered with a gRPC status, not an organ response."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_input(data: bytes, max_depth: int) -> Any:
    """The JSON value in `data` (empty means `{}`); `WireError` if it is not strict JSON or
    nests deeper than `max_depth`."""
    if not data:
        return {}
    try:
        return strict_json.loads(data, max_depth)
    except strict_json.JsonError as exc:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"input_json {exc}") from None


# Built once: json.dumps with options builds an encoder per call, a third of its time on a
# small answer. (The stdlib's C encoder stays: msgspec's and orjson's encode NaN as null and
# take sets, bytes, UUIDs and dataclasses, which must stay errors.)
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def encode_output(value: Any) -> bytes:
    """Compact UTF-8 JSON; `ValueError`/`TypeError` if the value is not JSON (an organ bug)."""
    return _ENCODE(value).encode()
