"""The Stream RPC of a real `soma sidecar` over its real socket, driven with the generated stub:
calls multiplexed by id, answered as they complete, each refused or cancelled on its own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from sdk import protocol
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from tests.conftest import TEST_ORGANS
from tests.helpers import (
    Process,
    evict_sessions,
    records,
    session_metadata,
    start_sidecar,
    wait_until,
)

Sidecar = tuple[Process, str]
Metadata = tuple[tuple[str, str], ...]
STREAM = "/soma.v1.Sidecar/Stream"


def call(call_id: int, op: str, value: Any = None, timeout_s: float = 0.0) -> pb.StreamRequest:
    data = json.dumps(value if value is not None else {}).encode()
    request = pb.StimulateRequest(op=op, input_json=data)
    return pb.StreamRequest(id=call_id, call=request, timeout_s=timeout_s)


def cancel(call_id: int) -> pb.StreamRequest:
    return pb.StreamRequest(id=call_id, cancel=True)


def output(answer: pb.StreamResponse) -> Any:
    assert answer.WhichOneof("result") == "reply", answer
    return json.loads(answer.reply.output_json)


def error(answer: pb.StreamResponse) -> str:
    assert answer.WhichOneof("result") == "error", answer
    return answer.error.code


def own_channel(target: str, *options: tuple[str, Any]) -> grpc.aio.Channel:
    """A channel on its own connection (grpc shares connections between like channels)."""
    return grpc.aio.insecure_channel(
        target, options=[("grpc.use_local_subchannel_pool", 1), *options]
    )


@asynccontextmanager
async def stream(
    target: str, metadata: Metadata | None = None
) -> AsyncIterator[grpc.aio.StreamStreamCall[pb.StreamRequest, pb.StreamResponse]]:
    async with own_channel(target) as channel:
        md = session_metadata(target) if metadata is None else metadata
        yield pb_grpc.SidecarStub(channel).Stream(metadata=md)


async def answers(
    rpc: grpc.aio.StreamStreamCall[pb.StreamRequest, pb.StreamResponse], count: int
) -> list[pb.StreamResponse]:
    """The next `count` answers, in the order they arrive."""
    got = []
    async with asyncio.timeout(20):
        for _ in range(count):
            answer = await rpc.read()
            assert answer is not grpc.aio.EOF, "the stream ended"
            got.append(answer)
    return got


async def ended_with(rpc: grpc.aio.StreamStreamCall[Any, Any]) -> grpc.StatusCode:
    """The status the stream ends with, once every answer before it is read."""
    async with asyncio.timeout(20):
        try:
            while (await rpc.read()) is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return await rpc.code()


def hang_log(tmp_path: Path) -> list[str]:
    path = tmp_path / "state" / "acme-hangs.txt"
    return path.read_text().splitlines() if path.exists() else []


def wait_for_lines(tmp_path: Path, lines: Iterable[str]) -> None:
    wanted = set(lines)
    wait_until(lambda: wanted <= set(hang_log(tmp_path)), what=f"the organ to log {wanted}")


async def test_answers_carry_their_ids_and_come_as_calls_complete(sidecar: Sidecar) -> None:
    _, target = sidecar
    async with stream(target) as rpc:
        await rpc.write(call(7, "acme.slow", {"ms": 400}))
        await rpc.write(call(1 << 63, "system.echo", {"n": 1}))
        await rpc.write(call(0, "acme.greet", {"name": "Ada"}))
        got = await answers(rpc, 3)
        assert [a.id for a in got[:2]] in ([1 << 63, 0], [0, 1 << 63])
        assert got[2].id == 7 and output(got[2]) == {"slept_ms": 400}
        by_id = {a.id: a for a in got}
        assert output(by_id[1 << 63]) == {"n": 1}
        assert output(by_id[0])["greeting"] == "Howdy, Ada!"
        assert output(by_id[0])["runtime"] == "local"  # the caller, from the channel
        assert by_id[0].reply.ok and by_id[0].reply.latency_ms > 0
        await rpc.done_writing()
        assert await ended_with(rpc) == grpc.StatusCode.OK


async def test_cancel_ends_the_organ_task_and_answers_cancelled(
    sidecar: Sidecar, tmp_path: Path
) -> None:
    _, target = sidecar
    async with stream(target) as rpc:
        await rpc.write(call(1, "acme.hang", {"id": "a"}))
        await rpc.write(call(2, "acme.hang", {"id": "b"}))
        await asyncio.to_thread(wait_for_lines, tmp_path, ["started a", "started b"])
        await rpc.write(cancel(2))
        (answer,) = await answers(rpc, 1)
        assert answer.id == 2 and error(answer) == "CANCELLED"
        await asyncio.to_thread(wait_for_lines, tmp_path, ["cancelled b"])
        assert "cancelled a" not in hang_log(tmp_path)
        await rpc.write(cancel(99))  # not in flight: ignored
        await rpc.write(call(3, "system.echo", {"still": "up"}))
        (answer,) = await answers(rpc, 1)
        assert answer.id == 3 and output(answer) == {"still": "up"}
    # The client going away cancels what the stream still runs.
    await asyncio.to_thread(wait_for_lines, tmp_path, ["cancelled a"])


async def test_a_call_whose_timeout_expires_is_cancelled_and_its_neighbours_complete(
    sidecar: Sidecar, tmp_path: Path
) -> None:
    _, target = sidecar
    async with stream(target) as rpc:
        await rpc.write(call(1, "acme.hang", {"id": "t"}, timeout_s=0.3))
        await rpc.write(call(2, "acme.slow", {"ms": 100}, timeout_s=10))
        await rpc.write(call(3, "system.echo", {"x": 3}, timeout_s=10))
        got = {a.id: a for a in await answers(rpc, 3)}
        assert error(got[1]) == "DEADLINE_EXCEEDED"
        assert output(got[2]) == {"slept_ms": 100} and output(got[3]) == {"x": 3}
        await asyncio.to_thread(wait_for_lines, tmp_path, ["started t", "cancelled t"])


async def test_per_call_errors_answer_that_call_and_the_stream_lives_on(
    sidecar: Sidecar,
) -> None:
    _, target = sidecar
    deep: Any = []
    for _ in range(100):
        deep = [deep]
    async with stream(target) as rpc:
        bad_json = pb.StimulateRequest(op="system.echo", input_json=b"{nope")
        await rpc.write(pb.StreamRequest(id=1, call=bad_json))
        await rpc.write(call(2, "system.echo", {"deep": deep}))
        await rpc.write(call(3, "acme.fail"))
        await rpc.write(call(4, "acme.bad_output"))
        await rpc.write(call(5, "nope.nothing"))
        await rpc.write(call(6, "acme.greet", [1]))
        await rpc.write(pb.StreamRequest(id=7))  # neither call nor cancel
        await rpc.write(call(8, "system.echo", {"ok": True}))
        got = {a.id: a for a in await answers(rpc, 8)}
        assert error(got[1]) == "INVALID_ARGUMENT" and "input_json" in got[1].error.message
        assert error(got[2]) == "INVALID_ARGUMENT" and "deep" in got[2].error.message
        assert output(got[3])["error"] == "Internal" and not got[3].reply.ok
        assert "hunter2" not in got[3].reply.output_json.decode()
        assert output(got[4])["error"] == "Internal"
        assert output(got[5]) == {"error": "UnsupportedOperation", "op": "nope.nothing"}
        assert output(got[6])["error"] == "InvalidInput"
        assert error(got[7]) == "INVALID_ARGUMENT"
        assert output(got[8]) == {"ok": True}
        await rpc.done_writing()
        assert await ended_with(rpc) == grpc.StatusCode.OK


async def test_an_output_too_large_for_a_message_is_that_calls_error(tmp_path: Path) -> None:
    proc, target = start_sidecar(tmp_path, TEST_ORGANS, "max_message_bytes = 65536\n")
    try:
        async with stream(target) as rpc:
            await rpc.write(call(1, "acme.blob", {"size": 70000}))
            await rpc.write(call(2, "acme.blob", {"size": 10}))
            got = {a.id: a for a in await answers(rpc, 2)}
            assert output(got[1])["error"] == "Internal"
            assert "limit" in output(got[1])["message"]
            assert output(got[2]) == {"blob": "x" * 10}
    finally:
        assert proc.stop() == 0, proc.output()


async def test_a_duplicate_id_in_flight_is_refused_and_the_first_call_kept(
    sidecar: Sidecar, tmp_path: Path
) -> None:
    _, target = sidecar
    async with stream(target) as rpc:
        await rpc.write(call(5, "acme.hang", {"id": "first"}))
        await asyncio.to_thread(wait_for_lines, tmp_path, ["started first"])
        await rpc.write(call(5, "acme.hang", {"id": "second"}))
        (answer,) = await answers(rpc, 1)
        assert answer.id == 5 and error(answer) == "INVALID_ARGUMENT"
        assert "already in flight" in answer.error.message
        await rpc.write(cancel(5))
        (answer,) = await answers(rpc, 1)
        assert answer.id == 5 and error(answer) == "CANCELLED"
        await rpc.write(call(5, "system.echo", {"again": 5}))  # answered: the id is free
        (answer,) = await answers(rpc, 1)
        assert output(answer) == {"again": 5}
    assert "started second" not in hang_log(tmp_path)


async def test_a_stream_without_a_valid_session_is_refused(sidecar: Sidecar) -> None:
    _, target = sidecar
    for metadata in [(), (("authorization", "Bearer " + "0" * 64),)]:
        async with stream(target, metadata) as rpc:
            assert protocol.STREAM_ACCEPTED not in dict(await rpc.initial_metadata() or ())
            assert await ended_with(rpc) == grpc.StatusCode.UNAUTHENTICATED


async def test_an_accepted_stream_says_so_before_any_frame(sidecar: Sidecar) -> None:
    """The SDK sends nothing until it has this: a stream that ends without it ran nothing."""
    _, target = sidecar
    async with stream(target) as rpc:
        async with asyncio.timeout(10):
            assert protocol.STREAM_ACCEPTED in dict(await rpc.initial_metadata())
        await rpc.write(call(1, "system.echo", {"after": "accepted"}))
        assert output((await answers(rpc, 1))[0]) == {"after": "accepted"}


@pytest.mark.parametrize("timeout_s", [-1.0, float("nan"), float("inf"), float("-inf")])
async def test_a_timeout_that_is_no_duration_is_that_calls_invalid_argument(
    sidecar: Sidecar, tmp_path: Path, timeout_s: float
) -> None:
    """Negative, NaN or infinite timeout_s is refused rather than read as "no deadline"
    (which it was: `timeout_s > 0` is false for NaN); 0 means none, and a huge finite one
    is a deadline that does not come."""
    _, target = sidecar
    async with stream(target) as rpc:
        record = {"id": f"bad-timeout-{timeout_s}", "ms": 0}
        await rpc.write(call(1, "acme.record", record, timeout_s))
        await rpc.write(call(2, "system.echo", {"n": 2}, timeout_s=1e308))
        got = {a.id: a for a in await answers(rpc, 2)}
        assert error(got[1]) == "INVALID_ARGUMENT" and "timeout_s" in got[1].error.message
        assert output(got[2]) == {"n": 2}
        assert record["id"] not in records(tmp_path / "state")


async def test_a_session_revoked_mid_stream_ends_it_and_its_calls(
    sidecar: Sidecar, tmp_path: Path
) -> None:
    _, target = sidecar
    async with stream(target) as rpc:
        await rpc.write(call(1, "acme.hang", {"id": "r"}))
        await asyncio.to_thread(wait_for_lines, tmp_path, ["started r"])
        await rpc.write(call(2, "system.echo"))
        assert output((await answers(rpc, 1))[0]) == {}
        evict_sessions(target)
        await rpc.write(call(3, "system.echo"))
        # The frame that finds it revoked is answered "not run", then the stream ends.
        assert error((await answers(rpc, 1))[0]) == "UNAUTHENTICATED"
        assert await ended_with(rpc) == grpc.StatusCode.UNAUTHENTICATED
        await asyncio.to_thread(wait_for_lines, tmp_path, ["cancelled r"])


async def test_an_undecodable_frame_ends_the_stream_with_invalid_argument(
    sidecar: Sidecar,
) -> None:
    _, target = sidecar
    async with own_channel(target) as channel:
        raw = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)
        rpc = raw(metadata=session_metadata(target))
        await rpc.write(call(1, "system.echo", {"a": 1}).SerializeToString())
        got = await rpc.read()
        assert pb.StreamResponse.FromString(got).id == 1
        await rpc.write(b"\xff\xff\xff\xff")
        assert await ended_with(rpc) == grpc.StatusCode.INVALID_ARGUMENT
        assert "soma.v1.StreamRequest" in (await rpc.details() or "")
    async with stream(target) as rpc:  # the sidecar serves on
        await rpc.write(call(1, "system.ping"))
        assert output((await answers(rpc, 1))[0])["pong"] is True


async def test_a_client_that_never_reads_is_held_back_and_others_are_served(
    tmp_path: Path,
) -> None:
    """With 8 calls in flight at most, a client that sends 2000 calls of 64 KB answers and
    reads none gets a bounded number run (not 2000 answers, 128 MB, held in the sidecar),
    while another connection is served (300 round trips); once it reads, every call is
    answered. (With no bound, over 100 have run by the time the check starts.)"""
    total, size = 2000, 64 * 1024
    proc, target = start_sidecar(tmp_path, TEST_ORGANS, "stream_max_in_flight = 8\n")
    try:
        # No BDP probing: the client's receive window stays at its 64 KB default.
        async with own_channel(target, ("grpc.http2.bdp_probe", 0)) as channel:
            rpc = pb_grpc.SidecarStub(channel).Stream(metadata=session_metadata(target))

            async def send() -> None:
                for i in range(total):
                    await rpc.write(call(i, "acme.blob", {"size": size}))

            sender = asyncio.create_task(send())
            async with stream(target) as other:

                async def made() -> int:
                    await other.write(call(0, "acme.blobs"))
                    (answer,) = await answers(other, 1)
                    count: int = output(answer)["count"]
                    return count

                async with asyncio.timeout(20):
                    while await made() < 8:
                        pass
                # It runs no more: 8 calls in flight, and at most as many answers again that
                # the transport's windows take. (Whether its 2000 frames, 60 KB, all fit in
                # the sidecar's receive window depends on how far gRPC grew it: under load
                # they did, twice. What is bounded is what the sidecar runs and holds.)
                for _ in range(300):
                    count = await made()
                    assert count <= 16, f"{count} calls ran for a client reading nothing"
                got = await answers(rpc, total)
                assert sorted(a.id for a in got) == list(range(total))
                assert all(len(a.reply.output_json) > size for a in got)
                await sender
                assert await made() == total
    finally:
        assert proc.stop() == 0, proc.output()


async def test_stopping_the_sidecar_answers_calls_in_flight_then_ends_streams(
    tmp_path: Path,
) -> None:
    proc, target = start_sidecar(tmp_path, TEST_ORGANS)
    try:
        async with stream(target) as busy, stream(target) as idle:
            await busy.write(call(1, "acme.record", {"id": "busy", "ms": 500}))
            await idle.write(call(1, "system.ping"))
            await answers(idle, 1)
            await asyncio.to_thread(wait_until, lambda: "busy" in records(tmp_path / "state"))
            proc.signal(15)
            (answer,) = await answers(busy, 1)
            assert output(answer) == {"recorded": "busy"}
            assert await ended_with(busy) == grpc.StatusCode.UNAVAILABLE
            assert await ended_with(idle) == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.to_thread(proc.wait) == 0
    finally:
        proc.kill()


async def test_a_killed_sidecar_ends_its_streams_unavailable(tmp_path: Path) -> None:
    proc, target = start_sidecar(tmp_path, TEST_ORGANS)
    try:
        async with stream(target) as rpc:
            await rpc.write(call(1, "acme.hang", {"id": "k"}))
            await asyncio.to_thread(wait_for_lines, tmp_path, ["started k"])
            proc.signal(9)
            assert await ended_with(rpc) == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.kill()


@pytest.mark.parametrize("frames", [0, 3])
async def test_half_closing_ends_the_stream_once_every_call_is_answered(
    sidecar: Sidecar, frames: int
) -> None:
    _, target = sidecar
    async with stream(target) as rpc:
        for i in range(frames):
            await rpc.write(call(i, "acme.slow", {"ms": 50 * i}))
        await rpc.done_writing()
        got = await answers(rpc, frames)
        assert sorted(a.id for a in got) == list(range(frames))
        assert await ended_with(rpc) == grpc.StatusCode.OK


async def test_a_call_read_while_stopping_is_not_run_and_a_hung_call_ends_at_the_grace(
    tmp_path: Path,
) -> None:
    proc, target = start_sidecar(tmp_path, TEST_ORGANS, "grace_period = 1\n")
    try:
        async with stream(target) as rpc:
            await rpc.write(call(1, "acme.hang", {"id": "g"}))
            await asyncio.to_thread(wait_for_lines, tmp_path, ["started g"])
            proc.signal(15)
            await asyncio.to_thread(wait_until, lambda: '"stopping"' in proc.output())
            await rpc.write(call(2, "acme.hang", {"id": "late"}))
            (answer,) = await answers(rpc, 1)
            assert answer.id == 2 and error(answer) == "UNAVAILABLE"
            assert "not run" in answer.error.message
            ended = await ended_with(rpc)
            assert ended in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        await asyncio.to_thread(wait_for_lines, tmp_path, ["cancelled g"])
        assert "started late" not in hang_log(tmp_path)
        assert await asyncio.to_thread(proc.wait) == 0
    finally:
        proc.kill()
