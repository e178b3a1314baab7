"""`soma sidecar` as a real subprocess on a real socket, driven through both SDK clients."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import stat
import threading
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import sdk
from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sdk.protocol.soma.v1 import sidecar_pb2_grpc as pb_grpc
from tests.helpers import (
    SOMA,
    Process,
    health_status,
    session_metadata,
    start_sidecar,
    wait_until,
    write_config,
)

Sidecar = tuple[Process, str]


class RawStub:
    """The Sidecar service without the SDK, authenticated like a real client."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", 64 << 20)]
        )
        self._stub = pb_grpc.SidecarStub(self.channel)
        self._metadata = session_metadata(target)

    def Stimulate(self, request: pb.StimulateRequest, timeout: float = 10) -> pb.StimulateResponse:
        return self._stub.Stimulate(request, timeout=timeout, metadata=self._metadata)


def raw_stub(target: str) -> tuple[grpc.Channel, RawStub]:
    stub = RawStub(target)
    return stub.channel, stub


def test_blocking_client_calls_organs(sidecar: Sidecar) -> None:
    _, target = sidecar
    with sdk.Client(target) as client:
        assert client.call("system.echo", {"hello": ["world", 1, 2.5, None]}) == {
            "hello": ["world", 1, 2.5, None]
        }
        assert client.call("system.ping", {})["pong"] is True
        response = client.stimulate("system.echo", {"x": 1}, context={"trace_id": "t-1"})
        assert response.ok and response.latency_ms > 0 and response.error is None


def test_there_is_no_unauthenticated_way_in(sidecar: Sidecar, tmp_path: Path) -> None:
    _, target = sidecar
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SidecarStub(channel)
        for call, request in [
            (stub.Stimulate, pb.StimulateRequest(op="system.echo")),
            (stub.Describe, pb.DescribeRequest()),
            (stub.Search, pb.SearchRequest()),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with sdk.Client(target, token="0" * 64) as client, pytest.raises(sdk.Unauthenticated):
        client.call("system.echo", {})
    token_file = tmp_path / "run" / "sidecar.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    with sdk.Client(target, token=token_file.read_text().strip()) as client:
        assert client.call("system.echo", {"explicit": True}) == {"explicit": True}


def test_custom_organ_loaded_from_an_import_path_with_its_settings(sidecar: Sidecar) -> None:
    _, target = sidecar
    with sdk.Client(target) as client:
        assert client.call("acme.greet", {"name": "Ada"})["greeting"] == "Howdy, Ada!"
        assert client.call("manual.upper", {"text": "abc"}) == {"text": "ABC"}
        assert client.call("counter.add", {"a": 1, "b": 2}) == {"a": 3, "b": 1}


def test_typed_errors(sidecar: Sidecar) -> None:
    _, target = sidecar
    with sdk.Client(target) as client:
        with pytest.raises(sdk.UnsupportedOperation) as unsupported:
            client.call("nope.nothing", {})
        assert unsupported.value.payload == {"error": "UnsupportedOperation", "op": "nope.nothing"}
        with pytest.raises(sdk.InvalidInput) as invalid:
            client.call("acme.greet", {"name": 3})
        assert invalid.value.path == "$.name"
        with pytest.raises(sdk.OrganError) as internal:
            client.call("acme.fail", {})
        assert internal.value.kind == "Internal"
        assert "hunter2" not in str(internal.value)
        with pytest.raises(sdk.OrganError) as refused:
            client.call("acme.refuse", {"key": "k"})
        assert refused.value.payload["key"] == "k" and isinstance(refused.value, sdk.SomaError)
        # stimulate never raises for organ answers
        assert client.stimulate("acme.fail", {}).error == "Internal"


def test_empty_and_unknown_ops(sidecar: Sidecar) -> None:
    _, target = sidecar
    with sdk.Client(target) as client:
        assert client.stimulate("", {}).output == {"error": "UnsupportedOperation", "op": ""}
        assert client.stimulate("system.", {}).error == "UnsupportedOperation"


def test_bad_requests_get_clear_errors_and_the_sidecar_keeps_serving(sidecar: Sidecar) -> None:
    _, target = sidecar
    channel, stub = raw_stub(target)
    with channel, sdk.Client(target) as client:
        cases = {
            b"{not json": (grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"),
            b"\xff\xfe": (grpc.StatusCode.INVALID_ARGUMENT, "not UTF-8"),
            b'{"a": "\xc3"}': (grpc.StatusCode.INVALID_ARGUMENT, "not UTF-8"),
            b"[" * 100_000 + b"]" * 100_000: (grpc.StatusCode.INVALID_ARGUMENT, "deeper than"),
            json.dumps(nested(65)).encode(): (grpc.StatusCode.INVALID_ARGUMENT, "deeper than"),
            b"x" * (5 * 1024 * 1024): (grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        }
        for payload, (code, text) in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.Stimulate(
                    pb.StimulateRequest(op="system.echo", input_json=payload), timeout=10
                )
            assert info.value.code() == code, payload[:20]
            assert text in (info.value.details() or "")
            assert client.call("system.echo", {"still": "serving"}) == {"still": "serving"}

        for value in ([1, 2], "text", 3, None):
            reply = stub.Stimulate(
                pb.StimulateRequest(op="system.echo", input_json=json.dumps(value).encode())
            )
            assert not reply.ok
            assert json.loads(reply.output_json) == {
                "error": "InvalidInput",
                "path": "$",
                "message": "input must be a JSON object",
            }

        ok_depth = json.dumps(nested(63)).encode()
        reply = stub.Stimulate(pb.StimulateRequest(op="system.echo", input_json=ok_depth))
        assert reply.ok


def nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_oversized_input_through_the_sdk_is_invalid_request(sidecar: Sidecar) -> None:
    _, target = sidecar
    with sdk.Client(target) as client:
        with pytest.raises(sdk.InvalidRequest):
            client.call("system.echo", {"blob": "x" * (5 * 1024 * 1024)})
        assert client.call("system.ping", {})["pong"]


def test_output_that_is_not_json_is_internal(sidecar: Sidecar) -> None:
    _, target = sidecar
    with sdk.Client(target) as client:
        response = client.stimulate("acme.bad_output", {})
        assert response.error == "Internal"
        assert client.call("system.ping", {})["pong"]


def test_describe_and_search(sidecar: Sidecar) -> None:
    _, target = sidecar
    with sdk.Client(target) as client:
        cards = {card["name"]: card for card in client.describe()}
        assert set(cards) == {"system", "acme", "composite", "manual"}
        assert cards["composite"]["sub_organs"][0]["functions"][0]["name"] == "counter.add"
        found = client.search("add")
        assert [(m.organ, m.name) for m in found] == [("composite", "counter.add")]
        assert {m.name for m in client.search("", tag="math")} == {
            "counter.add",
            "composite.double",
        }
        assert client.search("zzz-nothing") == []


async def test_async_client(sidecar: Sidecar) -> None:
    _, target = sidecar
    async with sdk.AsyncClient(target) as client:
        assert await client.call("system.echo", {"a": 1}) == {"a": 1}
        results = await asyncio.gather(
            *(client.call("acme.greet", {"name": str(i)}) for i in range(20))
        )
        assert [r["greeting"] for r in results] == [f"Howdy, {i}!" for i in range(20)]
        with pytest.raises(sdk.InvalidInput):
            await client.call("acme.greet", {})
        with pytest.raises(sdk.UnsupportedOperation):
            await client.call("nope.x", {})
        assert [m.name for m in await client.search("greet")] == ["acme.greet"]
        assert len(await client.describe()) == 4


async def test_async_client_made_outside_the_loop_works_inside_it(sidecar: Sidecar) -> None:
    _, target = sidecar
    client = sdk.AsyncClient(target)
    assert (await client.stimulate("system.ping", {})).ok
    await client.close()


def test_overloaded_over_the_wire(sidecar: Sidecar) -> None:
    _, target = sidecar
    with sdk.Client(target) as client:
        threads, results = fill_slow_cap(client, 1000)
        with pytest.raises(sdk.Overloaded) as info:
            client.call("acme.slow", {"ms": 0})
        assert info.value.payload["queue_cap"] == 2
        for thread in threads:
            thread.join(10)
        assert results == [{"slept_ms": 1000}] * 2
        assert client.call("acme.slow", {"ms": 0}) == {"slept_ms": 0}


def test_health_and_reflection_serve_generic_tools(sidecar: Sidecar) -> None:
    _, target = sidecar
    assert health_status(target) == "SERVING"
    assert health_status(target, "soma.v1.Sidecar") == "SERVING"
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        services = {s.name for r in replies for s in r.list_services_response.service}
    assert {"soma.v1.Sidecar", "grpc.health.v1.Health"} <= services


def test_socket_is_0600_in_a_0700_directory(sidecar: Sidecar, tmp_path: Path) -> None:
    sock = tmp_path / "run" / "sidecar.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700


def fill_slow_cap(client: sdk.Client, ms: int) -> tuple[list[threading.Thread], list[object]]:
    """Start two slow calls (acme.slow's cap) and return once both are in flight."""
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(client.call("acme.slow", {"ms": ms})))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    wait_until(
        lambda: client.stimulate("acme.slow", {"ms": 0}).error == "Overloaded",
        what="both slow calls to be in flight",
    )
    return threads, results


def test_sigterm_lets_in_flight_calls_finish_then_removes_the_socket(tmp_path: Path) -> None:
    proc, target = start_sidecar(tmp_path, ["system", "tests.fixtures.organs:Acme"])
    with sdk.Client(target) as client:
        threads, results = fill_slow_cap(client, 800)
        proc.signal(signal.SIGTERM)
        for thread in threads:
            thread.join(10)
        code = proc.wait()
    assert results == [{"slept_ms": 800}] * 2
    assert code == 0, proc.output()
    # Sockets and token gone; the lock file stays, unlocked (see soma_runtime.runtime_lock).
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["soma.lock"]
    assert '"event": "stopped"' in proc.output()


def test_sigint_also_stops_cleanly(tmp_path: Path) -> None:
    proc, _ = start_sidecar(tmp_path, ["system"])
    proc.signal(signal.SIGINT)
    assert proc.wait() == 0
    assert not (tmp_path / "run" / "sidecar.sock").exists()


def test_a_stale_socket_is_replaced_and_a_live_one_is_not_stolen(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(run / "sidecar.sock"))
    stale.close()  # the file stays, nobody listens
    proc, target = start_sidecar(tmp_path, ["system"])
    try:
        # Another runtime directory (the same one is refused sooner: runtime_lock), same socket.
        config = (tmp_path / "soma.toml").read_text()
        second = write_config(
            tmp_path / "second.toml", config.replace('runtime_dir = "run"', 'runtime_dir = "run2"')
        )
        other = Process([SOMA, "sidecar", "--config", str(second)], tmp_path / "second.log")
        assert other.wait() == 2
        assert "in use by a running process" in other.output()
        assert health_status(target) == "SERVING"
    finally:
        assert proc.stop() == 0


def test_a_socket_directory_open_to_others_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o755)
    (tmp_path / "run").chmod(0o755)
    with pytest.raises(AssertionError, match="accessible to other users"):
        start_sidecar(tmp_path, ["system"])


def test_a_bad_config_exits_2_with_the_key(tmp_path: Path) -> None:
    config = tmp_path / "soma.toml"
    config.write_text('[sidecar]\nsocket = "s.sock"\norgans = ["nope"]\n')
    proc = Process([SOMA, "sidecar", "--config", str(config)], tmp_path / "log")
    assert proc.wait() == 2
    assert "sidecar.organs[0]" in proc.output()


NON_STANDARD_JSON = [
    b'{"x": NaN}',
    b'{"x": Infinity}',
    b'{"x": -Infinity}',
    b'{"x": 1e400}',
    b'{"x": [-1E400]}',
    b'{"key": "k", "data": "", "metadata": {"deep": [1, NaN]}}',
]


def test_nan_and_infinity_are_refused_at_the_wire_for_every_op(tmp_path: Path) -> None:
    """RFC 8259 JSON only: what no other parser reads never reaches an organ (stored, it
    would fail every later answer that contains it), whatever the op."""
    proc, target = start_sidecar(tmp_path, ["system", "vault", "tests.fixtures.organs:Acme"])
    try:
        channel, stub = raw_stub(target)
        with channel, sdk.Client(target) as client:
            ops = [
                function["name"]
                for card in client.describe()
                for function in [
                    *card["functions"],
                    *(f for sub in card["sub_organs"] for f in sub["functions"]),
                ]
            ]
            assert {"system.echo", "vault.store", "vault.list", "similarity.search"} <= set(ops)
            for op in ops:
                for payload in NON_STANDARD_JSON:
                    with pytest.raises(grpc.RpcError) as info:
                        stub.Stimulate(pb.StimulateRequest(op=op, input_json=payload))
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (op, payload)
                    assert "input_json is not valid JSON" in (info.value.details() or "")
            assert client.call("system.echo", {"x": 1.5e300}) == {"x": 1.5e300}
            assert client.call("vault.list", {}) == {"items": [], "unreadable": []}
    finally:
        assert proc.stop() == 0
