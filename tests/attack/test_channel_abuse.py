"""What a runtime's channel must withstand from its own callers and from the processes around
it: a flood of refused calls costs a bounded number of log lines, and a session that leaves
the runtime's process tree is refused from its first call.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Iterator

import grpc
import pytest

from sdk import protocol
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from tests.attack import h2, tally
from tests.attack.cluster import Cluster
from tests.helpers import health_status, wait_until

FLOOD = 400


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(
        tmp_path_factory.mktemp("abuse"), {"alpha": ["system.*"], "beta": ["system.*"]}
    ).start()
    yield cluster
    cluster.stop()


def test_calls_denied_under_ops_of_the_caller_s_choosing_cost_a_few_lines(
    cluster: Cluster,
) -> None:
    """Each op a new name: the denials are aggregated per runtime, not per op, and the lines
    still account for every one of them, with a bounded sample of the ops."""
    started = time.monotonic()
    ops = [f"nope.op{n}" for n in range(FLOOD)]
    frames = [
        pb.StreamRequest(id=n, call=pb.StimulateRequest(op=op, input_json=b"{}"))
        for n, op in enumerate(ops)
    ]
    code, answers = cluster.relay("alpha").stream(
        [frame.SerializeToString() for frame in frames], half_close=True, timeout=30
    )
    assert code == "OK"
    refused = [pb.StreamResponse.FromString(answer).error.code for answer in answers]
    assert refused == ["PERMISSION_DENIED"] * FLOOD
    tally.count("attacks", "denied calls under distinct ops")

    def denied() -> list[dict[str, object]]:
        return [e for e in cluster.run.events("denied") if e.get("runtime") == "alpha"]

    def accounted() -> int:
        return sum(1 + int(str(e.get("repeated", 0))) for e in denied())

    # The held-back denials come out with the next line the interval allows (10 s).
    wait_until(lambda: accounted() == FLOOD, timeout=30, what="a line counting every denial")
    lines = denied()
    # A burst of 5, then a line per 10 s interval (RepeatedWarnings' defaults).
    assert len(lines) <= 5 + math.ceil((time.monotonic() - started) / 10), [
        e.get("op") for e in lines
    ]
    summary = lines[-1]
    sample = summary["ops"]
    assert isinstance(sample, list)
    assert 0 < len(sample) <= 8
    assert set(sample) <= set(ops)
    assert cluster.relay("alpha").serves()


ECHO = pb.StimulateRequest(op="system.echo", input_json=b'{"n":1}')


def first_call_status(target: str, session: str, stream: bool) -> grpc.StatusCode:
    """The status of the first call of a new connection, carrying `session`: a unary
    `Stimulate`, or a `Stream` with one call on it."""
    metadata = protocol.bearer_metadata(session)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SidecarStub(channel)
        try:
            if stream:
                frames = iter([pb.StreamRequest(id=1, call=ECHO)])
                answers = list(stub.Stream(frames, metadata=metadata, timeout=10))
                assert answers[0].reply.ok
            else:
                assert stub.Stimulate(ECHO, metadata=metadata, timeout=10).ok
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def test_a_session_handed_out_of_the_runtime_s_tree_is_refused_from_its_first_call(
    cluster: Cluster,
) -> None:
    """The runtime hands its session to a process outside its tree (this one): the session
    works only from the runtime's tree, so the very first call with it from here, unary or
    on a stream, is UNAUTHENTICATED, while the runtime goes on using it."""
    relay = cluster.relay("alpha")
    session = relay.session()
    target = f"unix://{cluster.grpc_socket('alpha')}"
    for stream in (False, True):
        assert first_call_status(target, session, stream) == grpc.StatusCode.UNAUTHENTICATED
        tally.count("attacks", "calls with a session leaked out of its runtime's tree")
    # Health and reflection reach no organ: they still answer any process of the user.
    assert health_status(target) == "SERVING"
    # The runtime itself, with the same session, on connections of its own.
    code, reply = relay.raw("/soma.v1.Sidecar/Stimulate", ECHO.SerializeToString())
    assert code == "OK"
    assert reply is not None and pb.StimulateResponse.FromString(reply).ok
    assert relay.serves()
    refusals = [e for e in cluster.run.events("connection_refused") if e.get("runtime") == "alpha"]
    assert refusals and "not the runtime's process" in str(refusals[0]["reason"])


HEALTH = b"/grpc.health.v1.Health/Check"


def test_processes_outside_the_tree_never_hold_the_runtime_s_connections(
    cluster: Cluster,
) -> None:
    """More idle HTTP/2 connections from outside the runtime's tree than a socket takes (32):
    none of them is the runtime's, so a new connection of the runtime's is still served."""
    path = cluster.grpc_socket("beta")
    squatters = []
    try:
        for _ in range(40):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            squatters.append(sock)
            sock.connect(path)
            sock.sendall(h2.connection_start())
        tally.count("attacks", "connections squatting a runtime's socket")
        answer, _ = cluster.relay("beta").exchange(
            path, h2.connection_start() + h2.grpc_request(HEALTH, b"")
        )
        assert h2.HEADERS in h2.frame_types(answer)
    finally:
        for sock in squatters:
            sock.close()
    assert cluster.relay("beta").serves()
