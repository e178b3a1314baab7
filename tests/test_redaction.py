"""Secrets never reach a log line."""

from __future__ import annotations

import io
import json
import logging
import re
from urllib.parse import quote

import httpx2
import structlog

import sdk
from soma_runtime.logs import configure_logging
from soma_runtime.redaction import MAX_STRING, MAX_TRACEBACK, REDACTED, Redactor, redactor
from tests.fake_upstream import FakeUpstream, encodings
from tests.helpers import Process, wait_until


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


ECHOED = 'ek/echo+key="0123 4567"'


def test_every_encoding_of_a_known_secret_is_redacted() -> None:
    r = Redactor()
    r.add(ECHOED)
    for form in encodings(ECHOED):
        line = r.redact(f"GET /v1?api_key={form}&x=1 ({form})")
        assert not any(f in line for f in encodings(ECHOED)), form
        assert line.count(REDACTED) == 2 and line.endswith(")")


def test_http_client_request_lines_never_reach_the_log() -> None:
    """httpx2 logs `HTTP Request: GET <url>` at INFO, query credential included, URL-encoded."""
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    redactor.add(ECHOED)
    upstream = FakeUpstream()
    try:
        with httpx2.Client(trust_env=False, timeout=10) as http:
            answer = http.get(f"{upstream.url}/v1/echo", params={"api_key": ECHOED})
        assert answer.json()["query"]["api_key"] == [ECHOED]
    finally:
        upstream.close()
    logging.getLogger("httpx2").warning("GET %s/v1?api_key=%s failed", upstream.url, quote(ECHOED))
    text = out.getvalue()
    assert "HTTP Request" not in text  # the library's request lines are not logged...
    assert "failed" in text and not any(f in text for f in encodings(ECHOED))  # ...nor its key


def test_every_log_line_is_bounded() -> None:
    """A 1 MiB op or trace id (anything a caller sends) is cut, saying how long it was; the
    cut never leaves a piece of a secret the redactor no longer recognises."""
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    redactor.add(ECHOED)
    big = 1024 * 1024
    log = structlog.get_logger()
    log.info("call", op="o" * big, trace_id="t" * big, nested={"path": ["p" * big]})
    logging.getLogger("some.library").warning("%s", "s" * big)
    straddling = "a" * (MAX_STRING - 5) + ECHOED + "b" * 100
    log.info("cut", value=straddling)
    try:
        raise ValueError("e" * big)
    except ValueError:
        log.exception("failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and all(len(line) < 4 * MAX_STRING + 500 for line in lines[:3])
    call, library, cut, failed = (json.loads(line) for line in lines)
    assert len(failed["exception"]) < MAX_TRACEBACK + 100 and "truncated" in failed["exception"]
    assert call["op"] == "o" * MAX_STRING + f"...[truncated: {big} characters]"
    assert call["trace_id"].endswith(f"[truncated: {big} characters]")
    assert call["nested"]["path"][0].endswith(f"[truncated: {big} characters]")
    assert library["event"].endswith(f"[truncated: {big} characters]")
    assert cut["value"] == "a" * (MAX_STRING - 5) + REDACTED + "...[truncated: 2166 characters]"
    assert ECHOED[:5] not in lines[2]


def test_a_sidecar_logs_a_huge_op_and_trace_id_bounded(sidecar: tuple[Process, str]) -> None:
    proc, target = sidecar
    big = 1024 * 1024
    with sdk.Client(target) as client:
        answer = client.stimulate("x" * big, {}, context={"trace_id": "t" * big})
    assert answer.error == "UnsupportedOperation"
    line = wait_until(
        lambda: next((ln for ln in proc.output().splitlines() if '"xxxxxxxx' in ln), None),
        what="the call logged",
    )
    assert len(line) < 3 * MAX_STRING and f"[truncated: {big} characters]" in line
    assert max(map(len, proc.output().splitlines())) < 3 * MAX_STRING


def test_one_scan_finds_a_secret_in_any_short_field_and_redacts_only_that_one() -> None:
    r = Redactor()
    r.add("hunter2-password")
    fields = {"op": "system.echo", "trace_id": "t1", "outcome": "ok", "error": "no"}
    for key in fields:
        for secret in ["hunter2-password", "sk-" + "A" * 20, "a" * 64]:
            event = {**fields, key: f"x {secret} y", "event": "call", "n": 3}
            cleaned = r(None, "info", dict(event))
            assert cleaned == {**event, key: f"x {REDACTED} y"}, (key, secret)
    assert r(None, "info", {**fields, "event": "call"}) == {**fields, "event": "call"}


def test_a_token_a_caller_puts_in_the_op_or_the_trace_id_never_reaches_the_log(
    sidecar: tuple[Process, str],
) -> None:
    """The op looks structural, but the caller chose it: it is scanned. A trace id that is not
    one (W3C: 32 hex digits) is replaced by a new trace, so the caller's text never lands."""
    proc, target = sidecar
    token = "sk-" + "C" * 24
    with sdk.Client(target) as client:
        answer = client.stimulate(f"acme.{token}", {}, context={"trace_id": f"t-{token}"})
    assert answer.error == "UnsupportedOperation"
    line = wait_until(
        lambda: next((ln for ln in proc.output().splitlines() if '"acme.' in ln), None),
        what="the call logged",
    )
    record = json.loads(line)
    assert record["op"] == f"acme.{REDACTED}", line
    assert re.fullmatch("[0-9a-f]{32}", record["trace_id"]), line
    assert token not in proc.output()
