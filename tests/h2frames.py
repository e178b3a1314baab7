"""Raw HTTP/2 for attack tests: what a hostile process can write to a runtime's gRPC socket
without any gRPC library in the way (no HPACK Huffman coding, no flow control)."""

from __future__ import annotations

import socket
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, SETTINGS = 0, 1, 4
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _length(value: int) -> bytes:
    """An HPACK string length (7-bit prefix integer, no Huffman)."""
    if value < 127:
        return bytes([value])
    out, value = bytearray([127]), value - 127
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def header(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name."""
    return b"\x00" + _length(len(name)) + name + _length(len(value)) + value


def grpc_request(path: bytes, message: bytes = b"", stream: int = 1) -> bytes:
    """HEADERS and DATA of one unary gRPC call on `stream`."""
    block = b"".join(
        header(name, value)
        for name, value in (
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        )
    )
    body = b"\x00" + struct.pack(">I", len(message)) + message
    return frame(HEADERS, END_HEADERS, stream, block) + frame(DATA, END_STREAM, stream, body)


def send(path: str, payload: bytes, read_timeout: float = 1.0) -> bytes:
    """Connect to the Unix socket at `path`, write the preface, SETTINGS and `payload`, and
    return what the server wrote back before it went quiet or closed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(read_timeout)
        sock.connect(path)
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0, b"") + payload)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionError):
            pass
        return received
