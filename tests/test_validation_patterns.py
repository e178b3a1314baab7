"""Card schemas' patterns mean what JSON Schema (ECMA-262) says: "$" is the end of the text.
Python's re lets "$" match before a final newline too, which made "^[a-z]+$" accept "name\\n"
(a vault key, for one)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from soma_runtime.admin_protocol import Register
from soma_runtime.validation import InputValidator, ecma_pattern

NAME = "^[a-z]+$"


def test_dollar_is_the_end_of_the_text() -> None:
    validator = InputValidator({"type": "string", "pattern": NAME})
    assert validator.first_error("name") is None
    error = validator.first_error("name\n")
    assert error is not None
    assert (error.path, error.message) == ("$", 'must match the pattern "^[a-z]+$"')


@pytest.mark.parametrize(
    ("schema", "valid", "invalid"),
    [
        (
            {"type": "object", "properties": {"a": {"items": {"pattern": NAME}}}},
            {"a": ["x", "y"]},
            {"a": ["x", "y\n"]},
        ),
        (
            {
                "$defs": {"n": {"pattern": NAME}},
                "anyOf": [{"$ref": "#/$defs/n"}, {"type": "integer"}],
            },
            "x",
            "x\n",
        ),
        (
            {"type": "object", "propertyNames": {"pattern": NAME}},
            {"key": 1},
            {"key\n": 1},
        ),
        (
            {
                "type": "object",
                "patternProperties": {NAME: {"type": "integer"}},
                "additionalProperties": False,
            },
            {"key": 1},
            {"key\n": 1},
        ),
    ],
)
def test_every_place_a_pattern_can_be(schema: dict[str, Any], valid: Any, invalid: Any) -> None:
    validator = InputValidator(schema)
    assert validator.first_error(valid) is None
    assert validator.first_error(invalid) is not None


@pytest.mark.parametrize(
    ("pattern", "translated"),
    [
        (NAME, r"^[a-z]+\Z"),
        (r"^\$\d$", r"^\$\d\Z"),  # an escaped dollar is a character
        (r"^[$]$", r"^[$]\Z"),  # so is one in a class
        (r"^[]$]$", r"^[]$]\Z"),  # "]" first in a class is a member in Python's re
        (r"^a|b$|$", r"^a|b\Z|\Z"),
    ],
)
def test_only_anchors_are_translated(pattern: str, translated: str) -> None:
    assert ecma_pattern(pattern) == translated


def test_values_that_are_data_are_left_alone() -> None:
    """A "pattern" inside const or enum is data, not a pattern."""
    validator = InputValidator({"const": {"pattern": "^a$"}})
    assert validator.first_error({"pattern": "^a$"}) is None


def test_pydantic_patterns_already_end_at_the_end() -> None:
    """Config, cards and the admin protocol use pydantic, whose (Rust) regex engine reads "$"
    as JSON Schema does; this holds them to it."""
    with pytest.raises(ValidationError):
        Register(runtime="claims\n", token_sha256="0" * 64)
    with pytest.raises(ValidationError):
        Register(runtime="claims", token_sha256="0" * 64 + "\n")
