"""The strict JSON decoder every external input goes through: RFC 8259 only, depth bounded
before parsing."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soma_runtime.strict_json import JsonError, loads, stdlib_loads

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
        # The stdlib's own words, which 3.13 improved ("Illegal trailing comma ..."): the
        # reason changes with the interpreter, the position is still given.
        (b'{"a": 1,}', r"is not valid JSON: (Expecting property name|Illegal trailing comma) "),
        (b'{"a": 1,}', r" at line 1 column [89]$"),
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


# -- msgspec reads first, the stdlib path decides whatever it refuses: the two must agree ------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)
# Spliced into texts: each is a way a text is refused, or read differently by some parser.
TRICKY = [
    b"NaN", b"-Infinity", b"1e400", b"-1E400", b"1.7976931348623159e308", b"4.9e-325",
    b"18446744073709551616", b"-9223372036854775809", b"9" * 4301, b"-0", b"-0.0", b"01", b"1.",
    b".5", b"+1", b"0x10", rb'"\ud800"', rb'"\udc00\ud800"', rb'"\ud83d\ude00"', rb'"\uD800x"',
    b'"\xff"', b'"\xed\xa0\x80"', b'"\xc0\xaf"', b'"\xf4\x90\x80\x80"', b"\xef\xbb\xbf",
    b'"\x00"', b"\x0b", b"\xc2\xa0", b'{"a":1,"a":2}', b"[" * 70, b"]" * 70, b'{"a":' * 40,
    b"true", b"nul", b",", b":", b"\\", b'"',
]  # fmt: skip


def outcome(read: Callable[[bytes, int], Any], text: bytes, depth: int) -> str:
    """What reading `text` gives, exactly: the value with its types (1 and 1.0 and True differ
    in JSON text; -0.0 keeps its sign), or the error message."""
    try:
        return "value " + json.dumps(read(text, depth))
    except JsonError as exc:
        return f"error {exc}"


@st.composite
def texts(draw: st.DrawFn) -> bytes:
    """A JSON text, laid out at random, then often cut, spliced or flipped."""
    value = draw(JSON_VALUES)
    spaced = draw(st.booleans())
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), indent=1 if spaced else None)
    data = text.encode("utf-8", "surrogatepass")
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 3))
        piece = draw(st.sampled_from(TRICKY) | st.binary(max_size=3))
        data = data[:at] + piece + data[at + cut :]
    return data


@pytest.mark.timeout(240)  # 3000 examples: about 15 s alone, four times that on a busy machine
@settings(max_examples=3000, deadline=None, derandomize=True, database=None)
@given(texts(), st.integers(1, 80))
def test_the_fast_reader_agrees_with_the_stdlib_one(text: bytes, depth: int) -> None:
    assert outcome(loads, text, depth) == outcome(stdlib_loads, text, depth)


@pytest.mark.parametrize("piece", TRICKY)
@pytest.mark.parametrize("depth", [1, 8, 64])
def test_each_tricky_piece_reads_alike_alone_and_inside(piece: bytes, depth: int) -> None:
    for text in (piece, b"[" + piece + b"]", b'{"k":' + piece + b"}", b'{"' + piece + b'":1}'):
        assert outcome(loads, text, depth) == outcome(stdlib_loads, text, depth)


def test_big_integers_stay_exact() -> None:
    """A parser that reads integers past 64 bits as floats would change them silently."""
    for number in (2**64, -(2**63) - 1, 10**400, -(10**4299)):
        assert loads(str(number).encode(), 1) == number
        assert type(loads(str(number).encode(), 1)) is int
