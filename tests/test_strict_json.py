"""The strict JSON decoder every external input goes through: RFC 8259 only, depth bounded
before parsing."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from soma_runtime.strict_json import JsonError, loads

NON_STANDARD = [b"NaN", b"[1, Infinity]", b'{"a": -Infinity}', b"1e400", b'{"a": [-1E400]}']


@pytest.mark.parametrize("text", NON_STANDARD)
def test_nan_infinity_and_overflowing_numbers_are_refused(text: bytes) -> None:
    with pytest.raises(JsonError, match="is not valid JSON"):
        loads(text, 8)


def test_standard_json_reads_as_usual() -> None:
    text = b'{"a": [1, -2.5e3, 1.7976931348623157e308, true, null, "x\\u00e9"], "b": {}}'
    assert loads(text, 8) == json.loads(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"\xff\xfe", "is not UTF-8 text"),
        (b'{"a": 1,}', "is not valid JSON: Expecting property name .* at line 1 column 9"),
        (b"1" * 5000, "is not valid JSON: a number has too many digits"),
    ],
)
def test_other_errors_say_why_and_where(text: bytes, reason: str) -> None:
    with pytest.raises(JsonError, match=reason):
        loads(text, 8)


def test_errors_never_echo_the_text() -> None:
    with pytest.raises(JsonError) as info:
        loads(b'{"secret": "sk-do-not-echo", "x": NaN}', 8)
    assert "sk-do-not-echo" not in str(info.value)


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_depth_is_bounded_exactly() -> None:
    assert loads(json.dumps(nested(64)).encode(), 64) == nested(64)
    with pytest.raises(JsonError, match="nests deeper than the limit of 64 levels"):
        loads(json.dumps(nested(65)).encode(), 64)
    # brackets inside strings (escaped quotes included) do not nest
    assert loads(json.dumps(['[[[[\\"{{{{'] * 100).encode(), 1) == ['[[[[\\"{{{{'] * 100


@pytest.mark.parametrize(
    "text",
    [b"[" * 60_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 60_000],
)
def test_a_very_deep_text_is_refused_before_it_is_parsed(text: bytes) -> None:
    with pytest.raises(JsonError, match="nests deeper"):
        loads(text, 16)


def test_depth_agrees_with_the_parsed_value_on_random_documents() -> None:
    rng = random.Random(3)

    def document(depth: int) -> Any:
        if depth == 0 or rng.random() < 0.15:
            return rng.choice([1, "[{", 'x\\"]', None])
        children = [document(depth - 1) for _ in range(rng.randint(0, 3))]
        if rng.random() < 0.5:
            return children
        return {f"k{i}]": child for i, child in enumerate(children)}

    def depth_of(value: Any) -> int:
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            return 1 + max((depth_of(v) for v in value), default=0)
        return 0

    for _ in range(2000):
        value = document(rng.randint(1, 14))
        limit = rng.randint(1, 14)
        text = json.dumps(value).encode()
        if depth_of(value) <= limit:
            assert loads(text, limit) == value
        else:
            with pytest.raises(JsonError, match="nests deeper"):
                loads(text, limit)


@pytest.mark.parametrize("text", [rb'{"x":"\ud800"}', rb'{"\udc00":1}', rb'["\udfff\ud800"]'])
def test_escaped_lone_surrogates_are_refused(text: bytes) -> None:
    """They decode to strings no answer could carry (not encodable as UTF-8)."""
    with pytest.raises(JsonError, match="lone surrogate"):
        loads(text, 10)


def test_surrogate_pairs_and_escaped_backslashes_are_fine() -> None:
    assert loads(rb'{"x":"\ud83d\ude00"}', 10) == {"x": "\U0001f600"}
    assert loads(rb'{"x":"\\ud800"}', 10) == {"x": "\\ud800"}
