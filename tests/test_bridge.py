"""The MCP bridge over real Streamable HTTP: real uvicorn servers on 127.0.0.1 port 0, a real
Executive with real organs, and the official `mcp` Python client in both protocol eras."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import mcp.types as types
import pytest
import structlog.testing
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from sidecar.bridge.calls import ERROR
from sidecar.bridge.instance import RunningBridge, serve_bridges
from sidecar.bridge.keys import KeyStore
from sidecar.bridge.names import function_name, tool_name
from sidecar.bridge.tools import IDEMPOTENCY_KEY, META, to_tool
from sidecar.credentials import CredentialBroker
from sidecar.organs.system import SystemOrgan
from sidecar.vault.async_vault import AsyncVault
from sidecar.vault.open import open_vault
from soma_runtime import Executive
from soma_runtime.card_files import functions_of, load_cards
from soma_runtime.config import ConfigError, SomaConfig, load_config, parse_config
from tests.fixtures.organs import Acme, Keyring, Ledger, Shifting
from tests.helpers import set_secret

MODES = ["auto", "legacy"]  # 2026-07-28 (server/discover) and 2025-11-25 (initialize)


def bridge_config(tmp_path: Path, bridges: str) -> SomaConfig:
    import tomllib

    data = tomllib.loads(f'[soma]\nstate_dir = "{tmp_path / "state"}"\n' + bridges)
    return parse_config(data, source=tmp_path / "soma.toml")


@contextlib.asynccontextmanager
async def running(config: SomaConfig, organs: list[Any]) -> AsyncIterator[dict[str, RunningBridge]]:
    executive = Executive(organs)
    vault = AsyncVault(lambda: open_vault(config, durable=False))
    broker = CredentialBroker(config.credential, vault)
    try:
        async with serve_bridges(config, executive, broker) as bridges:
            yield {b.name: b for b in bridges}
    finally:
        await vault.close()


@contextlib.asynccontextmanager
async def client(url: str, key: str, mode: str = "auto") -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx2.AsyncClient(headers=headers) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as c,  # type: ignore[arg-type]
    ):
        yield c


def error_of(result: types.CallToolResult) -> dict[str, Any]:
    """The error payload of a failed call, as the model reads it (the text content) and as a
    program does (`_meta`); never as structuredContent, which must match the tool's
    outputSchema."""
    assert result.is_error and result.structured_content is None
    assert isinstance(result.content[0], types.TextContent)
    payload = json.loads(result.content[0].text)
    assert result.meta is not None and result.meta[ERROR] == payload
    assert isinstance(payload, dict) and isinstance(payload["error"], str)
    return payload


TWO = """
[[bridge]]
name = "one"
expose = ["system.*", "ledger.append"]
[[bridge]]
name = "two"
expose = ["ledger.*"]
tool_names = "dotted"
"""


@pytest.mark.parametrize("mode", MODES)
async def test_list_and_call_in_both_protocol_eras(tmp_path: Path, mode: str) -> None:
    config = bridge_config(tmp_path, TWO)
    _, key = KeyStore(config.state_dir).create("one")
    async with (
        running(config, [SystemOrgan(), Ledger()]) as bridges,
        client(bridges["one"].url, key, mode) as c,
    ):
        listed = await c.list_tools()
        names = [t.name for t in listed.tools]
        assert names == ["ledger_append", "system_echo", "system_ping"]  # sorted
        echo = next(t for t in listed.tools if t.name == "system_echo")
        assert echo.title == "system.echo"
        assert "Examples:\n- " in (echo.description or "")
        assert echo.input_schema == {
            "type": "object",
            "description": "Any JSON object; it is returned as is.",
        }
        assert echo.meta is not None and echo.meta[META + "slo"]["p95_latency_ms"] == 5
        assert "read" in echo.meta[META + "tags"]
        result = await c.call_tool("system_echo", {"a": [1, "x"]})
        assert not result.is_error
        assert result.structured_content == {"a": [1, "x"]}
        assert isinstance(result.content[0], types.TextContent)
        assert json.loads(result.content[0].text) == {"a": [1, "x"]}


async def test_instances_expose_only_their_own_tools(tmp_path: Path) -> None:
    config = bridge_config(tmp_path, TWO)
    store = KeyStore(config.state_dir)
    _, key_one = store.create("one")
    _, key_two = store.create("two")
    ledger = Ledger()
    async with running(config, [SystemOrgan(), ledger]) as bridges:
        assert bridges["one"].port != bridges["two"].port
        async with client(bridges["two"].url, key_two) as c:
            names = [t.name for t in (await c.list_tools()).tools]
            assert names == ["ledger.append", "ledger.fetch_all", "ledger.wipe"]
            # Not exposed here, under any spelling: unknown, exactly like a missing tool.
            for name in ["system.echo", "system_echo", "system.echo\n", "SYSTEM.ECHO", "nope.x"]:
                with pytest.raises(MCPError) as caught:
                    await c.call_tool(name, {})
                assert caught.value.code == types.INVALID_PARAMS
            # server/discover names the instance, never another instance's tools.
            assert c.protocol_version == "2026-07-28"
            assert c.server_info is not None and c.server_info.name == "soma-two"
            assert "system" not in c.server_info.model_dump_json()
            resources = [r.uri for r in (await c.list_resources()).resources]
            assert resources == [
                f"soma://cards/ledger.{f}" for f in ["append", "fetch_all", "wipe"]
            ]
            card = await c.read_resource("soma://cards/ledger.wipe")
            assert json.loads(card.contents[0].text)["name"] == "ledger.wipe"  # type: ignore[union-attr]
            with pytest.raises(MCPError):
                await c.read_resource("soma://cards/system.echo")
        async with client(bridges["one"].url, key_one) as c:
            for name in ["ledger_wipe", "ledger.wipe", "ledger.append", "ledger_append\n"]:
                with pytest.raises(MCPError):
                    await c.call_tool(name, {})
            with pytest.raises(MCPError):
                await c.read_resource("soma://cards/ledger.wipe")
        # A key of one instance does not open another.
        async with httpx2.AsyncClient() as http:
            reply = await http.post(bridges["two"].url, headers={"x-api-key": key_one}, json={})
            assert reply.status_code == 401
    assert ledger.appended == 0


async def test_annotations_come_from_the_cards(tmp_path: Path) -> None:
    config = bridge_config(tmp_path, TWO)
    _, key = KeyStore(config.state_dir).create("two")
    async with (
        running(config, [SystemOrgan(), Ledger()]) as bridges,
        client(bridges["two"].url, key) as c,
    ):
        tools = {t.name: t.annotations for t in (await c.list_tools()).tools}
    append, wipe, fetch = tools["ledger.append"], tools["ledger.wipe"], tools["ledger.fetch_all"]
    assert append is not None and wipe is not None and fetch is not None
    assert (append.read_only_hint, append.destructive_hint, append.idempotent_hint) == (
        False,
        False,
        False,
    )
    assert append.open_world_hint is False
    assert (wipe.read_only_hint, wipe.destructive_hint, wipe.idempotent_hint) == (False, True, True)
    assert fetch.open_world_hint is True


def test_built_in_cards_say_what_they_destroy() -> None:
    # The exported cards are checked against the code for drift, so they are the organs' cards.
    cards = {c.name: c for _, c in functions_of(load_cards(Path(__file__).parent.parent / "cards"))}
    delete = to_tool("vault_delete", cards["vault.delete"]).annotations
    retrieve = to_tool("vault_retrieve", cards["vault.retrieve"]).annotations
    assert delete is not None and retrieve is not None
    assert delete.destructive_hint is True and delete.read_only_hint is False
    assert retrieve.read_only_hint is True and retrieve.open_world_hint is False


def test_safe_names_are_reversible_and_canonical() -> None:
    for fn in ["vault.retrieve", "my_organ.do_it", "a_.b", "a.b_c", "a_b.c", "a__b.c_-d"]:
        name = tool_name(fn, "safe")
        assert name is not None and function_name(name, "safe") == fn
    assert tool_name("o." + "x" * 70, "safe") is None  # over 64 characters: not exposable
    for other in ["vault.retrieve", "vault_retrieve\n", "Vault_retrieve", "vault_retrieve_", ""]:
        assert function_name(other, "safe") is None


async def test_idempotency_key_replays_the_first_result(tmp_path: Path) -> None:
    config = bridge_config(tmp_path, TWO)
    _, key = KeyStore(config.state_dir).create("two")
    ledger = Ledger()
    async with running(config, [ledger]) as bridges, client(bridges["two"].url, key) as c:
        meta = {IDEMPOTENCY_KEY: "order-17"}
        first = await c.call_tool("ledger.append", {"n": 1}, meta=meta)
        again = await c.call_tool("ledger.append", {"n": 1}, meta=meta)
        assert first.structured_content == again.structured_content == {"count": 1}
        assert ledger.appended == 1
        other = await c.call_tool("ledger.append", {"n": 2}, meta=meta)
        assert error_of(other)["error"] == "IdempotencyConflict"
        fresh = await c.call_tool("ledger.append", {"n": 1}, meta={IDEMPOTENCY_KEY: "o-18"})
        assert fresh.structured_content == {"count": 2}
        await c.call_tool("ledger.append", {"n": 1})  # no key: runs every time
        assert ledger.appended == 3


async def test_invalid_input_is_a_tool_error(tmp_path: Path) -> None:
    config = bridge_config(tmp_path, TWO)
    _, key = KeyStore(config.state_dir).create("two")
    async with running(config, [Ledger()]) as bridges, client(bridges["two"].url, key) as c:
        result = await c.call_tool("ledger.append", {"n": "one"})
        assert error_of(result) == {
            "error": "InvalidInput",
            "path": "$.n",
            "message": 'must be of type "integer"',
        }


async def test_an_output_that_breaks_the_card_is_an_error_not_a_bad_result(
    tmp_path: Path,
) -> None:
    """A client checks structured results against the listed outputSchema (the TypeScript
    SDK answers its own -32602 for the whole call): the bridge checks first and says what
    went wrong, without the value."""
    config = bridge_config(tmp_path, '[[bridge]]\nname = "one"\nexpose = ["acme.*"]\n')
    _, key = KeyStore(config.state_dir).create("one")
    async with running(config, [Acme()]) as bridges, client(bridges["one"].url, key) as c:
        broken = await c.call_tool("acme_broken__promise", {})
        assert error_of(broken) == {
            "error": "Internal",
            "op": "acme.broken_promise",
            "path": "$.total",
            "message": "the output does not match the function's output schema",
        }
        assert "many" not in broken.content[0].text  # type: ignore[union-attr]
        assert not (await c.call_tool("acme_greet", {"name": "Ada"})).is_error


async def test_credentials_are_injected_only_where_the_bridge_allows(tmp_path: Path) -> None:
    path = tmp_path / "soma.toml"
    path.write_text(
        f'[soma]\nstate_dir = "{tmp_path / "state"}"\n'
        '[[credential]]\nname = "crm"\nhosts = ["api.crm.example"]\n'
        '[[bridge]]\nname = "crm"\nexpose = ["keyring.*"]\ncredentials = ["crm"]\n'
        '[[bridge]]\nname = "plain"\nexpose = ["keyring.*"]\n'
    )
    set_secret(path, "crm", "s3cret-crm-value")
    config = load_config(path)
    store = KeyStore(config.state_dir)
    _, crm_key = store.create("crm")
    _, plain_key = store.create("plain")
    async with running(config, [Keyring()]) as bridges:
        async with client(bridges["crm"].url, crm_key) as c:
            result = await c.call_tool("keyring_whoami", {})
            assert result.structured_content == {"credential": "crm", "to_crm": True}
            assert "s3cret" not in result.model_dump_json()
        async with client(bridges["plain"].url, plain_key) as c:
            denied = await c.call_tool("keyring_whoami", {})
            assert error_of(denied)["error"] == "PermissionDenied"


async def test_deadline_cancels_the_organ_and_one_audit_event_per_call(tmp_path: Path) -> None:
    config = bridge_config(tmp_path, '[[bridge]]\nname = "one"\nexpose = ["keyring.slow"]\n')
    _, key = KeyStore(config.state_dir).create("one")
    keyring = Keyring()
    with structlog.testing.capture_logs() as logs:
        async with running(config, [keyring]) as bridges, client(bridges["one"].url, key) as c:
            result = await c.call_tool("keyring_slow", {})
    assert error_of(result)["error"] == "DeadlineExceeded"
    assert keyring.cancelled.is_set()  # the organ's call was cancelled, not left running
    calls = [e for e in logs if e["event"] == "bridge_call"]
    assert len(calls) == 1
    (event,) = calls
    assert event["bridge"] == "one" and event["op"] == "keyring.slow"
    assert event["outcome"] == "DeadlineExceeded" and event["principal"].startswith("key:")
    assert key not in json.dumps(logs, default=str)


async def test_search_discovery_lists_two_tools_and_reaches_only_exposed_ones(
    tmp_path: Path,
) -> None:
    config = bridge_config(
        tmp_path,
        '[[bridge]]\nname = "big"\nexpose = ["system.*", "ledger.append"]\ndiscovery = "search"\n',
    )
    _, key = KeyStore(config.state_dir).create("big")
    ledger = Ledger()
    async with (
        running(config, [SystemOrgan(), ledger]) as bridges,
        client(bridges["big"].url, key) as c,
    ):
        assert [t.name for t in (await c.list_tools()).tools] == ["search_tools", "call_tool"]
        found = await c.call_tool("search_tools", {"query": "echo"})
        assert found.structured_content is not None
        (echo,) = found.structured_content["tools"]
        assert echo["name"] == "system_echo" and echo["annotations"]["readOnlyHint"] is True
        assert "inputSchema" in echo
        # The executive's search sees ledger.wipe, but this instance does not expose it.
        wiped = await c.call_tool("search_tools", {"query": "ledger"})
        assert wiped.structured_content is not None
        assert [t["name"] for t in wiped.structured_content["tools"]] == ["ledger_append"]
        echoed = await c.call_tool("call_tool", {"name": "system_echo", "arguments": {"x": 1}})
        assert echoed.structured_content == {"x": 1}
        meta = {IDEMPOTENCY_KEY: "k1"}
        args = {"name": "ledger_append", "arguments": {"n": 1}}
        await c.call_tool("call_tool", args, meta=meta)
        await c.call_tool("call_tool", args, meta=meta)
        assert ledger.appended == 1
        # A function the instance hides, other spellings, and one that exists nowhere: the
        # same tool error naming what was asked, byte for byte, so the model can search again
        # and nothing tells a hidden function from a missing one.
        answers = set()
        for bad in ["ledger_wipe", "ledger.wipe", "system.echo", "ghost_tool"]:
            unknown = await c.call_tool("call_tool", {"name": bad, "arguments": {}})
            assert error_of(unknown) == {
                "error": "UnsupportedOperation",
                "tool": bad,
                "message": "no such tool here: find tools with search_tools",
            }
            answers.add(unknown.model_dump_json(by_alias=True).replace(bad, "NAME"))
        assert len(answers) == 1
        with pytest.raises(MCPError):
            await c.call_tool("system_echo", {})  # only the two tools are callable directly
        malformed = await c.call_tool("call_tool", {"arguments": {}})
        assert error_of(malformed)["error"] == "InvalidInput"
    assert ledger.appended == 1


async def test_bad_bridge_settings_are_config_errors(tmp_path: Path) -> None:
    config = bridge_config(
        tmp_path, '[[bridge]]\nname = "one"\nexpose = ["system.*"]\ncredentials = ["crm"]\n'
    )
    with pytest.raises(ConfigError, match="credential 'crm' is not configured"):
        async with running(config, [SystemOrgan()]):
            pass
    busy = bridge_config(tmp_path, '[[bridge]]\nname = "one"\n[[bridge]]\nname = "two"\n')
    async with running(busy, [SystemOrgan()]) as bridges:
        port = bridges["one"].port
        taken = bridge_config(tmp_path, f'[[bridge]]\nname = "x"\nlisten = "127.0.0.1:{port}"\n')
        with pytest.raises(ConfigError, match="cannot listen on"):
            async with running(taken, [SystemOrgan()]):
                pass
    with pytest.raises(ConfigError, match="used twice"):
        bridge_config(tmp_path, '[[bridge]]\nname = "a"\n[[bridge]]\nname = "a"\n')
    with pytest.raises(ConfigError, match="no open bridges"):
        bridge_config(tmp_path, '[[bridge]]\nname = "a"\n[bridge.auth]\napi_keys = false\n')


async def test_a_client_that_disconnects_cancels_the_organ_call(tmp_path: Path) -> None:
    config = bridge_config(tmp_path, '[[bridge]]\nname = "one"\nexpose = ["keyring.hang"]\n')
    _, key = KeyStore(config.state_dir).create("one")
    keyring = Keyring()
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "keyring_hang", "arguments": {}},
    }
    headers = {
        "x-api-key": key,
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2025-11-25",
    }
    async with running(config, [keyring]) as bridges, httpx2.AsyncClient() as http:
        request = asyncio.create_task(http.post(bridges["one"].url, json=call, headers=headers))
        await asyncio.wait_for(keyring.started.wait(), 10)
        request.cancel()  # the client goes away: its connection closes
        await asyncio.wait_for(keyring.cancelled.wait(), 5)


async def test_a_change_of_functions_reaches_listening_clients(tmp_path: Path) -> None:
    """An organ's functions change (an upstream's tools): a 2026-07-28 client listening for
    tools list-changed events hears it, and its next list shows the change."""
    config = bridge_config(tmp_path, '[[bridge]]\nname = "one"\nexpose = ["shifting.*"]\n')
    _, key = KeyStore(config.state_dir).create("one")
    organ = Shifting()
    executive = Executive([organ])
    vault = AsyncVault(lambda: open_vault(config, durable=False))
    try:
        async with (
            serve_bridges(config, executive, CredentialBroker([], vault)) as bridges,
            client(bridges[0].url, key) as c,
        ):
            assert [t.name for t in (await c.list_tools()).tools] == ["shifting_a"]
            async with c.listen(tools_list_changed=True) as events:
                organ.names.append("shifting.b")
                executive.refresh("shifting")
                await asyncio.wait_for(anext(aiter(events)), 10)
            assert [t.name for t in (await c.list_tools()).tools] == ["shifting_a", "shifting_b"]
    finally:
        await vault.close()
