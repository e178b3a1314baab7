"""Decoding requests and encoding responses: JSON text in protobuf `bytes` fields.

Inputs are bounded three ways before an organ sees them: the gRPC message limit (the server
refuses larger messages with RESOURCE_EXHAUSTED), JSON that must parse, and a nesting depth.
"""

from __future__ import annotations

import json
from typing import Any

import grpc


class WireError(Exception):
    """A request that cannot be decoded; answered with a gRPC status, not an organ response."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_input(data: bytes, max_depth: int) -> Any:
    """The JSON value in `data` (empty means `{}`); `WireError` if it is not JSON or too deep."""
    if not data:
        return {}
    # Only an input with more brackets than the depth limit can be too deep: counting them is
    # a C loop over the bytes, far cheaper than walking every decoded input.
    too_many_brackets = data.count(b"[") + data.count(b"{") > max_depth
    try:
        # Decoded explicitly: json.loads(bytes) would also accept UTF-16 and UTF-32.
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, _too_deep(max_depth)) from None
    except UnicodeDecodeError:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "input_json is not UTF-8 text") from None
    except ValueError as exc:
        raise WireError(
            grpc.StatusCode.INVALID_ARGUMENT, f"input_json is not valid JSON: {_reason(exc)}"
        ) from None
    if too_many_brackets and depth_exceeds(value, max_depth):
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, _too_deep(max_depth))
    return value


def depth_exceeds(value: Any, max_depth: int) -> bool:
    """Whether containers nest deeper than `max_depth` (iterative: no recursion limit)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def encode_output(value: Any) -> bytes:
    """Compact UTF-8 JSON; `ValueError`/`TypeError` if the value is not JSON (an organ bug)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _too_deep(max_depth: int) -> str:
    return f"input_json nests deeper than the limit of {max_depth} levels"


def _reason(exc: ValueError) -> str:
    # JSONDecodeError's msg/pos/lineno say where, without echoing the input.
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return type(exc).__name__
