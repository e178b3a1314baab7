"""Idempotency replay and JWKS refresh, bounded in memory and in time (with a test clock)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.bridge.oauth import Jwks
from sidecar.bridge.replay import IdempotencyConflict, ReplayCache


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

    first = asyncio.create_task(cache.run("k", "f", call))
    await started.wait()
    second = asyncio.create_task(cache.run("k", "f", call))
    # Scheduled after the second task's first step (the loop runs callbacks in order), so
    # the second finds the first call still in flight.
    asyncio.get_running_loop().call_soon(release.set)
    assert await first == await second == 1
    assert runs == 1
    with pytest.raises(IdempotencyConflict):
        await cache.run("k", "other arguments", call)


async def test_entries_expire_and_memory_is_bounded() -> None:
    clock = Clock()
    cache: ReplayCache[int] = ReplayCache(
        lambda r: 100, window_s=60.0, max_entries=3, max_bytes=250, clock=clock
    )

    async def answer(value: int) -> int:
        return value

    for i in range(10):
        await cache.run(i, "f", lambda i=i: answer(i))  # type: ignore[misc]
    assert len(cache) == 2  # 250 bytes hold two results of 100
    assert await cache.run(9, "f", lambda: answer(-1)) == 9  # still replayed
    assert await cache.run(0, "f", lambda: answer(-1)) == -1  # evicted: runs again
    clock.now += 61.0
    assert await cache.run(9, "f", lambda: answer(-2)) == -2  # the window has passed


async def test_a_failed_first_call_is_not_replayed() -> None:
    cache: ReplayCache[int] = ReplayCache(lambda r: 8)

    async def fail() -> int:
        raise RuntimeError("boom")

    async def succeed() -> int:
        return 7

    with pytest.raises(RuntimeError):
        await cache.run("k", "f", fail)
    assert await cache.run("k", "f", succeed) == 7


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
