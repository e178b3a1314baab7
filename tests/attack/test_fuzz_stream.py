"""Fuzz the Stream RPC from inside a runtime's own authenticated channel (through its relay):
frames with random and duplicate ids, cancels of ids never sent, timeouts that are no duration
(negative, NaN, infinite, huge, subnormal), calls with random ops and inputs, frames that are
not a StreamRequest, and a client that half-closes or goes away after any frame.

After every case the stream must have kept its contract (sidecar.proto): one answer per call
frame, an INVALID_ARGUMENT end at the first undecodable frame, no call answered with a sidecar
failure; and the same channel (a new stream, through the SDK) and another runtime's channel
must still serve. Over the run, the sidecar's memory must stay bounded.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hypothesis import example, given
from hypothesis import strategies as st

from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from tests.attack import tally
from tests.attack.cluster import Cluster
from tests.attack.scale import fuzz_settings
from tests.attack.strategies import JSON, TEXT, mutated_bytes

OPS = ["system.echo", "system.ping", "acme.greet", "acme.slow", "acme.fail", "nope.nope", ""]
ODD_TIMEOUTS = [-1.0, -0.0, math.nan, math.inf, -math.inf, 1e308, 5e-324, -1e-300]
# Answers a call may get; UNKNOWN and INTERNAL would be the sidecar failing.
CALL_ERRORS = {
    "INVALID_ARGUMENT",
    "PERMISSION_DENIED",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "NOT_FOUND",
    "UNIMPLEMENTED",
}
RSS_GROWTH_MB = 40  # after warm-up, over the whole run


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(
        tmp_path_factory.mktemp("fuzz-stream"),
        {"alpha": ["system.*", "acme.*"], "beta": ["*"]},
    ).start()
    yield cluster
    cluster.stop()


def sidecar_rss_mb(cluster: Cluster) -> float:
    status = Path(f"/proc/{cluster.run.child('sidecar')['pid']}/status").read_text()
    kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(kb) / 1024


IDS = st.one_of(st.integers(0, 4), st.integers(0, 2**64 - 1))  # small ids collide
TIMEOUTS = st.one_of(
    st.just(0.0),
    st.floats(0.001, 5.0),
    st.sampled_from(ODD_TIMEOUTS),
    st.floats(allow_nan=True, allow_infinity=True),
)


@st.composite
def call_frame(draw: st.DrawFn) -> bytes:
    op = draw(st.one_of(st.sampled_from(OPS), TEXT))
    if op == "acme.slow":
        value = {"ms": draw(st.integers(0, 200))}
    else:
        value = draw(st.one_of(JSON, st.dictionaries(TEXT, JSON, max_size=3)))
    data = draw(st.one_of(st.just(json.dumps(value).encode()), st.binary(max_size=32)))
    request = pb.StimulateRequest(op=op, input_json=data)
    frame = pb.StreamRequest(id=draw(IDS), call=request, timeout_s=draw(TIMEOUTS))
    return frame.SerializeToString()


@st.composite
def hang_frame(draw: st.DrawFn) -> bytes:
    """A call that never ends by itself: a short deadline ends it (a cancel may come first)."""
    request = pb.StimulateRequest(op="acme.hang", input_json=b'{"id": "fuzz"}')
    timeout_s = draw(st.floats(0.001, 0.3))
    return pb.StreamRequest(id=draw(IDS), call=request, timeout_s=timeout_s).SerializeToString()


FRAMES = st.one_of(
    call_frame(),
    call_frame(),
    hang_frame(),
    st.builds(lambda i: pb.StreamRequest(id=i, cancel=True).SerializeToString(), IDS),
    st.builds(lambda i, t: pb.StreamRequest(id=i, timeout_s=t).SerializeToString(), IDS, TIMEOUTS),
    call_frame().flatmap(mutated_bytes),
    st.binary(max_size=40),
)


def decoded(frame: bytes) -> pb.StreamRequest | None:
    """What the sidecar reads from `frame` (the same protobuf library); None: undecodable."""
    try:
        return pb.StreamRequest.FromString(frame)
    except DecodeError:
        return None


def check_answers(frames: list[bytes], code: str, answers: list[bytes]) -> None:
    """The stream's contract for a half-closed stream of `frames`."""
    requests = []
    for frame in frames:
        request = decoded(frame)
        if request is None:
            assert code == "INVALID_ARGUMENT", (code, frame)
            break
        requests.append(request)
    else:
        assert code == "OK", code
    expected = Counter(r.id for r in requests if r.WhichOneof("kind") != "cancel")
    got: Counter[int] = Counter()
    errors: dict[int, str] = {}
    for data in answers:
        answer = pb.StreamResponse.FromString(data)
        got[answer.id] += 1
        if answer.WhichOneof("result") == "error":
            assert answer.error.code in CALL_ERRORS, answer
            errors[answer.id] = answer.error.code
    # A timeout that is no duration is refused, never read as "no deadline".
    for r in requests:
        attributable = expected[r.id] == 1 and got[r.id] == 1
        if r.WhichOneof("kind") == "call" and attributable and not 0.0 <= r.timeout_s < math.inf:
            assert errors.get(r.id) == "INVALID_ARGUMENT", (r.timeout_s, errors.get(r.id))
    if code == "OK":
        assert got == expected, (got, expected)
    else:  # ended at an undecodable frame: calls before it may have been cut off
        assert not got - expected, (got, expected)


def serves(cluster: Cluster) -> None:
    assert cluster.relay("alpha").serves(timeout=5), "the fuzzed channel stopped serving"
    assert cluster.relay("beta").serves(timeout=5), "another runtime's channel stopped serving"


def test_fuzzed_stream_frames_keep_the_contract_and_every_channel_serving(
    cluster: Cluster,
) -> None:
    relay = cluster.relay("alpha")
    for _ in range(20):  # warm-up: the first streams allocate what every later one reuses
        assert (
            relay.stream(
                [
                    pb.StreamRequest(
                        id=1, call=pb.StimulateRequest(op="system.echo", input_json=b"{}")
                    ).SerializeToString()
                ],
                half_close=True,
            )[0]
            == "OK"
        )
    before = sidecar_rss_mb(cluster)

    @fuzz_settings(short=60, long=2000, shrink=False)
    @given(frames=st.lists(FRAMES, max_size=12), half_close=st.booleans())
    @example(
        frames=[
            pb.StreamRequest(
                id=1, call=pb.StimulateRequest(op="system.echo", input_json=b"{}"), timeout_s=t
            ).SerializeToString()
            for t in ODD_TIMEOUTS
        ],
        half_close=True,
    )
    def case(frames: list[bytes], half_close: bool) -> None:
        tally.count("fuzz", "stream frame sequences")
        code, answers = relay.stream(frames, half_close, timeout=10)
        if half_close:
            check_answers(frames, code, answers)
        serves(cluster)

    case()
    growth = sidecar_rss_mb(cluster) - before
    print(f"sidecar RSS: {before:.1f} MB after warm-up, {growth:+.1f} MB over the fuzzing")
    assert growth < RSS_GROWTH_MB, f"the sidecar grew by {growth:.1f} MB"
