"""Idempotency replay and JWKS refresh, bounded in memory and in time (with a test clock), and
the replay bounds per caller through a real sidecar's bridge."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.bridge.calls import ERROR
from sidecar.bridge.oauth import Jwks
from sidecar.bridge.published import url_file
from sidecar.bridge.replay import IdempotencyBusy, IdempotencyConflict, ReplayCache
from sidecar.bridge.tools import IDEMPOTENCY_KEY
from tests.helpers import records, start_sidecar, wait_until
from tests.test_bridge_clients import create_key, http_client

PER_CALLER = 1024  # the keys one caller may hold within the window
B_HEADERS = {
    "accept": "application/json, text/event-stream",
    "mcp-protocol-version": "2025-11-25",
}
RECORD_BRIDGE = """
[[bridge]]
name = "desk"
expose = ["acme.record"]
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_repeated_key_waits_for_the_first_call_and_gets_its_result() -> None:
    cache: ReplayCache[int] = ReplayCache(lambda r: 8)
    started, release = asyncio.Event(), asyncio.Event()
    runs = 0

    async def call() -> int:
        nonlocal runs
        runs += 1
        started.set()
        await release.wait()
        return runs

    first = asyncio.create_task(cache.run("a", "k", "f", call))
    await started.wait()
    second = asyncio.create_task(cache.run("a", "k", "f", call))
    # Scheduled after the second task's first step (the loop runs callbacks in order), so
    # the second finds the first call still in flight.
    asyncio.get_running_loop().call_soon(release.set)
    assert await first == await second == 1
    assert runs == 1
    with pytest.raises(IdempotencyConflict):
        await cache.run("a", "k", "other arguments", call)
    assert await cache.run("b", "k", "f", call) == 2  # another caller's key of the same name


async def answer(value: int) -> int:
    return value


async def test_a_full_caller_is_refused_and_forgets_nothing_inside_the_window() -> None:
    clock = Clock()
    cache: ReplayCache[int] = ReplayCache(
        lambda r: 100,
        window_s=60.0,
        max_entries_per_owner=3,
        max_bytes_per_owner=200,
        max_entries=5,
        clock=clock,
    )
    for i in range(2):
        await cache.run("a", i, "f", lambda i=i: answer(i))  # type: ignore[misc]
    # b floods: its two results use its 200 bytes; its third key is refused, with when to retry.
    for i in range(2):
        await cache.run("b", i, "f", lambda i=i: answer(i))  # type: ignore[misc]
    clock.now += 15.0
    with pytest.raises(IdempotencyBusy) as busy:
        await cache.run("b", 2, "f", lambda: answer(-1))
    assert busy.value.retry_after_s == 45
    # a's keys are all still there: replayed, never run again.
    assert [await cache.run("a", i, "f", lambda: answer(-1)) for i in range(2)] == [0, 1]
    # The whole cache holds 5 entries: c's second key is refused, whoever floods.
    await cache.run("c", 0, "f", lambda: answer(0))
    with pytest.raises(IdempotencyBusy):
        await cache.run("c", 1, "f", lambda: answer(1))
    clock.now += 46.0  # the window of the first entries has passed: room again
    assert await cache.run("b", 2, "f", lambda: answer(2)) == 2
    assert await cache.run("a", 0, "f", lambda: answer(-2)) == -2  # expired: runs again
    assert len(cache) == 3


async def test_an_entry_whose_call_runs_is_never_forgotten() -> None:
    clock = Clock()
    cache: ReplayCache[int] = ReplayCache(
        lambda r: 8, window_s=60.0, max_entries_per_owner=1, clock=clock
    )
    release = asyncio.Event()
    runs = 0

    async def slow() -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        return runs

    first = asyncio.create_task(cache.run("a", "k", "f", slow))
    await asyncio.sleep(0)  # the first call starts
    clock.now += 120.0  # past its window, still running
    with pytest.raises(IdempotencyBusy):
        await cache.run("a", "other", "f", slow)
    repeat = asyncio.create_task(cache.run("a", "k", "f", slow))
    await asyncio.sleep(0)
    release.set()
    assert await first == await repeat == 1
    assert runs == 1


async def test_a_failed_first_call_is_not_replayed() -> None:
    cache: ReplayCache[int] = ReplayCache(lambda r: 8)

    async def fail() -> int:
        raise RuntimeError("boom")

    async def succeed() -> int:
        return 7

    with pytest.raises(RuntimeError):
        await cache.run("a", "k", "f", fail)
    assert await cache.run("a", "k", "f", succeed) == 7


def write_jwks(path: Path, keys: dict[str, ec.EllipticCurvePrivateKey]) -> None:
    entries = [
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(k.public_key())), "kid": kid}
        for kid, k in keys.items()
    ]
    path.write_text(json.dumps({"keys": entries}))


async def test_an_unknown_kid_refetches_at_most_once_per_interval(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "jwks.json"
    keys = {"a": ec.generate_private_key(ec.SECP256R1())}
    write_jwks(path, keys)
    jwks = Jwks(str(path), refresh_interval=60.0, clock=clock)
    assert await jwks.key("a") is not None
    keys["b"] = ec.generate_private_key(ec.SECP256R1())
    write_jwks(path, keys)
    assert await jwks.key("b") is None  # loaded a moment ago: no refetch yet
    clock.now += 61.0
    found = await jwks.key("b")
    assert found is not None and found.key_id == "b"
    path.write_text("not json")  # a broken refresh keeps the keys known so far
    clock.now += 61.0
    assert await jwks.key("zzz") is None
    assert await jwks.key("a") is not None


async def test_one_callers_flood_of_keys_never_evicts_anothers(tmp_path: Path) -> None:
    """Caller B sends more distinct idempotency keys than a caller may hold: B's extra calls
    are refused (Overloaded, retry later), and caller A's retry still replays its first call,
    which ran once (acme.record leaves a line per run)."""
    proc, _ = start_sidecar(tmp_path, ["system", "tests.fixtures.organs:Acme"], RECORD_BRIDGE)
    try:
        published = url_file(tmp_path / "run", "desk")
        wait_until(published.exists, what="the bridge URL file")
        url = published.read_text().strip()
        key_a, key_b = (create_key(tmp_path / "soma.toml") for _ in range(2))
        async with http_client(url, key_a) as a:
            order = {"id": "a-order", "ms": 0}
            first = await a.call_tool("acme_record", order, meta={IDEMPOTENCY_KEY: "a-1"})
            assert not first.is_error

            # B: bare JSON-RPC, quicker; fewer connections at once than the bridge's cap (64).
            limits = httpx2.Limits(max_connections=48)
            async with httpx2.AsyncClient(timeout=60.0, limits=limits) as raw:

                async def flood(i: int) -> dict[str, Any]:
                    params = {
                        "name": "acme_record",
                        "arguments": {"id": f"b-{i}", "ms": 0},
                        "_meta": {IDEMPOTENCY_KEY: f"b-{i}"},
                    }
                    reply = await raw.post(
                        url,
                        headers={**B_HEADERS, "x-api-key": key_b},
                        json={"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params},
                    )
                    data = next(x for x in reply.text.splitlines() if x.startswith("data: "))
                    result = json.loads(data[len("data: ") :])["result"]
                    if result.get("isError"):  # errors travel in _meta, not structuredContent
                        return result["_meta"][ERROR]  # type: ignore[no-any-return]
                    return result["structuredContent"]  # type: ignore[no-any-return]

                answers = await asyncio.gather(*(flood(i) for i in range(PER_CALLER + 76)))
            refused = [r for r in answers if r.get("error") == "Overloaded"]
            assert len(refused) == 76
            assert refused[0]["retry_after_s"] >= 1 and "retry later" in str(refused[0])

            again = await a.call_tool("acme_record", order, meta={IDEMPOTENCY_KEY: "a-1"})
            assert again.structured_content == first.structured_content
            fresh = await a.call_tool(
                "acme_record", {"id": "a-2", "ms": 0}, meta={IDEMPOTENCY_KEY: "a-2"}
            )
            assert not fresh.is_error  # A's own room is untouched
    finally:
        assert proc.stop() == 0, proc.output()
    ran = records(tmp_path / "state")
    assert ran.count("a-order") == 1
    assert len([r for r in ran if r.startswith("b-")]) == PER_CALLER
