"""Every answer of every bridge is one the MCP clients accept: a real `soma sidecar` serves the
built-in organs, the test organs, an upstream MCP server re-exposed (`[[upstream]]`) and a
search-mode instance; every tool each instance lists is called, with input that succeeds and
input that fails in every way we know (bad input, NotFound, organ failures, a deadline, a
missing credential, idempotency keys, an upstream's garbage, unknown tools), by the official
Python client and by the TypeScript SDK pinned in tests/fixtures/ts_client, each checking the
results against the tool's outputSchema with its own validator."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mcp.types as types
import pytest
from mcp.shared.exceptions import MCPError

from sidecar.bridge.calls import ERROR
from sidecar.bridge.keys import KeyStore
from sidecar.bridge.published import url_file
from sidecar.bridge.tools import IDEMPOTENCY_KEY, META
from tests.helpers import child_env, set_secret, start_sidecar, wait_until
from tests.test_bridge import client
from tests.test_upstream import SECRET, TOKEN, http_table, http_upstream, origin

ORGANS = [
    "system",
    "vault",
    "tests.fixtures.organs:Acme",
    "tests.fixtures.organs:Ledger",
    "tests.fixtures.organs:Composite",
    "tests.fixtures.organs:Manual",
    "tests.fixtures.organs:Keyring",
]
BRIDGES = """
[[credential]]
name = "crm"
hosts = ["https://api.crm.example"]

[[bridge]]
name = "builtin"
# keyring.whoami without its credential: PermissionDenied.
expose = ["system.*", "vault.*", "keyring.whoami"]

[[bridge]]
name = "organs"
expose = ["acme.*", "ledger.*", "composite.*", "counter.*", "manual.*", "keyring.whoami"]
tool_names = "dotted"
credentials = ["crm"]

[[bridge]]
name = "upstream"
expose = ["tickets.*"]
credentials = ["tickets-token"]

[[bridge]]
name = "search"
expose = ["system.*", "acme.*"]
discovery = "search"
"""
ONCE = {IDEMPOTENCY_KEY: "once"}
Call = tuple[dict[str, Any], dict[str, Any] | None]  # arguments, _meta
# What each function (or search-mode tool) is called with, in this order, after `{}` for a
# tool with required properties. A tool listed without a row fails the test: add one.
CALLS: dict[str, list[Call]] = {
    "system.echo": [({"a": [1, "x"]}, None)],
    "system.ping": [({}, None), ({"extra": 1}, None)],
    "vault.store": [({"key": "k", "data": "aGk="}, None), ({"key": "../k", "data": ""}, None)],
    "vault.retrieve": [({"key": "k"}, None), ({"key": "missing"}, None)],
    "vault.list": [({}, None), ({"limit": 0}, None)],
    "vault.delete": [({"key": "k"}, None), ({"key": "k"}, None)],
    "keyring.whoami": [({}, None)],
    "acme.greet": [({"name": "Ada"}, None), ({"name": ""}, None)],
    "acme.fail": [({}, None), ({}, {IDEMPOTENCY_KEY: ""})],  # Internal; a bad key
    "acme.refuse": [({"key": "x"}, None)],  # the organ's NotFound
    "acme.slow": [({"ms": 0}, None), ({"ms": -1}, None)],
    "acme.record": [({"id": "a", "ms": 0}, ONCE), ({"id": "b", "ms": 0}, ONCE)],  # a conflict
    "acme.hang": [({"id": "h"}, None)],  # DeadlineExceeded after 1 s
    "acme.blob": [({"size": 3}, None)],
    "acme.blobs": [({}, None)],
    "acme.bad_output": [({}, None)],  # Internal: its output is not JSON
    "acme.broken_promise": [({}, None)],  # Internal: its output breaks its card
    "ledger.append": [({"n": 1}, None), ({"n": "one"}, None)],
    "ledger.wipe": [({}, None)],
    "ledger.fetch_all": [({}, None)],
    "composite.double": [({"a": 2}, None)],
    "counter.add": [({"a": 1, "b": 2}, None)],
    "manual.upper": [({"text": "hi"}, None)],
    "tickets.get_ticket": [({"id": "1"}, None), ({"id": 7}, None), ({"id": "garbage"}, None)],
    "tickets.hide": [({"id": "no-such-tool"}, None)],
    "tickets.wait": [({"seconds": 0}, None)],
    "tickets.close-ticket": [({"id": "1"}, None)],
    "tickets.stats": [({}, None)],  # no output schema, structured content all the same
    "tickets.offer": [({"id": "none-such"}, None)],
    "search_tools": [({"query": "echo"}, None), ({"query": 5}, None)],
    "call_tool": [
        ({"name": "system_echo", "arguments": {"a": 1}}, None),
        ({"name": "acme_greet", "arguments": {}}, None),
        ({"name": "acme_refuse", "arguments": {}}, None),
        ({"name": "ledger_wipe", "arguments": {}}, None),  # exists, not exposed here
        ({"name": "ghost_tool"}, None),
    ],
}
UNKNOWN = "ghost_tool"  # called directly on every list-mode instance: a protocol error
# Every kind of error the calls above must have met (so none of them went untested).
KINDS = {
    "InvalidInput",
    "NotFound",
    "Internal",
    "DeadlineExceeded",
    "PermissionDenied",
    "IdempotencyConflict",
    "UnsupportedOperation",
}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """The running sidecar's config and each bridge's URL."""
    with http_upstream(tmp_path) as (upstream, _):
        extra = (
            f'[[credential]]\nname = "{TOKEN}"\nhosts = ["{origin(upstream)}"]\n'
            + http_table(upstream)
            + BRIDGES
        )
        config = tmp_path / "soma.toml"
        config.write_text('[soma]\nstate_dir = "state"\nruntime_dir = "run"\n' + extra)
        set_secret(config, TOKEN, SECRET)
        set_secret(config, "crm", "s3cret-crm-value")
        proc, _ = start_sidecar(tmp_path, ORGANS, extra)
        try:
            names = ["builtin", "organs", "upstream", "search"]
            published = [url_file(tmp_path / "run", name) for name in names]
            wait_until(lambda: all(p.exists() for p in published), what="the bridge URL files")
            yield config, {n: p.read_text().strip() for n, p in zip(names, published, strict=True)}
        finally:
            assert proc.stop() == 0, proc.output()


def function_of(tool: types.Tool) -> str:
    return str((tool.meta or {}).get(META + "function", tool.name))


Planned = list[tuple[str, dict[str, Any], dict[str, Any] | None]]  # tool, arguments, _meta


def plan(tools: list[types.Tool]) -> Planned:
    """The calls of each listed tool in the order of CALLS, then an unknown tool (on a
    list-mode instance)."""
    by_function = {function_of(tool): tool for tool in tools}
    missing = set(by_function) - set(CALLS)
    assert not missing, f"no calls for {sorted(missing)}: add rows to CALLS"
    calls: Planned = []
    for function, rows in CALLS.items():
        tool = by_function.get(function)
        if tool is None:
            continue
        if tool.input_schema.get("required"):
            calls.append((tool.name, {}, None))
        calls += [(tool.name, arguments, meta) for arguments, meta in rows]
    if "call_tool" not in by_function:
        calls.append((UNKNOWN, {}, None))
    return calls


def check_error_text(where: str, result: dict[str, Any], problems: list[str]) -> str | None:
    """The error kind of an `isError` result, which the model must be able to read in the
    text content; None for a success."""
    if not result.get("isError"):
        return None
    try:
        payload = json.loads(result["content"][0]["text"])
        kind = payload["error"]
    except (KeyError, IndexError, TypeError, ValueError):
        problems.append(f"{where}: the error is not in the text content: {result}")
        return None
    if (result.get("_meta") or {}).get(ERROR) != payload:
        problems.append(f"{where}: _meta does not carry the error payload")
    return str(kind)


async def python_run(
    url: str, key: str, mode: str, problems: list[str], kinds: set[str]
) -> tuple[list[str], Planned]:
    """Every planned call through the official Python client: the functions listed, and the
    plan (for the next client)."""
    async with client(url, key, mode) as c:
        tools = (await c.list_tools()).tools
        calls = plan(tools)
        for name, arguments, meta in calls:
            where = f"python {mode} {url} {name}({json.dumps(arguments)})"
            try:
                result = await c.call_tool(name, arguments, meta=meta)  # type: ignore[arg-type]
            except MCPError as exc:
                if not (name == UNKNOWN and exc.code == types.INVALID_PARAMS):
                    problems.append(f"{where}: {exc.code} {exc}")
                continue
            except RuntimeError as exc:  # the client's output schema validation
                problems.append(f"{where}: {exc}")
                continue
            if result.structured_content is not None:
                # The client checks only successes itself; whatever carries structured
                # content must match the outputSchema (MCP), an error too.
                try:
                    await c.session.validate_tool_result(name, result)
                except RuntimeError as exc:
                    problems.append(f"{where}: {exc}")
            dumped = result.model_dump(mode="json", by_alias=True, exclude_none=True)
            kinds.add(check_error_text(where, dumped, problems) or "ok")
    return [function_of(tool) for tool in tools], calls


def typescript_run(
    script: Path, url: str, key: str, calls: Planned, problems: list[str], kinds: set[str]
) -> None:
    """The same calls through the TypeScript SDK, which validates every result that carries
    structured content against the tool's outputSchema, errors included."""
    run = subprocess.run(
        ["node", str(script)],
        input=json.dumps(
            {"url": url, "calls": [{"name": n, "arguments": a, "meta": m} for n, a, m in calls]}
        ),
        env=child_env(SOMA_BRIDGE_KEY=key),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    outcomes = json.loads(run.stdout)["outcomes"]
    for (name, arguments, _), outcome in zip(calls, outcomes, strict=True):
        where = f"typescript {url} {name}({json.dumps(arguments)})"
        if "error" in outcome:
            error = outcome["error"]
            if not (name == UNKNOWN and error["code"] == types.INVALID_PARAMS):
                problems.append(f"{where}: {error['code']} {error['message']}")
            continue
        kinds.add(check_error_text(where, outcome["result"], problems) or "ok")


@pytest.mark.timeout(180)  # four instances, three clients, dozens of calls each
async def test_every_result_of_every_bridge_is_valid_for_the_python_and_typescript_clients(
    deployment: tuple[Path, dict[str, str]], npm_clients: Path
) -> None:
    config, urls = deployment
    problems: list[str] = []
    kinds: set[str] = set()
    listed: set[str] = set()
    for bridge, url in urls.items():
        _, key = KeyStore(config.parent / "state").create(bridge)
        for mode in ["auto", "legacy"]:  # 2026-07-28 and the initialize handshake
            functions, calls = await python_run(url, key, mode, problems, kinds)
            listed |= set(functions)
        typescript_run(npm_clients / "results.mjs", url, key, calls, problems, kinds)
    assert problems == [], "\n".join(problems)
    assert listed == set(CALLS), "CALLS has rows for tools no bridge lists"
    assert KINDS | {"ok"} <= kinds
