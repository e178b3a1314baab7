"""InputValidator's short cuts answer as the whole jsonschema walk does."""

from __future__ import annotations

import http.server
import threading
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


def test_a_ref_to_a_url_is_not_fetched_and_fails_as_a_typed_error() -> None:
    """Schemas come from upstreams too: a `$ref` outside the schema is never fetched (by
    default jsonschema would fetch it at every check), and what it leaves unresolved is an
    error, not an exception."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            body = b'{"type": "string"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/schema.json"
        schema = {"type": "object", "properties": {"a": {"$ref": url}}}
        error = InputValidator(schema).first_error({"a": 1})
        assert error == InputError("$", "the schema has a $ref that does not resolve")
        # Within the schema, and the bundled metaschemas, references still resolve.
        local = {
            "type": "object",
            "properties": {
                "a": {"$ref": "#/$defs/text"},
                "s": {"$ref": "https://json-schema.org/draft/2020-12/schema"},
            },
            "$defs": {"text": {"type": "string"}},
        }
        assert InputValidator(local).first_error({"a": "x", "s": {"type": "string"}}) is None
        assert InputValidator(local).first_error({"a": 1}) is not None
    finally:
        server.shutdown()
        server.server_close()
    assert asked == []
