"""Input validation against a function's JSON Schema, compiled once per function.

Error messages are built from the schema, never from the offending value: the value may be a
secret or megabytes long, and these messages reach logs and callers.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from jsonschema.exceptions import ValidationError, best_match
from jsonschema.validators import validator_for
from referencing import Registry
from referencing.exceptions import Unresolvable

_MAX_DETAIL = 120


@dataclass(frozen=True, slots=True)
class InputError:
    """Where the input failed (a JSON path such as `$.items[2].id`) and why."""

    path: str
    message: str


class InputValidator:
    """A compiled validator for one schema."""

    __slots__ = ("_any_object", "_patterns", "_validator")

    def __init__(self, schema: dict[str, Any]) -> None:
        cls = validator_for(schema)
        cls.check_schema(schema)
        self._patterns: dict[str, str] = {}
        self._validator = cls(
            _with_ecma_anchors(schema, self._patterns),
            format_checker=cls.FORMAT_CHECKER,
            # `$ref`s resolve within the schema and the bundled metaschemas only: by default
            # jsonschema fetches any other URL, at every check, on the caller's thread (an
            # upstream's schema would make the sidecar fetch what its author chose).
            registry=Registry(),
        )
        # "Any object" (an echo, a pass-through) is an isinstance check, not a jsonschema
        # walk: a microsecond per call. Anything else it says goes the whole way.
        self._any_object = schema.get("type") == "object" and schema.keys() <= _TYPE_ONLY

    def first_error(self, instance: Any) -> InputError | None:
        """The most relevant error, or None when the instance is valid."""
        if self._any_object and isinstance(instance, dict):
            return None
        errors = self._validator.iter_errors(instance)
        try:
            first = next(errors, None)
            if first is None:  # (best_match's own bookkeeping costs a valid call a third more)
                return None
            error = best_match(itertools.chain([first], errors)) or first
        except Unresolvable:  # found only where the instance leads the check
            return InputError(path="$", message="the schema has a $ref that does not resolve")
        if error.validator == "pattern":  # name the card's pattern, not its translation
            used = str(error.validator_value)
            error.validator_value = self._patterns.get(used, used)
        return InputError(path=error.json_path, message=_describe(error))


class Validators:
    """Compiled validators by name (a function, a tool): one is compiled at the first check
    against a schema and rebuilt only when the schema object it was built from is replaced
    (a card registered anew, an upstream's tool approved anew); compiling costs tens of
    checks."""

    __slots__ = ("_known",)

    def __init__(self) -> None:
        self._known: dict[str, tuple[dict[str, Any], InputValidator]] = {}

    def first_error(self, name: str, schema: dict[str, Any], instance: Any) -> InputError | None:
        """As `InputValidator.first_error`, for `name`'s `schema`."""
        known = self._known.get(name)
        if known is None or known[0] is not schema:
            known = self._known[name] = (schema, InputValidator(schema))
        return known[1].first_error(instance)


# The keywords of a schema that only says "an object": annotations assert nothing.
_TYPE_ONLY = frozenset(
    {"type", "title", "description", "examples", "default", "$comment", "deprecated",
     "readOnly", "writeOnly"}
)  # fmt: skip

# JSON Schema patterns are ECMA-262 regular expressions, where "$" matches only at the end of
# the text; in Python's re it also matches before a final newline, so "^[a-z]+$" would accept
# "name\n". Every pattern is compiled with "$" (outside classes and escapes) as "\Z".
_ANCHOR = re.compile(r"\\.|\[\^?\]?(?:\\.|[^\]\\])*\]?|\$", re.DOTALL)  # escape|class|$

# The keywords whose values are schemas, lists of schemas, or maps of names to schemas.
_SUBSCHEMA = frozenset(
    {
        "additionalItems", "additionalProperties", "contains", "contentSchema", "else", "if",
        "items", "not", "propertyNames", "then", "unevaluatedItems", "unevaluatedProperties",
        "allOf", "anyOf", "oneOf", "prefixItems",
    }
)  # fmt: skip
_SUBSCHEMA_MAPS = frozenset(
    {"$defs", "definitions", "dependencies", "dependentSchemas", "properties"}
)


def ecma_pattern(pattern: str) -> str:
    """`pattern` for Python's re with ECMA-262's meaning of "$"."""
    return _ANCHOR.sub(lambda m: r"\Z" if m.group() == "$" else m.group(), pattern)


def _with_ecma_anchors(schema: Any, originals: dict[str, str]) -> Any:
    """A copy of `schema` whose `pattern`s and `patternProperties` use `ecma_pattern`;
    `originals` maps each translated pattern back to the card's."""
    if not isinstance(schema, dict):
        return schema
    copy: dict[str, Any] = {}
    for keyword, value in schema.items():
        if keyword == "pattern" and isinstance(value, str):
            copy[keyword] = ecma_pattern(value)
            originals[copy[keyword]] = value
        elif keyword == "patternProperties" and isinstance(value, dict):
            copy[keyword] = {
                ecma_pattern(p): _with_ecma_anchors(s, originals) for p, s in value.items()
            }
        elif keyword in _SUBSCHEMA_MAPS and isinstance(value, dict):
            copy[keyword] = {k: _with_ecma_anchors(s, originals) for k, s in value.items()}
        elif keyword in _SUBSCHEMA and isinstance(value, list):
            copy[keyword] = [_with_ecma_anchors(s, originals) for s in value]
        elif keyword in _SUBSCHEMA:
            copy[keyword] = _with_ecma_anchors(value, originals)
        else:
            copy[keyword] = value
    return copy


def _schema_value(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _describe(error: ValidationError) -> str:
    """A message naming the rule that failed, using only the schema's side of it."""
    rule = str(error.validator)
    expected = error.validator_value
    if rule in {"required", "additionalProperties", "dependentRequired", "propertyNames"}:
        # These name keys of the input, not values; keep them but bound their length.
        message = error.message
        return message if len(message) <= 2 * _MAX_DETAIL else message[: 2 * _MAX_DETAIL] + "..."
    templates = {
        "type": "must be of type {}",
        "enum": "must be one of {}",
        "const": "must equal {}",
        "pattern": "must match the pattern {}",
        "format": "must be a valid {}",
        "minLength": "must be at least {} characters long",
        "maxLength": "must be at most {} characters long",
        "minItems": "must have at least {} items",
        "maxItems": "must have at most {} items",
        "minProperties": "must have at least {} properties",
        "maxProperties": "must have at most {} properties",
        "minimum": "must be >= {}",
        "maximum": "must be <= {}",
        "exclusiveMinimum": "must be > {}",
        "exclusiveMaximum": "must be < {}",
        "multipleOf": "must be a multiple of {}",
        "uniqueItems": "must not contain duplicate items",
    }
    template = templates.get(rule)
    if template is not None:
        return template.format(_schema_value(expected))
    return f"does not satisfy {rule!r}"
