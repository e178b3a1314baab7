"""A stream the sidecar never accepts is given up and replaced, and nothing is sent on it.

The stand-in below plays a sidecar whose first stream lands on a channel server that is
dying (its grpcio main loop crashed): the stream is held open, never accepted and never
answered. Without a bound the call would wait out its whole deadline (30 s by default).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import sdk
from sdk import protocol
from sdk._core import ACCEPT_TIMEOUT_S
from sdk.protocol.soma.v1 import sidecar_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Sidecar"].full_name


class HoldsTheFirstStream:
    """Holds its first stream unaccepted (reading, to see whether any frame comes); serves
    every later one the way a sidecar does: accepted first, then an echo per call."""

    def __init__(self) -> None:
        self.streams = 0
        self.frames_on_held: list[pb.StreamRequest] = []
        self.held_ended = threading.Event()
        self._lock = threading.Lock()

    def stream(self, requests: Iterator[pb.StreamRequest], context: Any) -> Iterator[Any]:
        with self._lock:
            self.streams += 1
            first = self.streams == 1
        if first:
            try:
                self.frames_on_held.extend(requests)  # until the client gives the stream up
            except grpc.RpcError:
                pass
            finally:
                self.held_ended.set()
            return
        context.send_initial_metadata(((protocol.STREAM_ACCEPTED, "1"),))
        for request in requests:
            reply = pb.StimulateResponse(ok=True, output_json=request.call.input_json)
            yield pb.StreamResponse(id=request.id, reply=reply)


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[str, HoldsTheFirstStream]]:
    servicer = HoldsTheFirstStream()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.stream,
        request_deserializer=pb.StreamRequest.FromString,
        response_serializer=pb.StreamResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"Stream": handler})]
    )
    path = tmp_path / "sidecar.sock"
    server.add_insecure_port(f"unix:{path}")
    server.start()
    yield f"unix://{path}", servicer
    server.stop(None)


def check_given_up(servicer: HoldsTheFirstStream) -> None:
    assert servicer.held_ended.wait(10), "the held stream was never given up"
    assert servicer.streams == 2
    assert servicer.frames_on_held == []  # nothing was sent before acceptance


def test_a_stream_never_accepted_is_replaced_without_sending_on_it(
    stand_in: tuple[str, HoldsTheFirstStream],
) -> None:
    target, servicer = stand_in
    with sdk.Client(target, timeout=10 * ACCEPT_TIMEOUT_S) as client:
        assert client.call("system.echo", {"n": 1}) == {"n": 1}
        assert client.call("system.echo", {"n": 2}) == {"n": 2}
    check_given_up(servicer)


async def test_a_stream_never_accepted_is_replaced_without_sending_on_it_async(
    stand_in: tuple[str, HoldsTheFirstStream],
) -> None:
    target, servicer = stand_in
    async with sdk.AsyncClient(target, timeout=10 * ACCEPT_TIMEOUT_S) as client:
        assert await client.call("system.echo", {"n": 1}) == {"n": 1}
        assert await client.call("system.echo", {"n": 2}) == {"n": 2}
    check_given_up(servicer)
