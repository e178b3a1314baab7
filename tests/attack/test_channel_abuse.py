"""What a runtime's channel must withstand from its own callers and from the processes around
it: a flood of refused calls costs a bounded number of log lines, and a session that leaves
the runtime's process tree is refused from its first call.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from tests.attack import tally
from tests.attack.cluster import Cluster
from tests.helpers import wait_until

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
    assert len(lines) <= 6, [e.get("op") for e in lines]
    summary = lines[-1]
    sample = summary["ops"]
    assert isinstance(sample, list)
    assert 0 < len(sample) <= 8
    assert set(sample) <= set(ops)
    assert cluster.relay("alpha").serves()
