"""Fuzz the bytes a runtime's socket takes: protobuf messages, and raw HTTP/2 frames.

Protobuf cases travel as real gRPC calls with a valid session (through the relay runtime), so
they reach the message parser and the servicer. HTTP/2 cases are written byte by byte (`h2`)
onto the runtime's socket, twice over: from this process (any process of the sidecar's user
can connect there), and from inside the runtime itself (a compromised agent, on its own
channel). Nothing either sends may affect that channel or any other: after every case the same
channel and another runtime's channel must still answer a real SDK call.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import example, given
from hypothesis import strategies as st

from sdk.protocol.soma.v1 import sidecar_pb2 as pb
from tests.attack import h2, tally
from tests.attack.cluster import Cluster
from tests.attack.scale import fuzz_settings
from tests.attack.strategies import JSON, TEXT, mutated_bytes

SERVICE = "/soma.v1.Sidecar/"
PATHS = [SERVICE + m for m in ("Stimulate", "Describe", "Search")] + [
    "/grpc.health.v1.Health/Check"
]
OPS = ["system.echo", "system.ping", "vault.store", "acme.fail", "", "nope.nope"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(
        tmp_path_factory.mktemp("fuzz-grpc"), {"alpha": ["system.*", "vault.*"], "beta": ["*"]}
    ).start()
    yield cluster
    cluster.stop()


def both_serve(cluster: Cluster) -> None:
    assert cluster.relay("alpha").serves(timeout=3), "the fuzzed channel stopped serving"
    assert cluster.relay("beta").serves(timeout=3), "another runtime's channel stopped serving"


# -- protobuf ---------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def wire_fields(draw: st.DrawFn) -> bytes:
    """Protobuf wire format by hand: any field number and wire type (the invalid 6 and 7, and
    groups, included), varints up to 2^64, lengths that lie."""
    out = bytearray()
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        number = draw(st.one_of(st.integers(1, 4), st.integers(0, 2**29)))
        wire = draw(st.integers(0, 7))
        out += varint(number << 3 | wire)
        if wire == 0:
            out += varint(draw(st.integers(0, 2**64 - 1)))
        elif wire == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire == 2:
            payload = draw(st.binary(max_size=40))
            length = draw(st.one_of(st.just(len(payload)), st.integers(0, 2**35)))
            out += varint(length) + payload
        elif wire == 5:
            out += draw(st.binary(min_size=4, max_size=4))
    return bytes(out)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


WELL_FORMED = st.one_of(
    st.builds(
        lambda op, data, context: pb.StimulateRequest(
            op=op, input_json=data, context=context
        ).SerializeToString(),
        st.one_of(st.sampled_from(OPS), TEXT),
        st.one_of(JSON.map(json_bytes), st.binary(max_size=64)),
        st.dictionaries(TEXT, TEXT, max_size=3),
    ),
    st.builds(
        lambda query, tag: pb.SearchRequest(query=query, tag=tag).SerializeToString(), TEXT, TEXT
    ),
)
PROTOBUF = st.one_of(
    WELL_FORMED, WELL_FORMED.flatmap(mutated_bytes), wire_fields(), st.binary(max_size=200)
)
UNDECODABLE = [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x12\x80\x80\x80\x80\x10"]


@fuzz_settings(short=60, long=3000, shrink=False)
@given(path=st.sampled_from(PATHS), payload=PROTOBUF)
@example(path=PATHS[0], payload=UNDECODABLE[2])
def test_fuzzed_protobuf_messages_leave_every_channel_serving(
    cluster: Cluster, path: str, payload: bytes
) -> None:
    tally.count("fuzz", "protobuf messages")
    code, reply = cluster.relay("alpha").raw(path, payload)
    if code == "OK" and path == PATHS[0]:
        assert reply is not None
        answer = pb.StimulateResponse.FromString(reply)
        assert b'"Internal"' not in answer.output_json, (payload, answer.output_json)
    both_serve(cluster)


def test_an_undecodable_message_is_invalid_argument(cluster: Cluster) -> None:
    """The contract (proto/soma/v1/sidecar.proto): INVALID_ARGUMENT for undecodable requests,
    so a client can tell its own bad request from a sidecar failure (UNKNOWN, INTERNAL)."""
    requests = {
        PATHS[0]: pb.StimulateRequest,
        PATHS[1]: pb.DescribeRequest,
        PATHS[2]: pb.SearchRequest,
    }
    codes = {}
    for path, message in requests.items():
        for payload in UNDECODABLE:
            try:  # the oracle: what protobuf itself refuses (an unknown field is no error)
                message.FromString(payload)
                continue
            except DecodeError:
                pass
            tally.count("fuzz", "protobuf messages")
            codes[(path, payload)] = cluster.relay("alpha").raw(path, payload)[0]
    assert len(codes) >= len(UNDECODABLE) * 2
    assert {k: c for k, c in codes.items() if c != "INVALID_ARGUMENT"} == {}


# -- raw HTTP/2 -------------------------------------------------------------------------------

BYTES = st.binary(max_size=48)
ASCII_PATHS = st.sampled_from([p.encode() for p in PATHS] + [b"/", b"*", b"", b"//x/y"])


@st.composite
def bad_path(draw: st.DrawFn) -> bytes:
    """A gRPC call whose `:path` is any bytes: not UTF-8, empty, control characters."""
    base = draw(ASCII_PATHS)
    path = draw(st.one_of(BYTES, mutated_bytes(base), st.just(base + b"\xff")))
    return h2.connection_start() + h2.grpc_request(path, b"")


@st.composite
def bad_headers(draw: st.DrawFn) -> bytes:
    """Valid pseudo-headers, then headers with any names and values (HTTP/2 forbids upper
    case and connection-specific ones), and gRPC headers with values that make no sense."""
    known = st.sampled_from(
        [b"grpc-timeout", b"grpc-encoding", b"content-type", b"te", b"authorization", b"Host"]
    )
    extra = draw(st.lists(st.tuples(st.one_of(known, BYTES), BYTES), max_size=5))
    headers = h2.grpc_headers(draw(ASCII_PATHS), extra=extra)
    if draw(st.booleans()):
        headers = draw(st.permutations(headers))
    block = h2.header_block(headers)
    return (
        h2.connection_start()
        + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, block)
        + h2.frame(h2.DATA, h2.END_STREAM, 1, h2.grpc_message(b""))
    )


@st.composite
def bad_data(draw: st.DrawFn) -> bytes:
    """A valid request head, then DATA whose gRPC prefix lies: length, compression flag, more
    than one message for a unary call, or bytes after the end of the stream."""
    message = draw(st.binary(max_size=64))
    prefix = bytes([draw(st.integers(0, 255))]) + draw(
        st.one_of(st.just(len(message).to_bytes(4, "big")), st.binary(min_size=4, max_size=4))
    )
    head = h2.frame(
        h2.HEADERS, h2.END_HEADERS, 1, h2.header_block(h2.grpc_headers(PATHS[0].encode()))
    )
    body = [h2.frame(h2.DATA, 0, 1, prefix + message) for _ in range(draw(st.integers(1, 3)))]
    body.append(h2.frame(h2.DATA, h2.END_STREAM, 1, draw(BYTES)))
    if draw(st.booleans()):
        body.append(h2.frame(h2.DATA, 0, 1, draw(BYTES)))  # after END_STREAM
    return h2.connection_start() + head + b"".join(body)


@st.composite
def frame_soup(draw: st.DrawFn) -> bytes:
    """Any frames at all: unknown types, stream ids even, zero or huge, flags and payloads at
    random, SETTINGS with values out of range, a header block of random HPACK bytes."""
    frames = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.one_of(st.integers(0, 10), st.integers(0, 255)))
        flags = draw(st.integers(0, 255))
        stream = draw(st.one_of(st.integers(0, 5), st.integers(0, 2**31 - 1)))
        if kind == h2.SETTINGS and draw(st.booleans()):
            settings = draw(
                st.lists(st.tuples(st.integers(0, 10), st.integers(0, 2**32 - 1)), max_size=4)
            )
            payload = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in settings)
        else:
            payload = draw(st.binary(max_size=64))
        frames.append(h2.frame(kind, flags, stream, payload))
    start = h2.connection_start() if draw(st.booleans()) else h2.PREFACE
    return start + b"".join(frames)


@st.composite
def lying_frame(draw: st.DrawFn) -> bytes:
    """A frame header announcing more (or far more) bytes than follow."""
    payload = draw(st.binary(max_size=32))
    announced = draw(st.integers(len(payload) + 1, 2**24 - 1))
    kind = draw(st.integers(0, 9))
    return (
        h2.connection_start()
        + announced.to_bytes(3, "big")
        + bytes([kind, 0])
        + (1).to_bytes(4, "big")
        + payload
    )


HTTP2 = st.one_of(
    bad_path(),
    bad_headers(),
    bad_data(),
    frame_soup(),
    lying_frame(),
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: h2.PREFACE + b),
)


@pytest.mark.parametrize("sender", ["outside", "inside"])
def test_raw_http2_bytes_on_a_runtime_socket_affect_no_channel(
    cluster: Cluster, sender: str
) -> None:
    socket_path = cluster.grpc_socket("alpha")

    @fuzz_settings(short=40, long=2000, shrink=False)
    @given(data=HTTP2)
    @example(data=h2.connection_start() + h2.grpc_request(b"/soma.v1.Sidecar/\xff\xfe", b""))
    def case(data: bytes) -> None:
        tally.count("fuzz", f"http2 byte streams ({sender} the runtime)")
        if sender == "inside":
            cluster.relay("alpha").send(socket_path, data, wait_for_socket=True)
        else:
            h2.exchange(socket_path, data)
        both_serve(cluster)

    case()
