"""What a bridge's clients may hold, over real sockets: the size and deadline of a request's
head and body, the connections of a port, `subscriptions/listen` streams per caller and per
instance, the nesting of a request's JSON (API keys and OAuth tokens alike), and the
sidecar's descriptor budget counting every bridge's connections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import mcp.types as types
import pytest
from mcp.shared.exceptions import MCPError

from sidecar.bridge.keys import KeyStore
from sidecar.organs.system import SystemOrgan
from soma_runtime.config import ConfigError
from tests.fixtures.organs import Ledger
from tests.helpers import SOMA, Process
from tests.test_bridge import bridge_config, client, running
from tests.test_bridge_auth import Issuer, apost, oauth_config

TIGHT = """
[[bridge]]
name = "tight"
expose = ["system.*", "ledger.*"]
max_connections = 4
max_header_bytes = 4096
request_timeout = {timeout}
max_listen_streams = 3
max_listen_streams_per_caller = 2
"""
ACCEPT_VALUE = "application/json, text/event-stream"
ACCEPT = f"accept: {ACCEPT_VALUE}\r\n".encode()
PING = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}'


@contextlib.asynccontextmanager
async def tight(tmp_path: Path, timeout: float = 1.0) -> AsyncIterator[tuple[int, str, str]]:
    """A bridge with small limits: its port, URL and an API key."""
    config = bridge_config(tmp_path, TIGHT.format(timeout=timeout))
    _, key = KeyStore(config.state_dir).create("tight")
    async with running(config, [SystemOrgan(), Ledger()]) as bridges:
        yield bridges["tight"].port, bridges["tight"].url, key


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def answer(reader: asyncio.StreamReader, within: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (fails after `within`)."""
    return await asyncio.wait_for(reader.read(), within)


def head(port: int, key: str | None = None, length: int | None = None) -> bytes:
    """A request's head; with `length`, it expects 100-continue: the server says when it
    waits for the body."""
    lines = f"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n".encode() + ACCEPT
    lines += b"content-type: application/json\r\n"
    if key is not None:
        lines += f"x-api-key: {key}\r\n".encode()
    if length is not None:
        lines += f"content-length: {length}\r\nexpect: 100-continue\r\n".encode()
    return lines + b"\r\n"


async def test_a_head_beyond_max_header_bytes_is_refused_before_it_is_read(
    tmp_path: Path,
) -> None:
    async with tight(tmp_path) as (port, url, key):
        for start in (b"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\nx-flood: ", b"GET /" + b"a" * 10):
            async with connection(port) as (reader, writer):
                answered = asyncio.create_task(answer(reader))
                writer.write(start)
                with contextlib.suppress(ConnectionError):
                    while not answered.done():  # endlessly, as far as the server can tell
                        writer.write(b"a" * 65536)
                        await asyncio.wait({answered}, timeout=0.01)
                assert (await answered).startswith(b"HTTP/1.1 431 ")
        # A head within the bound is served.
        fits = await apost(url, {"x-api-key": key, "x-pad": "p" * 3000})
        assert fits.status_code == 200


async def test_a_slow_or_silent_head_is_closed_after_the_request_timeout(tmp_path: Path) -> None:
    async with tight(tmp_path, timeout=1.0) as (port, _, _):
        async with connection(port) as (reader, writer):
            started = time.monotonic()

            async def trickle() -> None:  # slowloris: a byte of the head every 0.2 s
                with contextlib.suppress(ConnectionError):
                    for byte in head(port):
                        writer.write(bytes([byte]))
                        await writer.drain()
                        await asyncio.sleep(0.2)

            sending = asyncio.create_task(trickle())
            try:
                assert (await answer(reader)).startswith(b"HTTP/1.1 408 ")
            finally:
                sending.cancel()
            assert time.monotonic() - started < 5.0
        async with connection(port) as (reader, _):
            assert await answer(reader, 5.0) == b""  # silent: closed without a word


async def test_a_slow_body_is_refused_after_the_request_timeout(tmp_path: Path) -> None:
    async with tight(tmp_path, timeout=1.0) as (port, url, key):
        async with connection(port) as (reader, writer):
            writer.write(head(port, key, len(PING)) + PING[:5])  # the rest never comes
            reply = await answer(reader)  # and then closed, the body still unsent
        reply = reply.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n")
        status, _, body = reply.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408 ")
        assert json.loads(body) == {"error": "request_timeout", "timeout_s": 1.0}
        assert (await apost(url, {"x-api-key": key})).status_code == 200


async def test_beyond_max_connections_the_oldest_idle_one_is_closed(tmp_path: Path) -> None:
    """Connections being answered are never closed for a newcomer; idle ones are, oldest
    first, so a client that fills the port with idle connections cannot keep others out."""
    async with tight(tmp_path, timeout=30.0) as (port, url, key), contextlib.AsyncExitStack() as s:
        busy = [await s.enter_async_context(connection(port)) for _ in range(4)]
        for reader, writer in busy:  # a head, and a body that has not come yet: being answered
            writer.write(head(port, key, len(PING)))
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        async with connection(port) as (reader, _):
            assert await answer(reader, 5.0) == b""  # all four are busy: closed at once
        first_reader, first_writer = busy[0]
        first_writer.write(PING)  # its body arrives: answered, then idle (kept alive)
        assert (await asyncio.wait_for(first_reader.readuntil(b"\r\n\r\n"), 10)).startswith(
            b"HTTP/1.1 200 "
        )
        # A newcomer pushes out the one idle connection (the oldest idle), not a busy one.
        assert (await apost(url, {"x-api-key": key})).status_code == 200
        # Closed (long before the 30 s timeout) once the rest of its answer was sent.
        assert (await answer(first_reader, 5.0)).endswith(b"\r\n0\r\n\r\n")
        for _, writer in busy[1:]:
            assert not writer.is_closing()


async def test_listen_streams_are_bounded_per_caller_and_per_instance(tmp_path: Path) -> None:
    async with tight(tmp_path) as (_, url, key), contextlib.AsyncExitStack() as stack:
        other = KeyStore(tmp_path / "state").create("tight")[1]

        async def listen(caller: str) -> None:
            c = await stack.enter_async_context(client(url, caller))
            await stack.enter_async_context(c.listen(tools_list_changed=True))

        await listen(key)
        await listen(key)
        with pytest.raises(MCPError, match="too many listen streams") as per_caller:
            await listen(key)
        assert per_caller.value.code == types.INTERNAL_ERROR
        await listen(other)  # another caller has its own two, within the instance's three
        with pytest.raises(MCPError, match="Subscription limit reached"):
            await listen(other)


def post_raw(url: str, headers: dict[str, str], body: bytes) -> httpx2.Response:
    with httpx2.Client(timeout=30.0) as http:
        return http.post(
            url,
            headers={"accept": ACCEPT_VALUE, "content-type": "application/json", **headers},
            content=body,
        )


def nested_call(depth: int) -> bytes:
    """A `tools/call` of `system_echo` whose arguments nest `depth` levels deep."""
    arguments = b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)
    return (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"system_echo",'
        b'"arguments":' + arguments + b"}}"
    )


@pytest.mark.parametrize("credential", ["api key", "oauth read scope"])
async def test_deep_json_is_a_parse_error_not_a_traceback(
    tmp_path: Path, credential: str, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = Issuer(tmp_path / "jwks.json")
    config = bridge_config(tmp_path, oauth_config(tmp_path))
    _, key = KeyStore(config.state_dir).create("sso")
    caplog.set_level(logging.ERROR)
    async with running(config, [SystemOrgan()]) as bridges:
        url = bridges["sso"].url
        if credential == "api key":
            auth = {"x-api-key": key}
        else:  # soma:tools only: no write scope
            auth = {"authorization": f"Bearer {issuer.token(url)}"}
        # Arguments as deep as a runtime's input may be (max_input_depth, 64): served.
        served = await asyncio.to_thread(post_raw, url, auth, nested_call(64))
        assert served.status_code == 200
        for depth in (66, 100_000):
            reply = await asyncio.to_thread(post_raw, url, auth, nested_call(depth))
            assert reply.status_code == 400, depth
            error = reply.json()["error"]
            assert error["code"] == -32700
            assert error["message"] == (
                "Parse error: the body nests deeper than the limit of 67 levels"
            )
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_listen_streams_must_leave_connections_for_calls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_listen_streams: must be below max_connections"):
        bridge_config(
            tmp_path, '[[bridge]]\nname = "a"\nmax_connections = 8\nmax_listen_streams = 8\n'
        )
    with pytest.raises(ConfigError, match="max_listen_streams_per_caller: must not exceed"):
        bridge_config(tmp_path, '[[bridge]]\nname = "a"\nmax_listen_streams_per_caller = 33\n')


def test_bridge_connections_count_in_the_descriptor_budget(tmp_path: Path) -> None:
    """Two bridges at 900 connections each cannot fit in 2048 descriptors beside the reserve:
    the sidecar refuses to start, naming the bridges, rather than run out later."""
    config = tmp_path / "soma.toml"
    bridges = "".join(
        f'[[bridge]]\nname = "b{i}"\nexpose = ["system.*"]\nmax_connections = 900\n'
        for i in range(2)
    )
    config.write_text(
        '[soma]\nstate_dir = "state"\nruntime_dir = "run"\n'
        f'[sidecar]\nsocket = "run/s.sock"\norgans = ["system"]\n{bridges}'
    )

    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, 2048))

    proc = Process(
        [SOMA, "sidecar", "--config", str(config)], tmp_path / "log", preexec_fn=lower_limit
    )
    try:
        code = proc.wait(30)
    finally:
        proc.kill()
    assert code == 2, proc.output()
    assert "bridge ports 1802 and a reserve of 256" in proc.output()
