"""A minimal HTTP/2 client frame builder: enough to send gRPC requests byte by byte.

No h2 library is installed, and a fuzzer needs to write what a real client never would
(bytes that are not UTF-8 in `:path`, lying lengths, frames out of order), so the frames are
built here by hand: the connection preface, SETTINGS, HEADERS whose header block is HPACK
"literal without indexing, new name" fields (no Huffman, no table), DATA carrying a gRPC
message behind its 5-byte prefix, PING, RST_STREAM and GOAWAY. Nothing of the server's answer
is decoded beyond frame headers.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tests.attack.sockets import send_and_read

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4

Header = tuple[bytes, bytes]


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One frame: 24-bit length, type, flags, 31-bit stream id, payload."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream & 0x7FFFFFFF)
        + payload
    )


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """HPACK integer with an N-bit prefix (RFC 7541 5.1); `first` holds the bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_string(raw: bytes) -> bytes:
    """A string literal without Huffman coding: length, then the bytes as they are."""
    return hpack_int(len(raw), 7) + raw


def header_block(headers: Iterable[Header]) -> bytes:
    """Each header as a literal field without indexing and with a new name (0x00 prefix)."""
    return b"".join(b"\x00" + hpack_string(name) + hpack_string(value) for name, value in headers)


def grpc_headers(
    path: bytes, authorization: bytes | None = None, extra: Sequence[Header] = ()
) -> list[Header]:
    """The request headers of a gRPC call to `path` (`/package.Service/Method`)."""
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    headers.extend(extra)
    return headers


def grpc_message(message: bytes, compressed: bool = False) -> bytes:
    """A gRPC length-prefixed message: compressed flag, 32-bit length, bytes."""
    return bytes([1 if compressed else 0]) + struct.pack(">I", len(message)) + message


def grpc_request(
    path: bytes, message: bytes, stream: int = 1, authorization: bytes | None = None
) -> bytes:
    """A whole unary call on `stream`: HEADERS, then DATA with END_STREAM."""
    headers = header_block(grpc_headers(path, authorization))
    return frame(HEADERS, END_HEADERS, stream, headers) + frame(
        DATA, END_STREAM, stream, grpc_message(message)
    )


def connection_start() -> bytes:
    """What a client sends first: the preface and an empty SETTINGS frame."""
    return PREFACE + frame(SETTINGS, 0, 0, b"")


@dataclass(frozen=True, slots=True)
class Answer:
    """What the server did with the bytes: the frame types it sent, and whether it closed."""

    frame_types: tuple[int, ...]
    closed: bool


def exchange(path: str, data: bytes, timeout: float = 5.0) -> Answer:
    """Send `data` on a fresh connection to the Unix socket `path` and read until the server
    closes it (see `send_and_read`); the frames it answered with, parsed by their headers.

    A runtime's gRPC socket may be missing for a moment after an earlier attack: grpcio's
    server loop dies on some inputs (a non-UTF-8 method name) some time after the bytes were
    read, and the sidecar puts a new server on the socket. The attacker waits for it."""
    received, closed = send_and_read(path, data, timeout, wait_for_socket=True)
    return Answer(tuple(frame_types(received)), closed)


def frame_types(data: bytes) -> list[int]:
    """The types of the frames in `data`, parsed by their headers."""
    types = []
    offset = 0
    while offset + 9 <= len(data):
        length = int.from_bytes(data[offset : offset + 3], "big")
        types.append(data[offset + 3])
        offset += 9 + length
    return types
