"""Hypothesis strategies the fuzz targets share: JSON values, inputs built from a function's
input schema (valid-ish, then mutated), byte mutations, and JSON texts a strict parser must
refuse.

hypothesis-jsonschema is not installed; the schemas of the built-in organs use a small part of
JSON Schema (type, properties, required, additionalProperties, enum, const, pattern, bounds,
items), and `from_schema` covers exactly that part. Whatever it does not know becomes any JSON
value, which is what a fuzzer wants anyway.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from hypothesis import strategies as st


class Bytes:
    """Bytes to send, shown cut short: a falsifying example of 60 kB would drown the report.
    (A plain class: hypothesis prints dataclasses field by field, in full.)"""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        head = self.data[:60]
        return f"Bytes({head!r}{'...' if len(self.data) > 60 else ''}, {len(self.data)} bytes)"


# Keys and strings: printable text, and text with control characters and astral code points.
TEXT = st.text(max_size=40)
KEYS = st.one_of(st.sampled_from(["", "key", "data", "error", "__proto__", "$ref"]), TEXT)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSON: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(KEYS, children, max_size=5)
    ),
    max_leaves=20,
)
JSON_OBJECTS = st.dictionaries(KEYS, JSON, max_size=6)


def _bounded_number(schema: dict[str, Any], integer: bool) -> st.SearchStrategy[Any]:
    """Numbers around the schema's bounds: inside, on them and just outside."""
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    edges = [v + d for v in (low, high) if v is not None for d in (-1, 0, 1)]
    inside = (
        st.integers(None if low is None else int(low), None if high is None else int(high))
        if integer
        else st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)
    )
    return st.one_of(inside, st.sampled_from(edges)) if edges else inside


def _string(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    pattern = schema.get("pattern")
    if pattern is None:
        return st.text(max_size=schema.get("maxLength", 60) + 2)
    try:
        matching = st.from_regex(re.compile(pattern), fullmatch=True)
    except Exception:  # a pattern hypothesis cannot generate from: plain text only
        return TEXT
    return st.one_of(matching, TEXT)


def from_schema(schema: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values meant to satisfy `schema` (most do; the bounds' edges and patterns' plain-text
    alternatives are there to miss by a little)."""
    if not isinstance(schema, dict) or depth > 4:
        return JSON
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        return _object(schema, depth)
    if kind == "array":
        items = from_schema(schema.get("items"), depth + 1)
        return st.lists(
            items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 8), 8)
        )
    if kind == "string":
        return _string(schema)
    if kind in ("integer", "number"):
        return _bounded_number(schema, integer=kind == "integer")
    if kind == "boolean":
        return st.booleans()
    return JSON


def _object(schema: dict[str, Any], depth: int) -> st.SearchStrategy[dict[str, Any]]:
    properties: dict[str, Any] = schema.get("properties", {})
    if not properties:
        return JSON_OBJECTS
    required = set(schema.get("required", []))
    optional = {name: from_schema(sub, depth + 1) for name, sub in properties.items()}

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        value: dict[str, Any] = {}
        for name, strategy in optional.items():
            if name in required or draw(st.booleans()):
                value[name] = draw(strategy)
        return value

    return build()


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[Any]) -> Any:
    """A value of `base`, then one change a careless or hostile caller would make (to a copy:
    `st.just` hands out the same object every time, which must not change under it)."""
    value = copy.deepcopy(draw(base))
    how = draw(st.sampled_from(["none", "drop", "add", "replace", "retype", "wrap"]))
    if how == "none":
        return value
    if how == "retype" or not isinstance(value, dict):
        return draw(JSON)
    if how == "wrap":
        return {"input": value} if draw(st.booleans()) else [value]
    keys = sorted(value)
    if how == "drop" and keys:
        value.pop(draw(st.sampled_from(keys)))
    elif how == "replace" and keys:
        value[draw(st.sampled_from(keys))] = draw(JSON)
    else:
        value[draw(KEYS)] = draw(JSON)
    return value


def schema_inputs(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Inputs for a function with this input schema: valid-ish, mutated, or anything."""
    valid = from_schema(schema)
    return st.one_of(valid, mutated(valid), JSON)


@st.composite
def mutated_bytes(draw: st.DrawFn, base: bytes) -> bytes:
    """`base` with a few bytes flipped, inserted, deleted, or cut short."""
    data = bytearray(base)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        how = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(min_value=0, max_value=len(data)))
        if how == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del data[at : at + draw(st.integers(min_value=1, max_value=8))]
        else:
            del data[at:]
    return bytes(data)


# JSON texts Python's json module accepts by default but RFC 8259 does not, or that decode to
# values which cannot be encoded again: each must be refused as bad input, not reach an organ.
NON_JSON_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 5000]
UNENCODABLE_STRINGS = ['"\\ud800"', '"\\udfff x"', '"a\\udbff"']


# Where the literal goes, per op: somewhere the function's schema lets any JSON value through.
HOSTILE_TEMPLATES = {
    "system.echo": ['{"x":%s}', '{"a":[1,{"b":%s}]}', '{"x":1,"x":%s}'],
    "vault.store": ['{"key":"k","data":"","metadata":{"m":%s}}'],
}


@st.composite
def hostile_json_texts(draw: st.DrawFn) -> tuple[str, bytes]:
    """An op and an input text for it with a hostile literal somewhere inside."""
    literal = draw(st.sampled_from(NON_JSON_NUMBERS + UNENCODABLE_STRINGS))
    op = draw(st.sampled_from(sorted(HOSTILE_TEMPLATES)))
    template = draw(st.sampled_from(HOSTILE_TEMPLATES[op]))
    return op, (template % literal).encode()
