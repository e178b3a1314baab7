"""Fuzz every built-in organ function's input through a runtime's real channel.

Each case is an SDK call made by a supervised runtime (the relay agent): the sidecar must
answer it with ok, with a typed organ error, or with a typed transport refusal — never with
`Internal`, which would mean the input got past validation into a place that broke — and it
must keep serving that runtime and the others. A second target sends raw `input_json` texts
that the SDK itself would never produce (NaN, Infinity, 1e400, lone surrogates).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given

from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from sidecar.loading import resolve_organ_class
from sidecar.organs import BUILTIN_ORGANS
from soma_runtime import FunctionCard
from tests.attack import tally
from tests.attack.cluster import Cluster
from tests.attack.scale import fuzz_settings
from tests.attack.strategies import hostile_json_texts, schema_inputs

FUNCTIONS: list[FunctionCard] = [
    fn for spec in BUILTIN_ORGANS for fn in resolve_organ_class(spec)().describe().all_functions()
]
STIMULATE = "/soma.v1.Sidecar/Stimulate"
# Refusals that name what was wrong with the request: typed, and nothing ran.
TYPED_REFUSALS = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED"}


def closed_loopback_port() -> int:
    """A loopback port nothing listens on: http.request's fuzzed URLs all point there, so the
    fuzzer never sends a request off this machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    organs = ("system", "vault", "http")
    cluster = Cluster(
        tmp_path_factory.mktemp("fuzz-organs"),
        {"alpha": ["*"], "beta": ["system.echo"]},
        organs=organs,
    ).start()
    yield cluster
    cluster.stop()


def confine(fn: FunctionCard, value: Any, port: int) -> Any:
    """Keep http.request on this machine: a URL that would pass the schema is pointed at a
    closed loopback port (the path and query stay fuzzed)."""
    if fn.name == "http.request" and isinstance(value, dict):
        url = value.get("url")
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            tail = url.split("://", 1)[1].partition("/")[2]
            value["url"] = f"http://127.0.0.1:{port}/{tail}"
    return value


def assert_typed(fn: str, result: dict[str, Any]) -> None:
    if "response" in result:
        output = result["response"]["output"]
        if not result["response"]["ok"]:
            assert isinstance(output, dict) and isinstance(output.get("error"), str), output
            assert output["error"] != "Internal", (fn, output)
        return
    assert result.get("transport") in TYPED_REFUSALS, (fn, result)


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda fn: fn.name)
def test_every_organ_function_answers_fuzzed_inputs_with_typed_errors(
    cluster: Cluster, fn: FunctionCard
) -> None:
    alpha = cluster.relay("alpha")
    port = closed_loopback_port()

    @fuzz_settings(short=25, long=600)
    @given(payload=schema_inputs(fn.input_schema))
    def case(payload: Any) -> None:
        tally.count("fuzz", "organ inputs")
        result = alpha.call(fn.name, confine(fn, payload, port), timeout=10)
        assert_typed(fn.name, result)

    case()
    assert cluster.relay("beta").serves()


@fuzz_settings(short=30, long=500)
@given(case=hostile_json_texts())
@example(case=("system.echo", b'{"x":NaN}'))
@example(case=("system.echo", b'{"x":1e400}'))
@example(case=("system.echo", b'{"x":"\\ud800"}'))
def test_json_the_sdk_would_never_send_is_refused_as_bad_input(
    cluster: Cluster, case: tuple[str, bytes]
) -> None:
    """NaN, Infinity, numbers beyond a double and lone surrogates are not JSON a peer can read
    back: the sidecar must refuse them as bad input (INVALID_ARGUMENT or InvalidInput), not
    accept them and fail later on the way out."""
    tally.count("fuzz", "raw input_json")
    op, text = case
    request = pb.StimulateRequest(op=op, input_json=text).SerializeToString()
    code, reply = cluster.relay("alpha").raw(STIMULATE, request)
    if code == "OK":
        assert reply is not None
        answer = pb.StimulateResponse.FromString(reply)
        assert not answer.ok, (text, answer.output_json)
        assert b'"InvalidInput"' in answer.output_json, (text, answer.output_json)
    else:
        assert code == "INVALID_ARGUMENT", (text, code)
    assert cluster.relay("alpha").serves()
