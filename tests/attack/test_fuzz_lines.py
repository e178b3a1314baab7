"""Fuzz the JSON-line sockets (`soma_runtime.jsonline`): a runtime's handshake socket, the
supervisor's control socket and the sidecar's admin socket.

Every complete line shorter than the line limit must get exactly one answer line, a JSON
object (an error for anything that is not a valid request, never `internal`); anything else
(over-long lines, bytes without a newline) may instead close the connection. Either way the
server keeps answering the next client.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from soma_runtime import jsonline
from tests.attack import tally
from tests.attack.cluster import Cluster
from tests.attack.scale import fuzz_settings
from tests.attack.sockets import send_and_read
from tests.attack.strategies import JSON, KEYS, Bytes, mutated
from tests.helpers import Process, SupervisorRun, wait_until

DEEP = [b"[" * 60000, b'{"a":' * 12000]


@dataclass(frozen=True, slots=True)
class Target:
    path: Path
    probe: Callable[[], bool]  # the server still answers a well-formed request correctly
    requests: st.SearchStrategy[Any]  # well-formed requests, to mutate
    # Sends bytes on a fresh connection and returns what came back before the server closed
    # it (or went quiet for longer than its idle timeout).
    exchange: Callable[[bytes], bytes]


def answers(path: Path, request: dict[str, Any], check: Callable[[dict[str, Any]], bool]) -> bool:
    try:
        return check(jsonline.request_sync(path, request, timeout=5.0))
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("fuzz-lines"), {"alpha": ["system.*"]}).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A supervised-mode sidecar whose parent is this test: its admin socket accepts only its
    parent, so this is the only way to reach the admin protocol's parser."""
    tmp = tmp_path_factory.mktemp("fuzz-admin")
    config = SupervisorRun.write(tmp, "")
    sidecar = Process(
        [sys.executable, "-m", "soma_cli", "sidecar", "--supervised", "--config", str(config)],
        tmp / "sidecar.log",
    )
    path = tmp / "run" / "admin.sock"
    try:
        wait_until(
            lambda: sidecar.proc.poll() is not None or answers(path, {"op": "ping"}, ok),
            20,
            "the admin socket",
        )
        assert sidecar.proc.poll() is None, sidecar.output()
        yield path
    finally:
        assert sidecar.stop() == 0, sidecar.output()


def ok(answer: dict[str, Any]) -> bool:
    return answer.get("ok") is True


TOKEN = st.one_of(st.text(max_size=80), st.just("0" * 64), JSON)
REGISTER = st.fixed_dictionaries(
    {
        "op": st.just("register"),
        "runtime": st.sampled_from(["fz-a", "fz-b"]),
        "token_sha256": st.just("ab" * 32),
        "pid": st.one_of(st.none(), st.integers(1, 2**22)),
        "allow": st.lists(st.sampled_from(["system.*", "*", "vault.store"]), max_size=3),
    }
)
ADMIN_REQUESTS = st.one_of(
    REGISTER,
    st.fixed_dictionaries({"op": st.just("unregister"), "runtime": st.sampled_from(["fz-a"])}),
    st.just({"op": "ping"}),
    st.just({"op": "status"}),
)


def targets(cluster: Cluster, admin: Path) -> dict[str, Target]:
    auth = cluster.auth_socket("alpha")
    control = cluster.run.run_dir / "supervisor.sock"
    alpha = cluster.relay("alpha")
    return {
        # From inside alpha's process tree: anyone else is refused before a byte is read.
        "handshake": Target(
            auth,
            lambda: alpha.handshake_refusal() is None,
            st.fixed_dictionaries({"token": TOKEN}),
            lambda data: alpha.exchange(str(auth), data, jsonline.IDLE_TIMEOUT + 5)[0],
        ),
        "supervisor": Target(
            control,
            lambda: answers(control, {"op": "status"}, ok),
            st.just({"op": "status"}),
            lambda data: exchange(control, data),
        ),
        "admin": Target(
            admin,
            lambda: answers(admin, {"op": "ping"}, ok),
            ADMIN_REQUESTS,
            lambda data: exchange(admin, data),
        ),
    }


def exchange(path: Path, data: bytes) -> bytes:
    """What the server answers to `data`, read until it closes the connection."""
    return send_and_read(path, data, jsonline.IDLE_TIMEOUT + 5)[0]


def one_line(data: bytes) -> bytes:
    return data.replace(b"\n", b" ") + b"\n"


@st.composite
def lines(draw: st.DrawFn, requests: st.SearchStrategy[Any]) -> Bytes:
    """One complete line, shorter than the limit."""
    kind = draw(st.sampled_from(["json", "request", "bytes", "deep", "long"]))
    if kind == "json":
        body = json.dumps(draw(JSON)).encode()
    elif kind == "request":
        body = json.dumps(draw(mutated(requests))).encode()
    elif kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "deep":
        depth = draw(st.integers(1, 20000))
        body = draw(st.sampled_from([b"[" * depth, b'{"k":' * (depth // 5 + 1)]))
    else:
        body = json.dumps({draw(KEYS): "x" * draw(st.integers(1000, 60000))}).encode()
    return Bytes(one_line(body)[: jsonline.MAX_LINE - 1].rstrip(b"\n") + b"\n")


def assert_answered(name: str, data: bytes, answer: bytes) -> None:
    replies = answer.splitlines()
    assert len(replies) == 1, (name, data[:60], answer[:500])
    reply = json.loads(replies[0])
    assert isinstance(reply, dict) and "ok" in reply, (name, reply)
    assert reply.get("error") != "internal", (name, data[:60], reply)


@pytest.mark.parametrize("name", ["handshake", "supervisor", "admin"])
def test_every_complete_line_gets_one_typed_answer(
    cluster: Cluster, admin: Path, name: str
) -> None:
    target = targets(cluster, admin)[name]

    @fuzz_settings(short=40, long=1500, shrink=False)
    @given(data=lines(target.requests))
    @example(data=Bytes(DEEP[0] + b"\n"))
    @example(data=Bytes(DEEP[1] + b"\n"))
    @example(data=Bytes(b'{"token": "\\ud800"}\n'))
    def case(data: Bytes) -> None:
        tally.count("fuzz", f"{name} lines")
        assert_answered(name, data.data, target.exchange(data.data))
        assert target.probe(), f"the {name} socket stopped answering"

    case()


@pytest.mark.parametrize("name", ["handshake", "supervisor", "admin"])
def test_any_byte_stream_leaves_the_server_answering(
    cluster: Cluster, admin: Path, name: str
) -> None:
    """Several lines, no newline at all, or more than the line limit: the connection may be
    closed, but the server answers the next client."""
    target = targets(cluster, admin)[name]
    streams = st.one_of(
        st.binary(max_size=2000).map(Bytes),
        st.lists(lines(target.requests), min_size=2, max_size=4).map(
            lambda many: Bytes(b"".join(line.data for line in many))
        ),
        st.integers(jsonline.MAX_LINE, 3 * jsonline.MAX_LINE).map(lambda n: Bytes(b"7" * n)),
    )

    @fuzz_settings(short=20, long=800, shrink=False)
    @given(data=streams)
    @example(data=Bytes(b"[" * 70000))
    def case(data: Bytes) -> None:
        tally.count("fuzz", f"{name} byte streams")
        target.exchange(data.data)
        assert target.probe(), f"the {name} socket stopped answering"

    case()
