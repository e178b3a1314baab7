"""Secrets never reach a log line."""

from __future__ import annotations

import io
import json

import structlog

from soma_runtime.logs import configure_logging
from soma_runtime.redaction import REDACTED, Redactor, redactor


def test_known_values_and_token_shapes_are_removed() -> None:
    r = Redactor()
    r.add("hunter2-password")
    r.add(b"abc")  # too short to register: it would garble every log line
    for text in [
        "the key is hunter2-password!",
        "a" * 64,
        "Bearer abc.def-ghi_jkl",
        "sk-proj-ABCDEFGHIJKLMNOPQRST",
        "ghp_" + "A" * 36,
        "soma_pk_" + "x" * 43,
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abcdefghijklmnop",
    ]:
        assert REDACTED in r.redact(text), text
    for harmless in ["trace 3f2a9c1d4e5b6a7f8091a2b3c4d5e6f7", "abc", "system.echo ok"]:
        assert r.redact(harmless) == harmless


def test_the_logging_pipeline_redacts_fields_nested_values_and_tracebacks() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    redactor.add("super-secret-value")
    log = structlog.get_logger()
    log.info(
        "event", text="x super-secret-value y", nested={"list": ["super-secret-value"]}, number=5
    )
    try:
        raise ValueError("failed with super-secret-value")
    except ValueError:
        log.exception("boom")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert "super-secret-value" not in out.getvalue()
    assert lines[0]["text"] == f"x {REDACTED} y" and lines[0]["number"] == 5
    assert REDACTED in lines[1]["exception"]
