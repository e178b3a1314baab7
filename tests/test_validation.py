"""InputValidator's short cuts answer as the whole jsonschema walk does."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for

from soma_runtime.validation import InputError, InputValidator

INSTANCES: list[Any] = [{}, {"a": [1, None]}, [], [{}], "x", 3, 2.5, True, None]
SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "description": "Any JSON object; it is returned as is."},  # short cut
    {"type": "object", "title": "t", "examples": [{}], "$comment": "c"},  # short cut
    {"type": "object", "required": ["a"]},  # not: it says more than "an object"
    {"type": "object", "properties": {"a": {"type": "string"}}},
    {"type": "object", "additionalProperties": False},
    {"type": ["object", "null"]},
    {"type": "array", "items": {"type": "object"}},
    {"description": "anything"},
    {"anyOf": [{"type": "string"}, {"type": "object", "required": ["b"]}]},
]


def walked(schema: dict[str, Any], instance: Any) -> tuple[str, str] | None:
    """The error jsonschema's own best_match picks (the messages differ: ours are built from
    the schema, so only the path and whether there is one are compared with it)."""
    error = best_match(validator_for(schema)(schema).iter_errors(instance))
    return None if error is None else (error.json_path, str(error.validator))


@pytest.mark.parametrize("schema", SCHEMAS)
def test_the_first_error_is_the_one_the_whole_walk_picks(schema: dict[str, Any]) -> None:
    validator = InputValidator(schema)
    for instance in INSTANCES:
        error = validator.first_error(instance)
        expected = walked(schema, instance)
        assert (error is None) == (expected is None), (schema, instance)
        if error is not None and expected is not None:
            assert isinstance(error, InputError)
            assert error.path == expected[0], (schema, instance)


def test_an_object_only_schema_still_refuses_what_is_not_an_object() -> None:
    validator = InputValidator({"type": "object", "description": "Any JSON object."})
    assert validator.first_error({"any": ["thing"]}) is None
    for instance in ([], "x", None, 1):
        assert validator.first_error(instance) == InputError("$", 'must be of type "object"')
