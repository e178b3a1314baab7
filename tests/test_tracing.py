"""W3C trace context end to end: the SDK and MCP requests into the sidecar, on to organs, their
logs and outbound HTTP; OpenTelemetry spans with the right parents when enabled.

The sidecar runs as a real subprocess (with OpenTelemetry set up by a launcher, as
`opentelemetry-instrument` would); the bridge runs in process with real uvicorn and the `mcp`
client, as in test_bridge.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import sdk
from sdk import _trace
from sidecar.bridge.keys import KeyStore
from soma_runtime import tracing
from soma_runtime.config import ConfigError, parse_config
from soma_runtime.tracing import TraceContext, parse, start_call
from tests import test_upstream as upstreams
from tests.fake_upstream import FakeUpstream
from tests.fixtures.tracing import SPANS_ENV, Traced
from tests.helpers import (
    SOMA,
    Process,
    child_env,
    health_status,
    wait_until,
    write_config,
)
from tests.test_bridge import bridge_config, running

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
ORGANS = ["system", "http", "tests.fixtures.tracing:Traced"]

# -- the format ---------------------------------------------------------------------------


def test_a_valid_traceparent_is_read_and_continued() -> None:
    found = parse(TRACEPARENT)
    assert found == TraceContext(TRACE, PARENT, "01")
    child = found.child()
    assert child.trace_id == TRACE and child.flags == "01"
    assert len(child.span_id) == 16 and child.span_id != PARENT
    assert parse(child.traceparent) == child
    # A later version is read by its first four fields (W3C "versioning of traceparent").
    assert parse(f"cc-{TRACE}-{PARENT}-00-what-comes-next") == TraceContext(TRACE, PARENT, "00")
    # Flags no version defines are not passed on.
    assert parse(f"00-{TRACE}-{PARENT}-ff") == TraceContext(TRACE, PARENT, "03")


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        42,
        TRACEPARENT.upper(),
        TRACEPARENT + "-",  # version 00 has exactly four fields
        TRACEPARENT[:-1],
        f"ff-{TRACE}-{PARENT}-01",  # the forbidden version
        f"00-{'0' * 32}-{PARENT}-01",  # the all-zero ids
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE}-{PARENT}-0g",
        f"00_{TRACE}_{PARENT}_01",
        f" {TRACEPARENT}",
        TRACEPARENT + "\n",
        "cc-" + TRACEPARENT[3:] + "-" + "x" * 1000,  # longer than anything worth reading
    ],
)
def test_anything_else_is_no_traceparent(value: object) -> None:
    assert parse(value) is None


def test_a_call_continues_the_trace_or_starts_one() -> None:
    context = {"traceparent": TRACEPARENT, "trace_id": "forged"}
    span = start_call("system.echo", context)
    assert span.trace_id == TRACE and span.span_id != PARENT
    assert context == {"traceparent": f"00-{TRACE}-{span.span_id}-01", "trace_id": TRACE}
    bad = {"traceparent": "00-nonsense\n{}", "trace_id": "t" * 100}
    fresh = start_call("system.echo", bad)
    assert parse(bad["traceparent"]) == fresh.context and fresh.trace_id != TRACE
    assert bad["trace_id"] == fresh.trace_id and "nonsense" not in json.dumps(bad)
    # A bare W3C trace id (no traceparent) still names the trace.
    legacy = {"trace_id": TRACE}
    assert start_call("system.echo", legacy).trace_id == TRACE


def test_the_sdk_sends_the_agents_current_span() -> None:
    assert _trace.with_traceparent({"a": "b"}) == {"a": "b"}  # no current span
    tracer = TracerProvider().get_tracer("agent")
    with tracer.start_as_current_span("agent-step") as span:
        ids = span.get_span_context()
        sent = _trace.with_traceparent(None)
        flags = int(ids.trace_flags)
        assert sent == {"traceparent": f"00-{ids.trace_id:032x}-{ids.span_id:016x}-{flags:02x}"}
        # What the caller set itself wins.
        assert _trace.with_traceparent({"traceparent": TRACEPARENT}) == {"traceparent": TRACEPARENT}


def test_the_tracing_table() -> None:
    assert not parse_config({}).tracing.opentelemetry
    assert parse_config({"tracing": {"opentelemetry": True}}).tracing.opentelemetry
    with pytest.raises(ConfigError, match=r"tracing\.otel: unknown key"):
        parse_config({"tracing": {"otel": True}})


# -- the sidecar --------------------------------------------------------------------------


def events(proc: Process, event: str) -> list[dict[str, Any]]:
    found = []
    for line in proc.output().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
    return found


def serve(tmp: Path, argv: list[str], extra: str = "", **env: str) -> tuple[Process, str]:
    """A sidecar on its own serving ORGANS, started with `argv` (`soma` or a launcher)."""
    socket_path = tmp / "run" / "sidecar.sock"
    config = write_config(
        tmp / "soma.toml",
        f"""
[soma]
state_dir = "state"
runtime_dir = "run"

[logging]
format = "json"
calls = "info"

[sidecar]
socket = "{socket_path}"
organs = {json.dumps(ORGANS)}
{extra}
""",
    )
    proc = Process(
        [*argv, "sidecar", "--config", str(config)], tmp / "sidecar.log", child_env(**env)
    )
    target = f"unix://{socket_path}"
    wait_until(
        lambda: proc.proc.poll() is not None or health_status(target) == "SERVING",
        timeout=30,
        what="the sidecar to serve",
    )
    assert proc.proc.poll() is None, proc.output()
    return proc, target


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, str]]:
    proc, target = serve(tmp_path_factory.mktemp("plain"), [SOMA])
    yield proc, target
    assert proc.stop() == 0, proc.output()


def test_an_sdk_call_carries_its_trace_to_the_organ_and_the_log(
    sidecar: tuple[Process, str],
) -> None:
    proc, target = sidecar
    with sdk.Client(target) as client:
        seen = client.call("traced.context", {}, context={"traceparent": TRACEPARENT})
    hop = parse(seen["traceparent"])
    assert hop is not None and hop.trace_id == TRACE and hop.span_id != PARENT
    assert seen["trace_id"] == TRACE
    call = wait_until(
        lambda: [e for e in events(proc, "call") if e.get("trace_id") == TRACE],
        what="the call's log event",
    )
    assert call[0]["op"] == "traced.context" and call[0]["span_id"] == hop.span_id


async def test_an_agents_current_span_reaches_the_organ(sidecar: tuple[Process, str]) -> None:
    _, target = sidecar
    tracer = TracerProvider().get_tracer("agent")
    async with sdk.AsyncClient(target) as client:
        with tracer.start_as_current_span("agent-step") as step:
            seen = await client.call("traced.context", {})
        without = await client.call("traced.context", {})
    ids = step.get_span_context()
    assert seen["trace_id"] == f"{ids.trace_id:032x}" and without["trace_id"] != seen["trace_id"]


def test_an_invalid_traceparent_starts_a_new_trace(sidecar: tuple[Process, str]) -> None:
    proc, target = sidecar
    forged = f"00-{TRACE}-{PARENT}-01 <script>"
    with sdk.Client(target) as client:
        seen = client.call("traced.context", {}, context={"traceparent": forged})
    hop = parse(seen["traceparent"])
    assert hop is not None and hop.trace_id != TRACE and seen["trace_id"] == hop.trace_id
    wait_until(
        lambda: any(e.get("trace_id") == hop.trace_id for e in events(proc, "call")),
        what="the call's log event",
    )
    assert "<script>" not in proc.output()


def test_the_http_organ_sends_the_calls_traceparent(sidecar: tuple[Process, str]) -> None:
    _, target = sidecar
    upstream = FakeUpstream()
    try:
        with sdk.Client(target) as client:
            headers = {"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"}  # the caller's own: replaced
            answer = client.call(
                "http.request",
                {"url": f"{upstream.url}/v1/echo", "headers": headers},
                context={"traceparent": TRACEPARENT},
            )
        assert answer["status"] == 200
        sent = parse(upstream.requests[-1].headers["traceparent"])
        assert sent is not None and sent.trace_id == TRACE and sent.span_id != PARENT
    finally:
        upstream.close()


def exported(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_sidecar_exports_a_span_per_call_under_the_callers(tmp_path: Path) -> None:
    spans_file = tmp_path / "spans.jsonl"
    launcher = [sys.executable, "-m", "tests.fixtures.tracing"]
    proc, target = serve(
        tmp_path, launcher, "[tracing]\nopentelemetry = true\n", **{SPANS_ENV: str(spans_file)}
    )
    try:
        with sdk.Client(target) as client:
            seen = client.call("traced.context", {}, context={"traceparent": TRACEPARENT})
            failed = client.stimulate("traced.nothing", {}, context={"traceparent": TRACEPARENT})
        assert failed.error == "UnsupportedOperation"
        spans = wait_until(
            lambda: len(found := exported(spans_file)) >= 2 and found, what="two spans"
        )
    finally:
        assert proc.stop() == 0, proc.output()
    ok, bad = spans
    assert ok["name"] == "traced.context" and ok["kind"] == "SpanKind.SERVER"
    assert ok["context"]["trace_id"] == f"0x{TRACE}" and ok["parent_id"] == f"0x{PARENT}"
    # The organ's parent is the sidecar's span; the call's log event names it too.
    assert seen["traceparent"] == f"00-{TRACE}-{ok['context']['span_id'][2:]}-01"
    assert ok["attributes"] == {"soma.runtime": "local", "soma.outcome": "ok"}
    assert bad["name"] == "traced.nothing" and bad["status"]["status_code"] == "ERROR"
    assert bad["attributes"]["error.type"] == "UnsupportedOperation"
    logged = [e["span_id"] for e in events(proc, "call")]
    assert logged == [ok["context"]["span_id"][2:], bad["context"]["span_id"][2:]]


async def test_an_upstream_mcp_server_gets_the_calls_traceparent(tmp_path: Path) -> None:
    with upstreams.http_upstream(tmp_path) as (url, state):
        config = upstreams.write_config(
            tmp_path, upstreams.http_table(url), host=upstreams.origin(url)
        )
        async with upstreams.hosting(config) as host:
            hop = {"traceparent": TRACEPARENT}
            start_call("tickets.wait", hop)  # what the sidecar does before the organ runs
            assert (await host.call("tickets.wait", {"seconds": 0}, context=hop)).ok
            assert (await host.call("tickets.wait", {"seconds": 0})).ok  # none: none sent
    assert (state / "traceparents").read_text().splitlines() == [hop["traceparent"]]


# -- the bridge ---------------------------------------------------------------------------

BRIDGE = """
[[bridge]]
name = "one"
expose = ["traced.*"]
"""


@contextlib.asynccontextmanager
async def mcp_client(url: str, key: str, **headers: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}", **headers}) as http,
        Client(streamable_http_client(url, http_client=http)) as c,  # type: ignore[arg-type]
    ):
        yield c


async def test_a_tools_call_carries_the_requests_trace(tmp_path: Path) -> None:
    config = bridge_config(tmp_path, BRIDGE)
    _, key = KeyStore(config.state_dir).create("one")
    other = f"00-{'a' * 32}-{'b' * 16}-01"
    async with running(config, [Traced()]) as bridges:
        url = bridges["one"].url
        async with mcp_client(url, key, traceparent=TRACEPARENT) as c:
            from_header = (await c.call_tool("traced_context", {})).structured_content
            # `_meta.traceparent` (SEP-414) is more specific than the HTTP request's header.
            from_meta = (
                await c.call_tool("traced_context", {}, meta={"traceparent": other})
            ).structured_content
        async with mcp_client(url, key, traceparent="00-junk") as c:
            fresh = (await c.call_tool("traced_context", {})).structured_content
    assert from_header is not None and from_meta is not None and fresh is not None
    assert from_header["trace_id"] == TRACE and from_header["bridge"] == "one"
    assert parse(from_header["traceparent"]) is not None
    assert from_header["traceparent"] != TRACEPARENT
    assert from_meta["trace_id"] == "a" * 32
    assert fresh["trace_id"] not in (TRACE, "a" * 32)
    assert parse(fresh["traceparent"]) is not None


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans of this process's calls, through a provider of the test's own (the global one is
    left alone: other tests' MCP clients would start tracing)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable_opentelemetry(provider)
    yield exporter
    tracing.disable_opentelemetry()


async def test_the_bridge_exports_a_span_per_tools_call(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    config = bridge_config(tmp_path, BRIDGE)
    _, key = KeyStore(config.state_dir).create("one")
    async with (
        running(config, [Traced()]) as bridges,
        mcp_client(bridges["one"].url, key, traceparent=TRACEPARENT) as c,
    ):
        seen = (await c.call_tool("traced_context", {})).structured_content
    assert seen is not None
    first: ReadableSpan = spans.get_finished_spans()[0]
    assert first.name == "traced.context" and first.kind == trace.SpanKind.SERVER
    context = first.get_span_context()
    assert context is not None and f"{context.trace_id:032x}" == TRACE
    assert first.parent is not None and f"{first.parent.span_id:016x}" == PARENT
    assert seen["traceparent"] == f"00-{TRACE}-{context.span_id:016x}-01"
    assert dict(first.attributes or {}) == {
        "soma.bridge": "one",
        "soma.tool": "traced_context",
        "soma.outcome": "ok",
    }


def test_a_span_nests_under_the_current_one_of_the_same_trace(
    spans: InMemorySpanExporter,
) -> None:
    """The bridge runs inside the MCP SDK's span of the request, parented by its `_meta`:
    a call of the same trace nests under it; a call of another trace keeps its own parent."""
    tracer = TracerProvider().get_tracer("mcp")
    with tracer.start_as_current_span("tools/call") as outer:
        ids = outer.get_span_context()
        same = f"00-{ids.trace_id:032x}-{os.urandom(8).hex()}-01"
        start_call("a", {"traceparent": same}).end("ok")
        start_call("b", {"traceparent": TRACEPARENT}).end("Failed")
        start_call("c", {}).end("ok")
    a, b, c = spans.get_finished_spans()
    assert a.parent is not None and a.parent.span_id == ids.span_id
    assert b.parent is not None and f"{b.parent.span_id:016x}" == PARENT
    assert c.parent is not None and c.parent.span_id == ids.span_id
    assert trace.get_current_span() is trace.INVALID_SPAN  # every call's span was detached
