"""Strict JSON for everything that arrives from outside: RFC 8259 only, nesting bounded before
the text is parsed.

Python's json module also reads `NaN`, `Infinity` and `-Infinity`, and turns `1e400` into
`inf`. No other JSON parser accepts them, and every answer is encoded with
`allow_nan=False`, so a value let in once would fail every later answer that contains it
(a blob's metadata, a whole listing), long after the request that brought it. They are
refused where they arrive, with the other ways a text can fail to be JSON. So are escaped
lone surrogates (`"\\ud800"`): they decode to a string that cannot be encoded as UTF-8, so
no answer that contains it could be sent.

Texts are read by msgspec's parser first (about a tenth of the time): it refuses all of the
above itself and keeps integers exact. Whatever it refuses is read again by the stdlib parser
below, which decides: so every error, and every text only the stdlib would take, is exactly
what it was before msgspec (tests/test_strict_json.py compares the two on generated texts).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import msgspec


class JsonError(ValueError):
    """Not strict JSON. The message is a predicate ("is not valid JSON: ...") for the caller
    to put its subject before; it says why and where, and never quotes the text."""


def _refuse_constant(name: str) -> Any:
    raise JsonError("is not valid JSON: NaN, Infinity and -Infinity are not JSON numbers")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonError("is not valid JSON: a number is beyond the range of a 64-bit float")
    return value


# parse_constant runs only for the words NaN, Infinity and -Infinity; parse_float for every
# number with a fraction or exponent (a Python call each, which only float-heavy inputs feel).
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)

# A JSON string (escapes included); what it contains never nests.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_TO_PARENS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_RUNS = re.compile(rb"\(+|\)+")
_OPEN = ord("(")
# Passes that delete innermost pairs before the walk: after p of them, what is left has at
# most 1/(p+1) of the runs, so a hostile document costs a few passes over its bytes.
_PASSES = 8
_LONE_SURROGATE = "is not valid JSON: a string holds a lone surrogate (\\ud800-\\udfff)"


_FAST = msgspec.json.Decoder().decode


def loads(data: bytes, max_depth: int) -> Any:
    """The JSON value in `data` (UTF-8), whose arrays and objects nest at most `max_depth`
    deep; `JsonError` otherwise."""
    # Counting brackets is a C loop; only text with more of them than the limit can nest
    # too deep, and only that text pays for the exact scan.
    count = data.count(b"[") + data.count(b"{")
    if count <= max_depth or not _nests_deeper(data, max_depth):
        try:
            value = _FAST(data)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            pass  # the stdlib parser says why (or takes what msgspec cannot)
        else:
            # Checked whatever msgspec does with them: no answer could carry such a string.
            if (b"\\ud" in data or b"\\uD" in data) and _has_lone_surrogate(value):
                raise JsonError(_LONE_SURROGATE)
            return value
    return stdlib_loads(data, max_depth)


def stdlib_loads(data: bytes, max_depth: int) -> Any:
    """`loads` with Python's json module alone: what decides every text msgspec refuses."""
    try:
        text = data.decode("utf-8")  # json.loads(bytes) would also take UTF-16 and UTF-32
    except UnicodeDecodeError:
        raise JsonError("is not UTF-8 text") from None
    # Counting brackets is a C loop; only text with more of them than the limit can nest
    # too deep, and only that text pays for the exact scan.
    if data.count(b"[") + data.count(b"{") > max_depth and _nests_deeper(data, max_depth):
        raise JsonError(_too_deep(max_depth))
    try:
        value = _DECODER.decode(text)
    except JsonError:
        raise
    except json.JSONDecodeError as exc:
        # msg, lineno and colno say where, without echoing the text.
        raise JsonError(
            f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError:  # an integer longer than sys.get_int_max_str_digits()
        raise JsonError("is not valid JSON: a number has too many digits") from None
    except RecursionError:  # unreachable after the scan; kept so no text can crash a caller
        raise JsonError(_too_deep(max_depth)) from None
    # Only an escape can make a surrogate (the UTF-8 decode refused raw ones): the common
    # text without `\uD…` skips the check.
    if (b"\\ud" in data or b"\\uD" in data) and _has_lone_surrogate(value):
        raise JsonError(_LONE_SURROGATE)
    return value


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _nests_deeper(data: bytes, max_depth: int) -> bool:
    """Whether arrays and objects nest deeper than `max_depth`, decided on the raw bytes
    with strings removed and brackets kept. A few passes delete every innermost pair (each
    lowers the deepest nesting by one, at C speed), which leaves little of a wide document;
    what remains is walked run by run."""
    brackets = _STRING.sub(b"", data).translate(_TO_PARENS, _NOT_BRACKETS)
    limit = max_depth
    for _ in range(min(max_depth, _PASSES)):
        shorter = brackets.replace(b"()", b"")
        if len(shorter) == len(brackets):
            break
        brackets, limit = shorter, limit - 1
    depth = 0
    for run in _RUNS.findall(brackets):
        depth += len(run) if run[0] == _OPEN else -len(run)
        if depth > limit:
            return True
    return False  # (unbalanced brackets are not JSON: the parser says where)


def _too_deep(max_depth: int) -> str:
    return f"nests deeper than the limit of {max_depth} levels"
