"""Cancellation from 2025-era clients over stateless Streamable HTTP: their
`notifications/cancelled` comes as a POST of its own and must stop the organ call it names,
only for the caller that made it. Real uvicorn, the real guard and executive, a tool that runs
until it is released or cancelled (Keyring's `hang`, whose deadline is 1000 s), and real
clients: raw HTTP, the official Python client in legacy mode, the TypeScript SDK."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx2
import pytest
import structlog.testing
from mcp import Client

from sidecar.bridge.keys import KeyStore
from tests.fixtures.organs import Keyring
from tests.helpers import child_env
from tests.test_bridge import bridge_config, client, running
from tests.test_bridge_clients import mcp_remote

BRIDGE = '[[bridge]]\nname = "one"\nexpose = ["keyring.hang"]\n'
HANDSHAKE_ERA = "2025-11-25"
REQUEST_CANCELLED = -32800  # what the SDK answers a cancelled request in that era


def headers(key: str) -> dict[str, str]:
    return {
        "x-api-key": key,
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": HANDSHAKE_ERA,
    }


def hang(request_id: int) -> dict[str, Any]:
    params = {"name": "keyring_hang", "arguments": {}}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


def cancel(request_id: int | str) -> dict[str, Any]:
    params = {"requestId": request_id, "reason": "the user stopped it"}
    return {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params}


def answer(reply: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC answer in a tools/call's server-sent events."""
    (data,) = [line[5:] for line in reply.text.splitlines() if line.startswith("data:")]
    message = json.loads(data)
    assert isinstance(message, dict)
    return message


async def test_a_cancel_stops_only_the_callers_own_call(tmp_path: Path) -> None:
    config = bridge_config(tmp_path, BRIDGE)
    store = KeyStore(config.state_dir)
    _, alice = store.create("one")
    _, mallory = store.create("one")  # another principal of the same instance
    keyring = Keyring()
    with structlog.testing.capture_logs() as logs:
        async with running(config, [keyring]) as bridges, httpx2.AsyncClient() as http:
            url = bridges["one"].url
            call = asyncio.create_task(http.post(url, json=hang(7), headers=headers(alice)))
            await asyncio.wait_for(keyring.started.wait(), 10)
            # Request ids are the client's choice: another caller naming 7, and the caller
            # naming another id, cancel nothing.
            for key, request_id in [(mallory, 7), (mallory, "7"), (alice, 8)]:
                sent = await http.post(url, json=cancel(request_id), headers=headers(key))
                assert sent.status_code == 202
            keyring.released.set()
            released = answer(await asyncio.wait_for(call, 10))
            assert released["result"]["isError"] is False
            assert not keyring.cancelled.is_set()

            keyring.started.clear()
            keyring.released.clear()
            call = asyncio.create_task(http.post(url, json=hang(7), headers=headers(alice)))
            await asyncio.wait_for(keyring.started.wait(), 10)
            sent = await http.post(url, json=cancel("7"), headers=headers(alice))  # 7 or "7"
            assert sent.status_code == 202
            # The organ stops (it would hang for 1000 s otherwise); the client that is still
            # reading gets the SDK's answer to a cancelled request.
            await asyncio.wait_for(keyring.cancelled.wait(), 10)
            cancelled = answer(await asyncio.wait_for(call, 10))
            assert cancelled["error"]["code"] == REQUEST_CANCELLED
    outcomes = [e["outcome"] for e in logs if e["event"] == "bridge_call"]
    assert outcomes == ["ok", "Cancelled"]


async def test_two_calls_under_one_id_of_one_caller_are_not_guessed_between(
    tmp_path: Path,
) -> None:
    """Two clients sharing a key may both have a request 3 in flight: a cancel of 3 cannot
    say which one it meant, so it cancels neither rather than perhaps the wrong one."""
    config = bridge_config(tmp_path, BRIDGE)
    _, key = KeyStore(config.state_dir).create("one")
    keyring = Keyring()
    async with running(config, [keyring]) as bridges, httpx2.AsyncClient() as http:
        url = bridges["one"].url
        calls = []
        for _ in range(2):
            keyring.started.clear()
            calls.append(asyncio.create_task(http.post(url, json=hang(3), headers=headers(key))))
            await asyncio.wait_for(keyring.started.wait(), 10)
        assert (await http.post(url, json=cancel(3), headers=headers(key))).status_code == 202
        keyring.released.set()
        for call in calls:
            assert answer(await asyncio.wait_for(call, 10))["result"]["isError"] is False
        assert not keyring.cancelled.is_set()


async def test_the_python_client_in_legacy_mode_cancels(tmp_path: Path) -> None:
    """The Python client posts the cancel, and later (5 s) drops the request's stream too:
    either stops the call, the first at once."""
    config = bridge_config(tmp_path, BRIDGE)
    _, key = KeyStore(config.state_dir).create("one")
    keyring = Keyring()
    async with (
        running(config, [keyring]) as bridges,
        client(bridges["one"].url, key, "legacy") as c,
    ):
        call = asyncio.create_task(c.call_tool("keyring_hang", {}))
        await asyncio.wait_for(keyring.started.wait(), 10)
        call.cancel()  # the client posts notifications/cancelled
        await asyncio.wait_for(keyring.cancelled.wait(), 10)
        with pytest.raises(asyncio.CancelledError):
            await call
        # The session goes on.
        keyring.started.clear()
        keyring.released.set()
        assert (await c.call_tool("keyring_hang", {})).is_error is False


async def test_the_typescript_sdk_cancels(tmp_path: Path, npm_clients: Path) -> None:
    config = bridge_config(tmp_path, BRIDGE)
    _, key = KeyStore(config.state_dir).create("one")
    keyring = Keyring()
    async with running(config, [keyring]) as bridges:
        node = await asyncio.create_subprocess_exec(
            "node",
            str(npm_clients / "cancel.mjs"),
            bridges["one"].url,
            "keyring_hang",
            "{}",
            env=child_env(SOMA_BRIDGE_KEY=key),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await asyncio.wait_for(keyring.started.wait(), 30)
            assert node.stdin is not None and node.stdout is not None
            node.stdin.write(b"cancel\n")
            await node.stdin.drain()
            # The client still holds its connection: only its notification can stop the call.
            await asyncio.wait_for(keyring.cancelled.wait(), 10)
            outcome = json.loads(await asyncio.wait_for(node.stdout.readline(), 10))
            _, err = await asyncio.wait_for(node.communicate(b"close\n"), 30)
        finally:
            if node.returncode is None:
                node.kill()
                await node.wait()
        assert node.returncode == 0, err.decode()
        assert outcome == {"error": "MCP error -32001: cancelled by the test"}


async def test_a_cancel_through_mcp_remote(tmp_path: Path, npm_clients: Path) -> None:
    """A host on stdio cancels through mcp-remote (the TypeScript SDK v2 in the handshake
    era), which posts the cancel and keeps its connection."""
    config = bridge_config(tmp_path, BRIDGE)
    _, key = KeyStore(config.state_dir).create("one")
    keyring = Keyring()
    async with running(config, [keyring]) as bridges:
        params = mcp_remote(npm_clients, bridges["one"].url, key, tmp_path)
        async with Client(params, mode="legacy") as c:  # type: ignore[arg-type]
            call = asyncio.create_task(c.call_tool("keyring_hang", {}))
            await asyncio.wait_for(keyring.started.wait(), 30)
            call.cancel()  # notifications/cancelled to mcp-remote, and on to the bridge
            await asyncio.wait_for(keyring.cancelled.wait(), 10)
            with pytest.raises(asyncio.CancelledError):
                await call
