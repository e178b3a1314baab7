"""`sdk.Client` and `sdk.AsyncClient` over the Stream RPC (their default), against a real
`soma sidecar`: answers reach the right caller, deadlines and cancellation reach the sidecar,
per-call errors leave the stream serving, and closing leaves no thread or task behind.
Reconnecting across a sidecar restart is in tests/test_stream_sdk_restart.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sdk
from tests.conftest import TEST_ORGANS
from tests.helpers import Process, evict_sessions, records, start_sidecar, wait_until

Sidecar = tuple[Process, str]
ORGANS = [*TEST_ORGANS, "tests.fixtures.organs:Keyring"]  # keyring.whoami needs a credential


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One sidecar for the module (its target and state directory): these tests share it."""
    tmp = tmp_path_factory.mktemp("stream-sdk")
    proc, target = start_sidecar(tmp, ORGANS)
    yield target, tmp / "state"
    assert proc.stop() == 0, proc.output()


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "soma-sdk-stream"]


def hangs(state: Path) -> list[str]:
    path = state / "acme-hangs.txt"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_concurrent_calls_from_threads_each_get_their_own_answer(
    served: tuple[str, Path], transport: str
) -> None:
    target, _ = served
    with sdk.Client(target, transport=transport) as client:
        slow: list[Any] = []
        slow_thread = threading.Thread(
            target=lambda: slow.append(client.call("acme.slow", {"ms": 3000}))
        )
        slow_thread.start()
        got: dict[tuple[int, int], Any] = {}

        def worker(w: int) -> None:
            for i in range(40):
                got[w, i] = client.call("system.echo", {"w": w, "i": i, "pad": "x" * (w * 50)})

        workers = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(30)
        # Answered out of order: 320 calls sent after the slow one finished before it.
        assert slow_thread.is_alive() and not slow
        assert got == {
            (w, i): {"w": w, "i": i, "pad": "x" * (w * 50)} for w in range(8) for i in range(40)
        }
        assert len(stream_threads()) == (transport == "stream")  # one stream carried them all
        slow_thread.join(10)
        assert slow == [{"slept_ms": 3000}]
    assert stream_threads() == []


@pytest.mark.parametrize("transport", ["stream", "unary"])
async def test_concurrent_tasks_each_get_their_own_answer(
    served: tuple[str, Path], transport: str
) -> None:
    target, _ = served
    async with sdk.AsyncClient(target, transport=transport) as client:
        slow = asyncio.create_task(client.call("acme.slow", {"ms": 3000}))
        values = [{"i": i, "pad": "y" * (i % 7) * 100} for i in range(300)]
        got = await asyncio.gather(*(client.call("system.echo", v) for v in values))
        assert got == values
        assert not slow.done()  # the slow call, sent first, is answered last
        assert await slow == {"slept_ms": 3000}


def test_a_deadline_raises_and_cancels_the_call_in_the_sidecar(served: tuple[str, Path]) -> None:
    target, state = served
    with sdk.Client(target) as client:
        with pytest.raises(sdk.DeadlineExceeded):
            client.call("acme.hang", {"id": "sync-deadline"}, timeout=0.5)
        wait_until(
            lambda: "cancelled sync-deadline" in hangs(state), what="the organ task cancelled"
        )
        assert client.call("system.echo", {"after": 1}) == {"after": 1}


async def test_cancelling_a_task_cancels_its_call_in_the_sidecar(served: tuple[str, Path]) -> None:
    target, state = served
    async with sdk.AsyncClient(target, timeout=None) as client:  # no deadline: only the cancel
        task = asyncio.create_task(client.call("acme.hang", {"id": "task-cancel"}))
        await asyncio.to_thread(
            wait_until, lambda: "started task-cancel" in hangs(state), 10, "the call to run"
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(
            wait_until, lambda: "cancelled task-cancel" in hangs(state), 10, "the task cancelled"
        )
        assert await client.call("system.echo", {"after": 2}) == {"after": 2}
        with pytest.raises(sdk.DeadlineExceeded):
            await client.call("acme.hang", {"id": "async-deadline"}, timeout=0.3)
        await asyncio.to_thread(
            wait_until, lambda: "cancelled async-deadline" in hangs(state), 10, "deadline cancel"
        )


def deep_value(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


ERRORS: list[tuple[str, Any, type[sdk.SomaError]]] = [
    ("acme.greet", {}, sdk.InvalidInput),
    ("nope.nothing", {}, sdk.UnsupportedOperation),
    ("acme.refuse", {"key": "k"}, sdk.OrganError),
    ("keyring.whoami", {}, sdk.PermissionDenied),  # a credential the channel may not use
    ("system.echo", {"deep": deep_value(100)}, sdk.InvalidRequest),  # too deep for the sidecar
    ("system.echo", {"big": "z" * (5 << 20)}, sdk.InvalidRequest),  # refused before sending
]


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_per_call_errors_are_typed_and_the_next_call_works(
    served: tuple[str, Path], transport: str
) -> None:
    target, _ = served
    with sdk.Client(target, transport=transport) as client:
        for op, value, error in ERRORS:
            with pytest.raises(error) as info:
                client.call(op, value)
            assert type(info.value) is error, (op, info.value)
            assert client.call("system.echo", {"after": op}) == {"after": op}
        assert len(stream_threads()) == (1 if transport == "stream" else 0)


@pytest.mark.parametrize("transport", ["stream", "unary"])
async def test_per_call_errors_are_typed_and_the_next_call_works_async(
    served: tuple[str, Path], transport: str
) -> None:
    target, _ = served
    async with sdk.AsyncClient(target, transport=transport) as client:
        for op, value, error in ERRORS:
            with pytest.raises(error) as info:
                await client.call(op, value)
            assert type(info.value) is error, (op, info.value)
            assert await client.call("system.echo", {"after": op}) == {"after": op}


def test_closing_the_client_fails_waiting_calls_and_leaves_no_thread(
    served: tuple[str, Path],
) -> None:
    target, state = served
    before = set(threading.enumerate())
    client = sdk.Client(target, timeout=None)
    assert client.call("system.echo", {}) == {}
    failed: list[BaseException] = []

    def hang() -> None:
        try:
            client.call("acme.hang", {"id": "sync-close"})
        except sdk.SomaError as exc:
            failed.append(exc)

    waiting = threading.Thread(target=hang)
    waiting.start()
    wait_until(lambda: "started sync-close" in hangs(state), what="the call to run")
    client.close()
    waiting.join(10)
    assert len(failed) == 1 and isinstance(failed[0], sdk.Unavailable)
    assert "closed" in str(failed[0])
    with pytest.raises(sdk.Unavailable, match="closed"):
        client.call("system.echo", {})
    # The stream's end cancels the organ task; grpc's own threads end too.
    wait_until(lambda: "cancelled sync-close" in hangs(state), what="the organ task cancelled")
    wait_until(lambda: set(threading.enumerate()) <= before, what="the client's threads to end")


async def test_closing_the_async_client_fails_waiting_calls_and_leaves_no_task(
    served: tuple[str, Path],
) -> None:
    target, state = served
    before = asyncio.all_tasks()
    client = sdk.AsyncClient(target, timeout=None)
    assert await client.call("system.echo", {}) == {}
    waiting = asyncio.create_task(client.call("acme.hang", {"id": "async-close"}))
    await asyncio.to_thread(
        wait_until, lambda: "started async-close" in hangs(state), 10, "the call to run"
    )
    await client.close()
    with pytest.raises(sdk.Unavailable, match="closed"):
        await waiting
    with pytest.raises(sdk.Unavailable, match="closed"):
        await client.call("system.echo", {})
    await asyncio.to_thread(
        wait_until, lambda: "cancelled async-close" in hangs(state), 10, "the task cancelled"
    )
    assert asyncio.all_tasks() - before - {waiting} == set()


def test_a_stale_session_gets_one_new_session_and_nothing_runs_twice(
    served: tuple[str, Path],
) -> None:
    target, state = served
    with sdk.Client(target) as client:
        client.describe()  # a session, and no stream yet
        evict_sessions(target)
        # The stream opens with the revoked session and is refused before anything runs:
        # one new session, and even a non-idempotent call is sent again, once.
        assert client.call("acme.record", {"id": "at-open", "ms": 0}) == {"recorded": "at-open"}
        assert records(state).count("at-open") == 1
        # Revoked mid-stream: the call whose frame finds the session revoked is answered
        # "not run" (UNAUTHENTICATED), so even a non-idempotent one goes again, once, on a
        # new stream with a new session. (What was in flight: see the next test.)
        evict_sessions(target)
        assert client.call("system.echo", {"again": True}) == {"again": True}
        evict_sessions(target)
        assert client.call("acme.record", {"id": "mid-stream", "ms": 0}) == {
            "recorded": "mid-stream"
        }
        assert records(state).count("mid-stream") == 1


def test_a_session_revoked_before_any_answer_resends_nothing_that_may_have_run(
    served: tuple[str, Path],
) -> None:
    """The stream was accepted and its first call is running when its session is revoked:
    the stream ends UNAUTHENTICATED without having answered anything. That is no refusal at
    open (the sidecar accepted the stream), so the non-idempotent call raises rather than
    running a second time; an idempotent one goes again on a new stream."""
    target, state = served
    with sdk.Client(target) as client:
        outcome: list[Any] = []

        def cut() -> None:
            try:
                outcome.append(client.call("acme.record", {"id": "unanswered", "ms": 3000}))
            except sdk.SomaError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=cut)
        thread.start()
        wait_until(lambda: records(state).count("unanswered") == 1, what="the first call to run")
        stream = client._stream
        assert stream is not None and stream.accepted
        evict_sessions(target)
        # Its frame finds the session revoked, which ends the stream; then it goes again.
        assert client.call("system.echo", {"n": 1}) == {"n": 1}
        thread.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], sdk.Unavailable), outcome
        assert records(state).count("unanswered") == 1


async def test_a_session_revoked_before_any_answer_resends_nothing_async(
    served: tuple[str, Path],
) -> None:
    """The same for `sdk.AsyncClient`."""
    target, state = served
    async with sdk.AsyncClient(target) as client:
        cut = asyncio.create_task(client.call("acme.record", {"id": "unanswered-a", "ms": 3000}))
        await asyncio.to_thread(
            wait_until,
            lambda: records(state).count("unanswered-a") == 1,
            10,
            "the first call to run",
        )
        stream = client._stream
        assert stream is not None and stream.accepted
        await asyncio.to_thread(evict_sessions, target)
        assert await client.call("system.echo", {"n": 2}) == {"n": 2}
        with pytest.raises(sdk.Unavailable):
            await cut
        assert records(state).count("unanswered-a") == 1
