"""Upstream MCP servers that turn on their host: one that echoes the credential it was given
(in every encoding, in everything it answers), one that answers more than any output may
hold. The fixture server is tests/fixtures/mcp_upstream.py, over HTTP and over stdio; runtimes
are served by the sidecar's own loading code or a real sidecar, MCP clients are the official
Python client on a real bridge."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import sdk
from sidecar.upstream.transport import MAX_STDERR_LINE
from soma_runtime.config import SomaConfig
from tests.fake_upstream import encodings
from tests.helpers import SupervisorRun, set_secret, start_sidecar, wait_until
from tests.test_upstream import (
    DESK,
    FIXTURE,
    TOKEN,
    bridge_client,
    eventually,
    hosting,
    http_table,
    http_upstream,
    origin,
    seen_credentials,
    stdio_table,
    write_config,
)

# Every encoding of it differs from the others: URL-encoding, JSON escapes, base64 padding,
# standard and URL-safe alphabets.
HOSTILE = 'h0st/le s3cret+"k3y"\\?>>~'
MiB = 1024 * 1024


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def assert_no_secret(value: Any) -> None:
    """No form of the secret in `value`'s JSON, nor in any base64 payload inside it decoded
    (a blob or an image holding the secret at an offset where its base64 is no form of it)."""
    text = json.dumps(value, ensure_ascii=False)
    assert not [form for form in encodings(HOSTILE) if form in text], text[:2000]
    for string in _strings(value):
        for altchars in (b"+/", b"-_"):
            with contextlib.suppress(binascii.Error, ValueError):
                decoded = base64.b64decode(string, altchars=altchars, validate=True)
                assert HOSTILE.encode() not in decoded, string


@contextlib.contextmanager
def leaky_upstream(tmp_path: Path, transport: str) -> Iterator[SomaConfig]:
    """A config hosting the fixture server (its hostile `leak` tool offered) over
    `transport` (`http`, `http-json` or `stdio`), with the bridge `desk`, and the credential
    `HOSTILE`."""
    if transport == "stdio":
        state = tmp_path / "upstream"
        state.mkdir()
        (state / "extra").write_text("leak\n")
        yield write_config(tmp_path, stdio_table(state) + DESK, value=HOSTILE)
        return
    with http_upstream(tmp_path, json_response=transport == "http-json") as (url, state):
        (state / "extra").write_text("leak\n")
        table = http_table(url) + DESK
        yield write_config(tmp_path, table, host=origin(url), value=HOSTILE)


@pytest.mark.parametrize("transport", ["http", "stdio"])
async def test_an_upstream_echoing_its_credential_hands_no_form_of_it_on(
    tmp_path: Path, transport: str
) -> None:
    with leaky_upstream(tmp_path, transport) as config:
        async with hosting(config) as host, bridge_client(config, host) as client:
            # The tool list: the card runtimes discover, and what the bridge lists.
            card = host.functions()["tickets.leak"]
            assert "****" in card.description  # echoed, and masked
            assert_no_secret(card.model_dump())
            tools = {tool.title: tool for tool in (await client.list_tools()).tools}
            assert_no_secret([tool.model_dump(mode="json") for tool in tools.values()])

            for how in ("", "error", "raise"):
                response = await host.call("tickets.leak", {"as": how})
                assert response.ok == (how == ""), response.output
                assert "****" in json.dumps(response.output)
                assert_no_secret(response.output)
                result = await client.call_tool(tools["tickets.leak"].name, {"as": how})
                assert result.is_error == (how != "")
                assert "****" in json.dumps(result.model_dump(mode="json"))
                assert_no_secret(result.model_dump(mode="json"))
            # Every kind of content block came back, masked where the secret was.
            blocks = host.call("tickets.leak", {})
            kinds = {b["type"] for b in (await blocks).output["content"]}
            assert kinds == {"text", "resource", "image"}


async def test_answers_that_cannot_be_made_safe_are_refused(tmp_path: Path) -> None:
    """A secret of digits echoed as a JSON number cannot be masked; a compressed body cannot
    be bounded before it is decoded. Neither goes out, and the other calls go on."""
    with http_upstream(tmp_path, json_response=True) as (url, state):
        (state / "extra").write_text("leak\n")
        config = write_config(tmp_path, http_table(url), host=origin(url), value="31415926535")
        async with hosting(config) as host:
            number = await host.call("tickets.leak", {"as": "number"})
            assert number.error == "UnscrubbableResponse", number.output
            assert "31415926535" not in json.dumps(number.output)
            (state / "gzip").touch()
            compressed = await host.call("tickets.get_ticket", {"id": "1"})
            assert compressed.error == "UnboundedResponse", compressed.output
            (state / "gzip").unlink()
            fine = await host.call("tickets.get_ticket", {"id": "1"})
            assert fine.output == {"id": "1", "title": "ticket 1"}


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_a_huge_answer_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """48 MiB from the upstream: a typed error, the sidecar's memory does not grow by the
    answer's size, and the upstream's other calls go on."""
    with http_upstream(tmp_path) as (url, state):
        (state / "extra").write_text("big\n")
        credential = f'[[credential]]\nname = "{TOKEN}"\nhosts = ["{origin(url)}"]\n'
        table = credential + http_table(url)
        head = '[soma]\nstate_dir = "state"\nruntime_dir = "run"\n'
        (tmp_path / "soma.toml").write_text(head + table)
        set_secret(tmp_path / "soma.toml", TOKEN, "s3cret")
        proc, target = start_sidecar(tmp_path, ["system"], table)
        try:
            with sdk.Client(target) as client:
                assert client.call("tickets.big", {"bytes": 1000})["content"][0]["text"]
                before = peak_rss(proc.pid)
                with pytest.raises(sdk.OrganError) as refused:
                    client.call("tickets.big", {"bytes": 48 * MiB})
                growth = peak_rss(proc.pid) - before
                print(f"sidecar peak RSS growth for a 48 MiB answer: {growth / MiB:.1f} MiB")
                assert refused.value.kind == "ResponseTooLarge", refused.value.payload
                assert growth < 48 * MiB
                assert client.call("tickets.get_ticket", {"id": "2"})["title"] == "ticket 2"
        finally:
            proc.stop()


@contextlib.asynccontextmanager
async def big_upstream(tmp_path: Path, transport: str) -> AsyncIterator[SomaConfig]:
    with leaky_upstream(tmp_path, transport) as config:
        (tmp_path / "upstream" / "extra").write_text("big\n")
        yield config


# Over HTTP the client reads an event stream and a JSON body by different paths.
@pytest.mark.parametrize("transport", ["http", "http-json", "stdio"])
async def test_a_huge_answer_is_a_typed_error_for_runtimes_and_mcp_clients(
    tmp_path: Path, transport: str
) -> None:
    async with (
        big_upstream(tmp_path, transport) as config,
        hosting(config) as host,
        bridge_client(config, host) as client,
    ):
        response = await host.call("tickets.big", {"bytes": 48 * MiB})
        assert response.error == "ResponseTooLarge", str(response.output)[:500]
        result = await client.call_tool("tickets_big", {"bytes": 48 * MiB})
        assert result.is_error
        assert json.loads(result.content[0].text)["error"] == "ResponseTooLarge"  # type: ignore[union-attr]
        fine = await host.call("tickets.get_ticket", {"id": "5"})
        assert fine.ok and fine.output == {"id": "5", "title": "ticket 5"}


async def test_a_compressed_listen_stream_is_refused(tmp_path: Path) -> None:
    """The listen stream's body is not decoded either (a gzip bomb would be, on the event
    loop): the stream is refused, and calls go on."""
    with http_upstream(tmp_path) as (url, state):
        (state / "gzip_listen").touch()
        config = write_config(tmp_path, http_table(url), host=origin(url))
        with capture_logs() as logs:
            async with hosting(config) as host:
                await eventually(
                    lambda: any(
                        e["event"] == "upstream_listen_ended" and "content coding" in e["error"]
                        for e in logs
                    )
                )
                fine = await host.call("tickets.get_ticket", {"id": "1"})
                assert fine.output == {"id": "1", "title": "ticket 1"}


FORGED = {"event": "vault_sealed", "level": "critical", "child": "sidecar", "error": "forged"}


def test_a_stdio_upstreams_stderr_is_its_own_bounded_events(tmp_path: Path) -> None:
    """What a stdio upstream writes to stderr is logged as its events (`upstream_stderr`,
    its name, the line in a field, cut short, a few a while): a line imitating the sidecar's
    never becomes one of the sidecar's events."""
    state = tmp_path / "upstream"
    state.mkdir()
    lines = [json.dumps(FORGED), "x" * 100_000] + [f"chatter {n}" for n in range(200)]
    (state / "stderr").write_text("\n".join(lines) + "\n")
    command = json.dumps([sys.executable, str(FIXTURE), "stdio", str(state)])
    run = SupervisorRun(tmp_path, f'[[upstream]]\nname = "tickets"\ncommand = {command}\n')
    try:
        run.wait_ready()
        wait_until(lambda: len(run.events("upstream_stderr")) >= 2, what="the upstream's lines")
        events = run.events("upstream_stderr")
        assert events[0]["upstream"] == "tickets" and events[0]["child"] == "sidecar"
        assert json.loads(events[0]["line"]) == FORGED
        assert len(events[1]["line"]) <= MAX_STDERR_LINE + 3
        assert not [e for e in run.events() if e.get("event") == FORGED["event"]]
    finally:
        run.stop()
    assert len(run.events("upstream_stderr")) < 20  # of 202 lines


async def test_a_rotated_credential_is_masked_in_what_follows(tmp_path: Path) -> None:
    """The organ keeps what masks a credential from call to call: a new value of it (a
    rotation) is masked as well as the first."""
    with leaky_upstream(tmp_path, "http") as config:
        async with hosting(config) as host:
            first = await host.call("tickets.leak", {})
            assert first.ok and "****" in json.dumps(first.output)
            assert_no_secret(first.output)
            rotated = HOSTILE[::-1]
            set_secret(config.source, TOKEN, rotated)
            before = len(seen_credentials(tmp_path / "upstream"))
            second = await host.call("tickets.leak", {})
            # The call sent the new value (other requests, such as the listen stream's, which
            # was opened with the old one, may come after it).
            assert f"Bearer {rotated}" in seen_credentials(tmp_path / "upstream")[before:]
            assert second.ok and "****" in json.dumps(second.output)
            text = json.dumps(second.output, ensure_ascii=False)
            assert not [form for form in encodings(rotated) if form in text], text[:2000]
