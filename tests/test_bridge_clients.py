"""The bridge as real MCP clients reach it: API keys made with the `soma` CLI against a running
`soma sidecar`, `soma mcp stdio` spawned by the official Python client (across sidecar
restarts too), the `make run` launcher, and the TypeScript SDK from npm over Streamable HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from sidecar.bridge.published import url_file
from sidecar.bridge.tools import IDEMPOTENCY_KEY
from tests.fixtures.waiter import STARTED
from tests.helpers import (
    REPO,
    SOMA,
    Process,
    SupervisorRun,
    child_env,
    pid_alive,
    run_soma,
    start_sidecar,
    wait_until,
)

BRIDGE = """
[[bridge]]
name = "desk"
expose = ["system.*"]
"""


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A running `soma sidecar` serving bridge `desk`: its config file and the bridge's URL."""
    proc, _ = start_sidecar(tmp_path, ["system"], extra=BRIDGE)
    published = url_file(tmp_path / "run", "desk")
    try:
        wait_until(published.exists, what="the bridge URL file")
        yield tmp_path / "soma.toml", published.read_text().strip()
    finally:
        assert proc.stop() == 0, proc.output()
    assert not published.exists()  # withdrawn when the instance stops


def create_key(config: Path, *extra: str, bridge: str = "desk") -> str:
    result = run_soma(
        "bridge", "keys", "create", "--bridge", bridge, "--config", str(config), *extra
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("soma_") and "shown once" in result.stderr
    return key


@contextlib.asynccontextmanager
async def http_client(url: str, key: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as http,
        Client(streamable_http_client(url, http_client=http)) as client,  # type: ignore[arg-type]
    ):
        yield client


def refused(url: str, key: str) -> bool:
    """Whether the instance answers 401 to `key` (a raw request: no client state involved)."""
    reply = httpx2.post(
        url,
        headers={"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"},
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
    )
    return reply.status_code == 401


async def test_keys_cli_create_list_revoke_on_a_running_sidecar(sidecar: tuple[Path, str]) -> None:
    config, url = sidecar
    key = create_key(config, "--label", "laptop", "--expires", "30")
    async with http_client(url, key) as client:
        listed = await client.list_tools()
    assert [t.name for t in listed.tools] == ["system_echo", "system_ping"]

    listing = run_soma("bridge", "keys", "list", "--bridge", "desk", "--config", str(config))
    assert listing.returncode == 0, listing.stderr
    key_id = key.split("_")[1]
    (row,) = [line for line in listing.stdout.splitlines() if line.startswith(key_id)]
    assert row.split()[1:3] == ["desk", "laptop"] and row.endswith("valid")
    assert key.split("_")[2] not in listing.stdout  # never the secret

    revoked = run_soma("bridge", "keys", "revoke", key_id, "--config", str(config))
    assert revoked.returncode == 0, revoked.stderr
    # Takes effect on the running sidecar within a second.
    wait_until(lambda: refused(url, key), timeout=1.0, what="the revoked key to be refused")
    again = run_soma("bridge", "keys", "revoke", key_id, "--config", str(config))
    assert again.returncode == 1 and "no valid key" in again.stderr
    listing = run_soma("bridge", "keys", "list", "--json", "--config", str(config))
    assert '"status": "revoked"' in listing.stdout


def test_keys_cli_refuses_an_unknown_bridge(tmp_path: Path) -> None:
    config = tmp_path / "soma.toml"
    config.write_text('[soma]\nstate_dir = "state"\n' + BRIDGE)
    result = run_soma("bridge", "keys", "create", "--bridge", "nope", "--config", str(config))
    assert result.returncode == 2
    assert "no [[bridge]] named 'nope' (configured: desk)" in result.stderr
    result = run_soma(
        "bridge", "keys", "create", "--bridge", "desk", "--expires", "-1", "--config", str(config)
    )
    assert result.returncode == 2 and "--expires" in result.stderr


def stdio_params(config: Path, key: str | None, bridge: str = "desk") -> StdioServerParameters:
    env = child_env()
    env.pop("SOMA_BRIDGE_KEY", None)
    if key is not None:
        env["SOMA_BRIDGE_KEY"] = key
    return StdioServerParameters(
        command=SOMA, args=["mcp", "stdio", "--bridge", bridge, "--config", str(config)], env=env
    )


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_stdio_lists_and_calls_echo(sidecar: tuple[Path, str], mode: str) -> None:
    config, _ = sidecar
    key = create_key(config)
    async with Client(stdio_params(config, key), mode=mode) as client:  # type: ignore[arg-type]
        listed = await client.list_tools()
        assert [t.name for t in listed.tools] == ["system_echo", "system_ping"]
        result = await client.call_tool("system_echo", {"text": "hello"})
        assert not result.is_error and result.structured_content == {"text": "hello"}
        # Only the instance's own tools, whatever is asked through the relay.
        with pytest.raises(Exception, match="unknown tool"):
            await client.call_tool("vault_list", {})
        resources = await client.list_resources()
        assert [str(r.uri) for r in resources.resources] == [
            "soma://cards/system.echo",
            "soma://cards/system.ping",
        ]


def run_stdio(
    config: Path, key: str | None, bridge: str = "desk"
) -> subprocess.CompletedProcess[str]:
    params = stdio_params(config, key, bridge)
    return subprocess.run(
        [params.command, *params.args],
        env=params.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_stdio_refuses_a_missing_or_wrong_key(sidecar: tuple[Path, str]) -> None:
    config, _ = sidecar
    missing = run_stdio(config, None)
    assert missing.returncode == 2 and "SOMA_BRIDGE_KEY is not set" in missing.stderr
    unknown = run_stdio(config, create_key(config), bridge="elsewhere")
    assert unknown.returncode == 2 and "no [[bridge]] named 'elsewhere'" in unknown.stderr
    wrong = "soma_" + "0" * 16 + "_" + "1" * 64
    result = run_stdio(config, wrong)
    assert result.returncode == 1, result.stderr
    assert "bridge 'desk' refused SOMA_BRIDGE_KEY" in result.stderr
    assert wrong not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_stdio_without_a_sidecar(tmp_path: Path) -> None:
    config = tmp_path / "soma.toml"
    config.write_text('[soma]\nstate_dir = "state"\nruntime_dir = "run"\n' + BRIDGE)
    key = create_key(config)
    result = run_stdio(config, key)
    assert result.returncode == 1
    assert "no sidecar serves bridge 'desk'" in result.stderr
    # A URL left behind by a sidecar that was killed: nothing answers there.
    published = url_file(tmp_path / "run", "desk")
    published.parent.mkdir(parents=True, mode=0o700)
    published.write_text("http://127.0.0.1:9/mcp\n")
    result = run_stdio(config, key)
    assert result.returncode == 1 and "no sidecar answers for bridge 'desk'" in result.stderr


def logged(output: str, event: str) -> list[dict[str, Any]]:
    """The JSON events named `event` in a supervisor's log (its own and its sidecar's)."""
    lines = (json.loads(line) for line in output.splitlines() if line.startswith("{"))
    return [record for record in lines if record.get("event") == event]


def kill_sidecar(output: Callable[[], str]) -> int:
    """SIGKILL the sidecar of the supervisor whose log `output` reads, and wait until it is
    gone (its connections closed by the kernel); how many times bridges had served before."""
    output_now = output()
    started = [
        e
        for e in logged(output_now, "started")
        if e["component"] == "supervisor" and e["child"] == "sidecar"
    ]
    os.kill(started[-1]["pid"], signal.SIGKILL)
    wait_until(lambda: not pid_alive(started[-1]["pid"]), what="the sidecar to die")
    return len(logged(output_now, "bridge_serving"))


def wait_served(output: Callable[[], str], served: int) -> None:
    """Until a bridge serves again after the `served` times counted by `kill_sidecar`."""
    wait_until(
        lambda: len(logged(output(), "bridge_serving")) > served,
        timeout=30,
        what="the restarted sidecar's bridge to serve",
    )


async def echoes(client: Client, n: int) -> bool:
    result = await client.call_tool("system_echo", {"n": n})
    return not result.is_error and result.structured_content == {"n": n}


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_stdio_survives_sidecar_restarts(tmp_path: Path, mode: str) -> None:
    """`soma mcp stdio` under `soma supervise`, whose sidecar is SIGKILLed during a call: that
    call fails at once saying why (not at the client's timeout), the next one, sent while the
    sidecar is down, is answered once it is back, and the relay neither dies nor prints a
    traceback."""
    run = SupervisorRun(
        tmp_path,
        '[[bridge]]\nname = "desk"\nexpose = ["system.*", "waiter.*"]\n',
        organs=("system", "tests.fixtures.waiter:Waiter"),
    )
    errors = tmp_path / "relay.stderr"
    try:
        run.wait_ready()
        wait_until(url_file(run.run_dir, "desk").exists, what="the bridge URL file")
        params = stdio_params(run.config, create_key(run.config))
        with errors.open("w") as errlog:
            # As a host would: a call unanswered for 30 s fails.
            transport = stdio_client(params, errlog=errlog)
            async with Client(transport, mode=mode, read_timeout_seconds=30) as client:  # type: ignore[arg-type]
                assert await echoes(client, 1)  # leaves an idle connection to the sidecar
                call = asyncio.create_task(client.call_tool("waiter_wait", {"id": "w1"}))
                started = tmp_path / "state" / STARTED
                await asyncio.to_thread(
                    wait_until, lambda: started.exists() and started.read_text() == "w1\n"
                )
                killed = time.monotonic()
                await asyncio.to_thread(kill_sidecar, run.proc.output)
                gone = "the sidecar serving bridge 'desk' went away before answering"
                with pytest.raises(MCPError, match=gone):
                    await call
                assert time.monotonic() - killed < 10  # at once, not at the client's 30 s
                assert await echoes(client, 2)
        assert "Traceback" not in errors.read_text()
    finally:
        assert run.stop() == 0, run.proc.output()


async def test_make_run_prints_the_url_a_key_file_and_client_configs(tmp_path: Path) -> None:
    """What `make run` runs, on a copy of the repository's soma.toml."""
    config = tmp_path / "soma.toml"
    shutil.copy(REPO / "soma.toml", config)
    key_file = tmp_path / ".soma" / "bridge-local.key"
    key_file.parent.mkdir()
    previous = create_key(config, bridge="local")
    key_file.write_text(previous + "\n")  # the key of an earlier run
    run = Process([sys.executable, "-m", "examples.run", "--config", str(config)], tmp_path / "log")
    try:
        wait_until(lambda: "or stdio" in run.output(), timeout=30, what="the client configs")
        lines = run.output().splitlines()
        (url,) = [m[1] for line in lines if (m := re.fullmatch(r"MCP bridge 'local': (\S+)", line))]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/mcp", url)
        assert f"  API key (new this run, mode 0600): {key_file}" in lines
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        assert key != previous and refused(url, previous)  # the earlier run's key is revoked
        async with http_client(url, key) as client:
            listed = await client.list_tools()
        assert [t.name for t in listed.tools] == ["system_echo", "system_ping"]
        # The stdio block, pasted as it is into a client's config.
        stdio = json.loads(
            lines[lines.index("  ... or stdio (the client launches `soma mcp stdio`):") + 1]
        )
        server = stdio["mcpServers"]["soma-local"]
        params = StdioServerParameters(
            command=server["command"], args=server["args"], env=server["env"]
        )
        async with Client(params) as client:  # type: ignore[arg-type]
            result = await client.call_tool("system_echo", {"via": "stdio"})
            assert result.structured_content == {"via": "stdio"}

            # The sidecar SIGKILLed between two calls: the restarted one serves the printed
            # URL, with the same key, and the stdio relay's next call too.
            served = await asyncio.to_thread(kill_sidecar, run.output)
            await asyncio.to_thread(wait_served, run.output, served)
            async with http_client(url, key) as http:
                assert await echoes(http, 4)
            assert await echoes(client, 5)
        assert url_file(tmp_path / ".soma" / "run", "local").read_text() == url + "\n"
    finally:
        assert run.stop(timeout=30) == 0, run.output()


def run_node(script: Path, url: str, key: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(script), url],
        env=child_env(SOMA_BRIDGE_KEY=key),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_typescript_sdk_client_over_http(sidecar: tuple[Path, str], npm_clients: Path) -> None:
    config, url = sidecar
    result = run_node(npm_clients / "client.mjs", url, create_key(config))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["protocol"] == "2025-11-25"  # TypeScript SDK v1: the initialize handshake
    assert answer["tools"] == ["system_echo", "system_ping"]
    assert answer["result"]["structuredContent"] == {"from": "typescript"}
    assert not answer["result"].get("isError")
    wrong = run_node(npm_clients / "client.mjs", url, "soma_" + "0" * 16 + "_" + "1" * 64)
    assert wrong.returncode == 1 and "invalid_token" in wrong.stderr
    assert "unknown, expired or revoked API key: send an API key of this bridge" in wrong.stderr


def mcp_remote(npm_clients: Path, url: str, key: str, home: Path) -> StdioServerParameters:
    """`mcp-remote URL --header x-api-key:KEY` as the README gives it: a stdio server that
    relays to the bridge over HTTP (what hosts without HTTP support run). Its OAuth state
    goes under `home`."""
    program = npm_clients / "node_modules" / ".bin" / "mcp-remote"
    return StdioServerParameters(
        command=str(program),
        args=[url, "--header", f"x-api-key:{key}"],
        env=child_env(HOME=str(home)),
    )


async def test_mcp_remote_with_the_documented_header(
    sidecar: tuple[Path, str], npm_clients: Path, tmp_path: Path
) -> None:
    config, url = sidecar
    params = mcp_remote(npm_clients, url, create_key(config), tmp_path)
    async with Client(params, mode="legacy") as client:  # type: ignore[arg-type]
        listed = await client.list_tools()
        assert [t.name for t in listed.tools] == ["system_echo", "system_ping"]
        result = await client.call_tool("system_echo", {"via": "mcp-remote"})
        assert result.structured_content == {"via": "mcp-remote"}


def test_mcp_remote_with_a_wrong_key_says_what_to_send(
    sidecar: tuple[Path, str], npm_clients: Path, tmp_path: Path
) -> None:
    """mcp-remote answers any 401 with an OAuth sign-in, which ends at client registration
    on a bridge without OAuth; it shows what the bridge answered there."""
    _, url = sidecar
    wrong = mcp_remote(npm_clients, url, "soma_" + "0" * 16 + "_" + "1" * 64, tmp_path)
    refused = subprocess.run(
        [wrong.command, *wrong.args],
        env=wrong.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1
    assert "RegistrationRejectedError" in refused.stderr
    assert "this server does no OAuth: send an API key of this bridge" in refused.stderr


async def test_stdio_after_the_key_is_revoked(sidecar: tuple[Path, str]) -> None:
    """A revoke reaches a running `soma mcp stdio` too: its next calls fail, saying why."""
    config, _ = sidecar
    key = create_key(config)
    async with Client(stdio_params(config, key)) as client:  # type: ignore[arg-type]
        assert not (await client.call_tool("system_echo", {})).is_error
        revoked = run_soma("bridge", "keys", "revoke", key.split("_")[1], "--config", str(config))
        assert revoked.returncode == 0, revoked.stderr
        errors: list[str] = []

        async def refused() -> bool:
            try:
                await client.call_tool("system_echo", {})
            except MCPError as exc:
                errors.append(str(exc))
                return True
            return False

        deadline = time.monotonic() + 1.0
        while not await refused():
            assert time.monotonic() < deadline, "the revoked key still works after 1 s"
        assert errors == ["bridge 'desk' refused SOMA_BRIDGE_KEY (unknown, expired or revoked key)"]


async def test_stdio_passes_the_idempotency_key_on(tmp_path: Path) -> None:
    """A retried non-idempotent call through `soma mcp stdio` runs once: the relay forwards
    our `_meta` key to the instance."""
    proc, _ = start_sidecar(
        tmp_path,
        ["system", "tests.fixtures.organs:Acme"],
        extra='[[bridge]]\nname = "desk"\nexpose = ["acme.record"]\n',
    )
    try:
        wait_until(url_file(tmp_path / "run", "desk").exists, what="the bridge URL file")
        config = tmp_path / "soma.toml"
        async with Client(stdio_params(config, create_key(config))) as client:  # type: ignore[arg-type]
            meta = {IDEMPOTENCY_KEY: "retry-1"}
            first = await client.call_tool("acme_record", {"id": "a", "ms": 0}, meta=meta)  # type: ignore[arg-type]
            again = await client.call_tool("acme_record", {"id": "a", "ms": 0}, meta=meta)  # type: ignore[arg-type]
            other = await client.call_tool("acme_record", {"id": "b", "ms": 0})
        assert not first.is_error and again.structured_content == first.structured_content
        assert not other.is_error
        assert (tmp_path / "state" / "acme-records.txt").read_text() == "a\nb\n"
    finally:
        assert proc.stop() == 0, proc.output()


async def test_stdio_waits_for_a_long_call(tmp_path: Path) -> None:
    """A call longer than httpx's default 5 s timeout is answered through `soma mcp stdio`
    (its HTTP client once gave up at 5 s, which ended the relay: the call never returned)."""
    proc, _ = start_sidecar(
        tmp_path,
        ["tests.fixtures.organs:Acme"],
        extra='[[bridge]]\nname = "desk"\nexpose = ["acme.slow"]\n',
    )
    try:
        wait_until(url_file(tmp_path / "run", "desk").exists, what="the bridge URL file")
        config = tmp_path / "soma.toml"
        params = stdio_params(config, create_key(config))
        async with Client(params, read_timeout_seconds=30) as client:  # type: ignore[arg-type]
            result = await client.call_tool("acme_slow", {"ms": 6000})
        assert not result.is_error and result.structured_content == {"slept_ms": 6000}
    finally:
        assert proc.stop() == 0, proc.output()
